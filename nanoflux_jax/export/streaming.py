"""Streaming denoiser export: memory bounded by one chunk, not by the model.

`bundle.export_denoiser(cfg, params, ...)` needs the whole params tree in
memory. Here the weights come from a *source* that materialises one chunk's
tensors on demand, one tensor at a time:

  source = RandomSource(shapes, seed=0)   # or TreeSource(params)
  entries, stats = export_denoiser_streaming(cfg, source, out_dir, 32, 32, 256,
                                             quantize='int8', processes=True)

Each chunk is converted in its own spawned process (`processes=True`), so
whatever TensorFlow's converter keeps of a chunk is returned to the system
when the process ends; the parent holds no weights. The chunk plan, the
functions and the weights are those of `export_denoiser`, so the files are
the same bytes (tests/test_export_streaming.py checks both).

Sources must be picklable for `processes=True`. `load(keys)` returns the
chunk's params (as `components.chunk_params` lays them out) with each leaf a
`LazyLeaf`: `tflite.convert` calls it only when it copies that tensor into
the SavedModel, so at most one float32 tensor is alive outside TensorFlow.

The JAX references for parity (`run_jax_streaming`) and the LiteRT run
(`run_litert`) go chunk by chunk the same way.
"""
from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import resource
import time
import weakref
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax.export import components
from nanoflux_jax.export import runner
from nanoflux_jax.export import tflite


# ----------------------------------------------------------------------------
# Weight sources.
# ----------------------------------------------------------------------------
class LazyLeaf:
  """A tensor made on demand: `.shape`, `.dtype`, and `leaf()` -> array."""

  def __init__(self, shape, make: Callable[[], np.ndarray]):
    self.shape, self.dtype, self._make = tuple(shape), np.dtype('float32'), make

  def __call__(self) -> np.ndarray:
    return self._make()


class Meter:
  """Bytes of weights a source has handed out that are still alive.

  Every materialised tensor is counted until it is garbage collected
  (weakref.finalize), so `peak_live_bytes` is the most weight data that
  was ever alive at once outside TensorFlow / XLA.
  """

  def __init__(self):
    self.live = self.peak_live_bytes = self.total_bytes = 0
    self.loads: list[tuple[tuple[str, ...], int]] = []

  def _free(self, n):
    self.live -= n

  def track(self, x: np.ndarray) -> np.ndarray:
    self.live += x.nbytes
    self.total_bytes += x.nbytes
    self.peak_live_bytes = max(self.peak_live_bytes, self.live)
    weakref.finalize(x, self._free, x.nbytes)
    return x


def _leaf_paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from _leaf_paths(tree[k], prefix + (k,))
  else:
    yield prefix, tree


def _set_path(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


class Shape:
  """A picklable shape-only leaf (float32)."""
  __slots__ = ('shape',)

  def __init__(self, shape):
    self.shape = tuple(int(s) for s in shape)

  def __getstate__(self):
    return self.shape

  def __setstate__(self, state):
    self.shape = state


class _Source:
  """Base: shapes {key: nested dict of Shape}; `leaf(path, shape)`."""

  def __init__(self, shapes):
    self.shapes = jax.tree.map(lambda x: Shape(x.shape), shapes)
    self.meter = Meter()

  def __getstate__(self):
    state = dict(self.__dict__)
    state['meter'] = None  # Each process counts its own.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.meter = Meter()

  def leaf(self, path: tuple[str, ...], shape) -> np.ndarray:
    raise NotImplementedError

  def load(self, keys: list[str], transform=None) -> dict:
    """The chunk `keys`' params as LazyLeaf objects (see the module doc).

    transform: optional (path, array) -> array applied to each tensor (the
    JAX reference's simulated quantization).
    """
    sub = components.chunk_params(self.shapes, keys)
    out: dict = {}
    nbytes = 0
    for path, leaf in _leaf_paths(sub, ()):
      src, shape = self._source_path(path), leaf.shape

      def make(src=src, shape=shape):
        x = np.asarray(self.leaf(src, shape), np.float32)
        if transform is not None:
          x = np.asarray(transform(src, x), np.float32)
        return self.meter.track(x)
      _set_path(out, path, LazyLeaf(shape, make))
      nbytes += 4 * math.prod(shape)
    self.meter.loads.append((tuple(keys), nbytes))
    return out

  @staticmethod
  def _source_path(path):
    """Chunk path -> path in the full tree (down-sampler halves)."""
    if path[0] in (components.DOWN_KEY, components.UP_KEY):
      return ('downsample',) + tuple(path[1:])
    return tuple(path)


class TreeSource(_Source):
  """Weights from an in-memory params tree (the non-streaming case)."""

  def __init__(self, params):
    super().__init__(params)
    self.params = params

  def leaf(self, path, shape):
    x = self.params
    for k in path:
      x = x[k]
    return np.asarray(x, np.float32)


class RandomSource(_Source):
  """Seeded random weights, each tensor regenerated from (seed, its path).

  Scaled like a trained model's: kernels N(0, 1/fan_in) (fan_in: the
  contracted dims), modulation tables and biases small, norm scales ~1, so
  a deep random student keeps its activations in range.
  """

  def __init__(self, shapes, seed: int = 0):
    super().__init__(shapes)
    self.seed = int(seed)

  def leaf(self, path, shape):
    rng = np.random.default_rng([self.seed, zlib.crc32('/'.join(path).encode())])
    x = rng.standard_normal(shape, np.float32)
    name, parent = path[-1], path[-2] if len(path) > 1 else ''
    if name == 'kernel':
      fan_in = math.prod(shape[a] for a in _contracted_axes(path, len(shape)))
      x *= np.float32(1.0 / math.sqrt(fan_in))
    elif name == 'table':
      x *= np.float32(0.1)
    elif name == 'scale':
      x = 1.0 + np.float32(0.05) * x
    else:  # biases
      x *= np.float32(0.02)
    return x


def materialize(tree):
  """A LazyLeaf tree -> numpy arrays."""
  return jax.tree.map(lambda x: x() if isinstance(x, LazyLeaf) else x, tree)


# ----------------------------------------------------------------------------
# Simulated weight quantization (what the int8 converter stores).
# ----------------------------------------------------------------------------
def _contracted_axes(path, ndim: int) -> tuple[int, ...]:
  """The input (contracted) dims of a kernel: a conv's (kh, kw, in) and the
  attention output projection's (heads, head_dim); every other Dense
  contracts its first dim only (qkv [D, 3, heads, head_dim] included: its
  output channels are all of (3, heads, head_dim))."""
  parent = path[-2] if len(path) > 1 else ''
  if parent == 'proj' or parent.startswith('conv'):
    return tuple(range(ndim - 1))
  return (0,)


def fake_quant_int8(path, x: np.ndarray) -> np.ndarray:
  """What TFLite's dynamic-range quantizer stores for the tensors it makes
  int8 (matmul and conv kernels of >= 1024 elements): symmetric int8, one
  scale per output channel (each column of the flattened [in, out] kernel),
  max|w| / 127; float otherwise."""
  if path[-1] != 'kernel' or x.size < 1024:
    return x
  axes = _contracted_axes(path, x.ndim)
  scale = np.abs(x).max(axis=axes, keepdims=True) / 127.0
  scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
  return (np.clip(np.round(x / scale), -127, 127) * scale).astype(np.float32)


def _fake_quant_rows(x, axes, per_tensor=False):
  """Asymmetric int8 of x over `axes`, as XNNPACK's dynamic-range ("qd8")
  kernels quantize a float input before an int8-weight matmul / conv
  (`xnn_f32_qd8_asymmetric_quantization_params`): one (scale, zero point)
  per row of a fully-connected input (the contracted dims), one per image of
  a conv input; range [min(x, 0), max(x, 0)], multiplier 255 / range, zero
  point from the end with the smaller error, both rounded half to even.
  (TFLite's own builtin kernels, without XNNPACK, round ties away from zero
  and so differ on exact ties.)"""
  axes = tuple(range(1, x.ndim)) if per_tensor else axes
  lo = jnp.minimum(x.min(axis=axes, keepdims=True), 0)
  hi = jnp.maximum(x.max(axis=axes, keepdims=True), 0)
  mul = jnp.where(hi > lo, 255.0 / jnp.where(hi > lo, hi - lo, 1.0), 1.0)
  lo_s, hi_s = lo * mul, hi * mul
  zp = jnp.where((-128.0 + lo_s) + (127.0 + hi_s) > 0, -128.0 - lo_s,
                 127.0 - hi_s)
  zp = jnp.round(jnp.clip(zp, -128.0, 127.0))
  q = jnp.clip(jnp.round(x * mul) + zp, -128, 127)
  return ((q - zp) * (1.0 / mul)).astype(x.dtype)


def _quantize_inputs(next_fun, args, kwargs, context):
  """flax interceptor: dynamic int8 inputs of int8-weight Dense / Conv."""
  mod = context.module
  if context.method_name == '__call__' and args:
    x = args[0]
    if isinstance(mod, nn.DenseGeneral):
      axis = mod.axis if isinstance(mod.axis, tuple) else (mod.axis,)
      axis = tuple(a % x.ndim for a in axis)
      feats = mod.features if isinstance(mod.features, tuple) else (
          mod.features,)
      if math.prod(x.shape[a] for a in axis) * math.prod(feats) >= 1024:
        args = (_fake_quant_rows(x, axis),) + tuple(args[1:])
    elif isinstance(mod, nn.Conv):
      args = (_fake_quant_rows(x, None, per_tensor=True),) + tuple(args[1:])
  return next_fun(*args, **kwargs)


# ----------------------------------------------------------------------------
# Processes.
# ----------------------------------------------------------------------------
def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def children_peak_rss_mb() -> float:
  """Largest peak RSS of any finished child process (getrusage)."""
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def in_subprocess(fn: Callable, *args, **kwargs):
  """Runs fn(*args, **kwargs) in a fresh spawned process and returns its
  result (the process exits afterwards, returning all its memory)."""
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=ctx, max_tasks_per_child=1) as pool:
    return pool.submit(fn, *args, **kwargs).result()


# ----------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------
def plan(cfg, shapes, quantize: str, max_chunk_bytes: float | None
         ) -> list[list[str] | None]:
  """The files of the denoiser, as `bundle.export_denoiser` plans them: [None]
  for one unchunked file, else the chunks' key lists."""
  bpp = tflite.BYTES_PER_PARAM[quantize]
  total = tflite.tree_bytes(shapes) / 4 * bpp
  if max_chunk_bytes is None or total <= max_chunk_bytes:
    return [None]
  return components.plan_chunks(cfg, shapes, max_chunk_bytes, bpp)


def file_name(prefix: str, keys, i: int) -> str:
  return f'{prefix}.tflite' if keys is None else f'{prefix}_{i:02d}.tflite'


def _convert_one(cfg, source, keys, path, grid_h, grid_w, txt_len, quantize,
                 use_buffer_offset, workdir) -> dict[str, Any]:
  """Converts one file (the whole model when keys is None)."""
  start = time.perf_counter()
  if keys is None:
    fn, inputs = components.denoiser_fn(cfg, grid_h, grid_w, txt_len)
    params = source.load(sorted(source.shapes))
    blocks = components.block_keys(cfg)
  else:
    fn, inputs = components.chunk_fn(cfg, keys, grid_h, grid_w, txt_len)
    params = source.load(keys)
    blocks = [k for k in keys if 'blocks_' in k]
  entry = tflite.convert(fn, params, inputs, path, quantize=quantize,
                         use_buffer_offset=use_buffer_offset, workdir=workdir)
  del params
  entry['blocks'] = blocks
  entry['seconds'] = round(time.perf_counter() - start, 1)
  entry['peak_live_weight_bytes'] = source.meter.peak_live_bytes
  entry['loaded_bytes'] = source.meter.total_bytes
  return entry


def export_denoiser_streaming(cfg, source, out_dir: str, grid_h: int,
                              grid_w: int, txt_len: int, *,
                              quantize: str = 'none',
                              max_chunk_bytes: float | None =
                              1 << 30,
                              use_buffer_offset: bool | None = None,
                              prefix: str = 'denoiser',
                              processes: bool = True,
                              workdir: str | None = None,
                              log: Callable[[str], None] | None = None
                              ) -> list[dict[str, Any]]:
  """`bundle.export_denoiser` with weights from `source`, chunk by chunk.

  Args:
    source: a RandomSource / TreeSource (anything with `shapes` and `load`).
    processes: convert each file in its own spawned process (each entry
      then has that process's 'peak_rss_mb'); False converts in this one.
  Returns:
    The manifest entries, in execution order, with 'seconds',
    'peak_live_weight_bytes' (most weight bytes alive at once in the
    converting process, outside TensorFlow) and 'loaded_bytes'.
  """
  tflite.check_quantize(quantize)
  os.makedirs(out_dir, exist_ok=True)
  entries = []
  chunks = plan(cfg, source.shapes, quantize, max_chunk_bytes)
  for i, keys in enumerate(chunks):
    path = os.path.join(out_dir, file_name(prefix, keys, i))
    args = (cfg, source, keys, path, grid_h, grid_w, txt_len, quantize,
            use_buffer_offset, workdir)
    entry = in_subprocess(_convert_one, *args) if processes else \
        _convert_one(*args)
    entries.append(entry)
    if log:
      log(f'{entry["file"]}: {entry["bytes"] / 2**20:.0f} MiB, '
          f'{entry["seconds"]} s, peak RSS {entry["peak_rss_mb"] / 1024:.2f}'
          f' GiB ({i + 1}/{len(chunks)})')
  return entries


# ----------------------------------------------------------------------------
# References and LiteRT runs, chunk by chunk.
# ----------------------------------------------------------------------------
def run_jax_streaming(cfg, source, chunks, grid_h: int, grid_w: int,
                      inputs: dict, transform=None,
                      quantize_inputs: bool = False) -> dict[str, Any]:
  """The JAX forward, chained chunk by chunk with each chunk's weights
  loaded from `source` (optionally through `transform`, e.g.
  fake_quant_int8) and dropped before the next. `quantize_inputs` also
  simulates the int8 runtime's dynamic quantization of every int8-weight
  layer's input (per row for matmuls, per tensor for convs).
  -> {'velocity', 'seconds', 'peak_rss_mb'}."""
  start = time.perf_counter()
  state = {k: np.asarray(v) for k, v in inputs.items()}
  txt_len = state['txt'].shape[1]
  for keys in chunks:
    if keys is None:
      fn, _ = components.denoiser_fn(cfg, grid_h, grid_w, txt_len)
      keys_ = sorted(source.shapes)
    else:
      fn, _ = components.chunk_fn(cfg, keys, grid_h, grid_w, txt_len)
      keys_ = keys
    params = materialize(source.load(keys_, transform))
    if quantize_inputs:
      with nn.intercept_methods(_quantize_inputs):
        out = jax.jit(fn)(params, state)
    else:
      out = jax.jit(fn)(params, state)
    del params
    state.update({k: np.asarray(v) for k, v in out.items()})
  return {'velocity': state['velocity'],
          'seconds': round(time.perf_counter() - start, 1),
          'peak_rss_mb': round(peak_rss_mb(), 1)}


def run_litert(directory: str, entries: list[dict], inputs: dict,
               num_threads: int = 2, steps: int = 1) -> dict[str, Any]:
  """Loads every file as an app does (one TFLiteModel each, XNNPACK with
  `num_threads`) and runs the chain `steps` times on the same inputs, as
  TFLitePipeline.velocity chains them.

  Returns {'velocity' (of the first run), 'step_s' [per run], 'load_s',
  'peak_rss_mb'}.
  """
  start = time.perf_counter()
  models = [runner.TFLiteModel(directory, e, num_threads) for e in entries]
  load_s = time.perf_counter() - start
  times, first = [], None
  for _ in range(steps):
    t0 = time.perf_counter()
    state = dict(inputs)
    for m in models:
      state.update(m(**{k: state[k] for k in m.inputs if k in state}))
    times.append(round(time.perf_counter() - t0, 2))
    if first is None:
      first = np.asarray(state['velocity'])
  return {'velocity': first, 'step_s': times, 'load_s': round(load_s, 1),
          'peak_rss_mb': round(peak_rss_mb(), 1)}


def max_rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def psnr(got, want) -> float:
  """dB, with the reference's largest magnitude as the peak."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  mse = float(np.mean((got - want) ** 2))
  return float('inf') if mse == 0 else float(
      10 * np.log10(np.abs(want).max() ** 2 / mse))

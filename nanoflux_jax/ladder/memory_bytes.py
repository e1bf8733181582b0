"""Per-device byte accounting on shapes, for the memory plan (memory_plan.py).

Every count is the shard of an array on one device (`NamedSharding.
shard_shape`) of trees built under `jax.eval_shape`: a compression
transform's output (`transform_shapes`), a block's activations
(`activation_bytes`) and FSDP's whole-tensor copies (`gathered_bytes`).
Nothing is allocated, and the mesh may be an `AbstractMesh` of any size
(`abstract_mesh`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from nanoflux_jax import compress
from nanoflux_jax import parallel
from nanoflux_jax.compress import layout
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models import scan_blocks


GIB = 1024 ** 3
ITEM_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


# ---------------------------------------------------------------------------
# Bytes of sharded abstract trees.
# ---------------------------------------------------------------------------
def abstract_mesh(spec, num_devices: int) -> AbstractMesh:
  """A (data, fsdp, tensor) AbstractMesh of num_devices (no devices needed)."""
  shape = parallel.mesh_shape(spec, num_devices)
  return AbstractMesh(shape, parallel.MESH_AXES)


def shard_bytes(x, sharding) -> int:
  """Bytes of x's shard on one device."""
  shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else (
      x.shape)
  return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def tree_bytes(tree, shardings=None) -> int:
  """Per-device bytes of an abstract (or concrete) tree under shardings."""
  leaves = jax.tree.leaves(tree)
  shs = ([None] * len(leaves) if shardings is None else
         jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(
             s, NamedSharding)))
  return sum(shard_bytes(x, s) for x, s in zip(leaves, shs))


def largest(tree, shardings, prefix: str = '') -> tuple[int, str]:
  """(per-device bytes, 'path [shape] dtype') of the largest shard."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  shs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(
      s, NamedSharding))
  best = (0, '')
  for (path, x), s in zip(flat, shs):
    b = shard_bytes(x, s)
    if b > best[0]:
      name = jax.tree_util.keystr(path, simple=True, separator='/')
      best = (b, f'{prefix}{name} {list(x.shape)} {np.dtype(x.dtype).name}')
  return best


# ---------------------------------------------------------------------------
# Students on shapes: each rung's real transform under eval_shape.
# ---------------------------------------------------------------------------
def abstract_params(cfg: FluxConfig, dtype: str | None):
  shapes = flux_lib.param_shapes(cfg)
  if dtype is None:
    return shapes
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def _shaped(transform, params):
  """(cfg, abstract params) of transform(params) -> (cfg, params)."""
  box = {}

  def run(p):
    cfg, out = transform(p)
    box['cfg'] = cfg
    return out
  out = jax.eval_shape(run, params)
  return box['cfg'], out


def _uniform_mask(cfg: FluxConfig, keep_heads, keep_mlp, keep_flags=None):
  keep = lambda n, r: np.asarray(
      [1.0] * max(1, round(n * r)) + [0.0] * (n - max(1, round(n * r))),
      np.float32) if r is not None else np.ones(n, np.float32)
  m = compress.PruneMask(
      double_heads=tuple(keep(n, keep_heads) for n in cfg.double_heads),
      double_mlp_img=tuple(keep(n, keep_mlp) for n in cfg.double_mlp_img),
      double_mlp_txt=tuple(keep(n, keep_mlp) for n in cfg.double_mlp_txt),
      single_heads=tuple(keep(n, keep_heads) for n in cfg.single_heads),
      single_mlp=tuple(keep(n, keep_mlp) for n in cfg.single_mlp),
      double_blocks=np.ones(cfg.depth, np.float32),
      single_blocks=np.ones(cfg.depth_single_blocks, np.float32))
  return m


def _keep_flags(cfg: FluxConfig, opts) -> np.ndarray:
  n = cfg.num_blocks
  if opts.get('keep') is not None:
    flags = np.zeros(n, bool)
    flags[np.asarray(opts['keep'], int)] = True
    return flags
  k = opts['keep_blocks']
  k = int(round(k * n)) if isinstance(k, float) else int(k)
  kd = int(round(cfg.depth * k / n))
  flags = np.zeros(n, bool)
  flags[:kd] = True
  flags[cfg.depth:cfg.depth + (k - kd)] = True
  return flags


def transform_shapes(kind: str, cfg: FluxConfig, params, opts,
                     schedule: Sequence[float], vec_in_dim: int):
  """(cfg, abstract params) after a rung of `kind` (shapes only).

  A scanned student goes through the same layout conversion as the ladder
  (`compress.layout.compress_unrolled`): unscanned, transformed, re-scanned.
  """
  return layout.compress_unrolled(
      lambda s: _transform_unrolled(kind, *s, opts, schedule, vec_in_dim),
      (cfg, params))


def _transform_unrolled(kind: str, cfg: FluxConfig, params, opts,
                        schedule: Sequence[float], vec_in_dim: int):
  if kind == 'prune':
    mask = _uniform_mask(cfg, opts.get('keep_heads'), opts.get('keep_mlp'))
    return _shaped(lambda p: compress.prune(cfg, p, mask), params)
  if kind == 'depth':
    # remove_blocks(merge=...) is prune with block flags: the same shapes.
    flags = _keep_flags(cfg, opts).astype(np.float32)
    mask = _uniform_mask(cfg, None, None).replace(
        double_blocks=flags[:cfg.depth], single_blocks=flags[cfg.depth:])
    return _shaped(lambda p: compress.prune(cfg, p, mask), params)
  if kind == 'static_modulation':
    pooled = jax.ShapeDtypeStruct((2, vec_in_dim), jnp.float32)
    box = {}

    def run(p, y):
      c, out = compress.to_static_modulation(
          cfg, p, schedule[:-1], y, guidance=opts.get('guidance'))
      box['cfg'] = c
      return out
    out = jax.eval_shape(run, params, pooled)
    return box['cfg'], out
  if kind == 'downsample':
    n = cfg.num_blocks
    start, end = (v % n if v < 0 else v for v in (opts['start'],
                                                  opts['end']))
    return _shaped(lambda p: compress.add_downsampler(
        cfg, p, start, end, jax.random.PRNGKey(0), opts.get('factor', 2),
        opts.get('channels', 0)), params)
  return cfg, params


# ---------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------
def _blocks(cfg: FluxConfig, img_len: int, txt_len: int):
  """[(kind, index, heads, mlp widths, img tokens)] of every block."""
  out = []
  f2 = cfg.downsample_factor ** 2
  for g in range(cfg.num_blocks):
    down = (cfg.downsample_start is not None and
            cfg.downsample_start <= g <= cfg.downsample_end)
    li = img_len // f2 if down else img_len
    if g < cfg.depth:
      out.append(('double', cfg.double_heads[g],
                  (cfg.double_mlp_img[g], cfg.double_mlp_txt[g]), li))
    else:
      j = g - cfg.depth
      out.append(('single', cfg.single_heads[j], (cfg.single_mlp[j],), li))
  return out


def tensor_split(n: int, tensor: int) -> int:
  """Per-device share of n heads / channels on the tensor axis (_fit)."""
  return n // tensor if n % tensor == 0 else n


def _block_work(cfg: FluxConfig, heads, mlps, li, lt, b, tensor, act,
                attention: str, backward: bool) -> int:
  """Live bytes while one block runs (forward, or recompute + backward)."""
  d, dh = cfg.hidden_size, cfg.head_dim
  h = tensor_split(heads, tensor)
  length = li + lt
  m = sum(tensor_split(x, tensor) * (li if i == 0 else lt) for i, x in
          enumerate(mlps)) if len(mlps) == 2 else tensor_split(mlps[0], tensor) * length
  # Residual in/out, two normalised + modulated copies, q/k/v (and RoPE'd
  # q/k), the attention output, the MLP hidden before and after GELU.
  tok = length * (4 * d + 6 * h * dh) + 2 * m
  work = b * tok * act
  if attention in ('xla',):  # [B, H, L, L] logits and probs, fp32.
    work += 2 * b * h * length * length * 4
  elif attention in ('per_head',):
    work += 2 * b * length * length * 4
  return work * (2 if backward else 1)


def activation_bytes(student: FluxConfig, teacher: FluxConfig | None,
                     grid, txt_len: int, micro_batch: int, tensor: int,
                     compute_dtype: str, attention: str, *,
                     num_steps: int = 4, feature_pairs: int = 0,
                     cached_trajectory: bool = False) -> int:
  """Estimated per-device activation bytes of one distillation step.

  Rematerialised student blocks keep their inputs ([b, L, D] each) for the
  backward; one block at a time holds its working set twice (recompute and
  backward). The teacher runs without gradient (its trajectory of
  num_steps forwards, unless cached, plus the output-KD forward), so only
  one block's working set is live, plus the features feature KD compares.
  """
  act = ITEM_BYTES[compute_dtype]
  li = grid[0] * grid[1]
  b = micro_batch
  blocks = _blocks(student, li, txt_len)
  d = student.hidden_size
  saved = sum(b * (x[3] + txt_len) * d * act for x in blocks)
  if not student.remat:  # Every block's working set is kept.
    saved = sum(_block_work(student, x[1], x[2], x[3], txt_len, b, tensor,
                            act, attention, False) for x in blocks)
  peak = max(_block_work(student, x[1], x[2], x[3], txt_len, b, tensor, act,
                         attention, True) for x in blocks)
  # Outputs, targets, trajectory states: a few [b, Li, C] fp32 arrays.
  io = (num_steps + 6) * b * li * student.in_channels * 4
  feats = feature_pairs * b * li * d * act * 2
  t_peak = 0
  if teacher is not None:
    t_peak = max(_block_work(teacher, x[1], x[2], x[3], txt_len, b, tensor,
                             act, attention, False)
                 for x in _blocks(teacher, li, txt_len))
  return int(saved + max(peak, t_peak) + io + feats)


def block_param_counts(cfg: FluxConfig, params) -> list[int]:
  """Params of every block (a scanned run's stack counts once per layer)."""
  out = []
  for kind, a, b in scan_blocks.block_runs(cfg):
    v = params[scan_blocks.run_name(kind, a, b)]
    n = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(v))
    out += [n // (b - a)] * (b - a)
  return out


def gathered_block_bytes(cfg: FluxConfig, params, compute_dtype: str) -> int:
  """The largest block's params gathered whole in the compute dtype (FSDP)."""
  return max(block_param_counts(cfg, params)) * ITEM_BYTES[compute_dtype]


def _gathered_counts(params, shardings) -> dict:
  """{top-level key: elements per device once 'fsdp' is gathered}: the
  other mesh axes (tensor) still split a gathered tensor."""
  out = {}
  for k, v in params.items():
    leaves = jax.tree.leaves(v)
    shs = ([None] * len(leaves) if shardings is None else jax.tree.leaves(
        shardings[k], is_leaf=lambda s: isinstance(s, NamedSharding)))
    n = 0
    for x, sh in zip(leaves, shs):
      shape = list(x.shape)
      if sh is not None:
        for i, axes in enumerate(sh.spec):
          axes = (axes,) if isinstance(axes, str) else (axes or ())
          for a in axes:
            if a != 'fsdp':
              shape[i] //= sh.mesh.shape[a]
      n += int(math.prod(shape))
    out[k] = n
  return out


def gathered_bytes(cfg: FluxConfig, params, compute_dtype: str,
                   grads: bool, shardings=None) -> int:
  """FSDP's transient whole-tensor copies per device during the step.

  Unrolled blocks (scan_blocks=False): XLA keeps every block's gathered
  params (compute dtype) from the forward to the rematerialised backward,
  and (grads=True) the gradients whole in fp32 before their
  reduce-scatter. With `shardings`, a gathered tensor stays split over
  the mesh axes other than 'fsdp' (tensor). Scanned runs (scan_blocks=True, remat): the loop body
  gathers one layer's slice at a time, so all runs together hold two
  blocks' worth (the current one and the next, prefetched); blocks outside
  a run (a run of one) and the embedders are charged whole, as unrolled.
  Measured on XLA:CPU (tests/test_memory_plan.py); TPU's latency-hiding
  scheduler may free them sooner, so this errs high.
  """
  counts = _gathered_counts(params, shardings)
  n_all = sum(counts.values())
  if cfg.scan_blocks:
    runs = [(scan_blocks.run_name(k, a, b), b - a)
            for k, a, b in scan_blocks.block_runs(cfg) if b - a > 1]
    if runs:
      stacked = sum(counts[name] for name, _ in runs)
      one = max(counts[name] // n for name, n in runs)
      n_all = n_all - stacked + 2 * one
  return n_all * (ITEM_BYTES[compute_dtype] + (4 if grads else 0))

"""Training data for distillation: prompts, teacher targets, a teacher cache.

A data source is any object with `batch(step, process_index=0,
process_count=1) -> dict of numpy arrays` holding this process's rows of the
global batch for `step`. Batches are a pure function of (seed, step), so a
resumed run sees exactly the batches the interrupted one would have seen, with
no iterator state to checkpoint.

Batch keys (B rows, L image tokens, T text tokens):
  txt [B, T, context_in_dim], y [B, vec_in_dim]  prompt embeddings
  noise [B, L, in_channels]                      the trajectory's start x_1
  latents [B, L, in_channels]                    real x_0 (rectified flow)
  traj_x, traj_v [B, n, L, in_channels]          cached teacher trajectory
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import parallel
from nanoflux_jax import pipeline as pipeline_lib
from nanoflux_jax import sampling
from nanoflux_jax.call_args import DEFAULT_GUIDANCE
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.shapes import world as shapes
BUILTIN_PROMPTS = (
    'a photo of a red cat sitting on a blue sofa',
    'a watercolor painting of a lighthouse at dawn',
    'a bowl of ramen with a soft-boiled egg, studio lighting',
    'an astronaut riding a horse on the moon',
    'a cozy wooden cabin in a snowy forest at night',
    'a close-up of a hummingbird drinking from a flower',
    'a futuristic city skyline with flying cars, sunset',
    'a green square to the left of a yellow circle',
    'a corgi wearing sunglasses on a beach',
    'an oil painting of a stormy sea with a small boat',
    'a stack of pancakes with blueberries and syrup',
    'a neon sign that says OPEN in a rainy alley',
)

EmbedFn = Callable[[Sequence[str]], dict]


# ---------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------
def load_prompts(source: str | Sequence[str] = 'builtin') -> list[str]:
  """Prompts from a text file (one per line), JSONL, 'builtin', a list, or
  'shapes:N[:seed]' (the captions of the first N scenes of the shapes world
  with that seed, default 0; 'shapes9:N[:seed]' for the 9-position world).

  JSONL lines are objects with a 'prompt' or 'caption' field. Blank lines are
  skipped.
  Raises:
    FileNotFoundError: the file does not exist (names it).
    ValueError: the file holds no prompts, or a JSONL line has neither field
      (names the file and line).
  """
  if not isinstance(source, str):
    prompts = [str(p) for p in source]
    if not prompts:
      raise ValueError('load_prompts: the prompt list is empty')
    return prompts
  if source == 'builtin':
    return list(BUILTIN_PROMPTS)
  if shapes.parse_source(source):
    return _shapes_captions(source)
  if not os.path.isfile(source):
    raise FileNotFoundError(f'prompt file {source!r} does not exist')
  prompts = []
  with open(source, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if source.endswith(('.jsonl', '.json')):
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{source}:{n}: not JSON: {e}') from e
        text = rec.get('prompt', rec.get('caption')) if isinstance(
            rec, dict) else None
        if not isinstance(text, str):
          raise ValueError(f"{source}:{n}: no 'prompt' or 'caption' field")
        line = text.strip()
      if line:
        prompts.append(line)
  if not prompts:
    raise ValueError(f'prompt file {source!r} contains no prompts')
  return prompts


def _shapes_captions(source: str) -> list[str]:
  world, num, seed = shapes.parse_source(source)  # Raises on a bad N, seed.
  return shapes.ShapesWorld(seed, world=world).captions(num)


def random_embedder(cfg: FluxConfig, txt_len: int, seed: int = 0) -> EmbedFn:
  """A stand-in text encoder: a fixed random embedding per prompt string.

  For tests, benchmarks and toy runs without T5/CLIP weights; the same prompt
  always maps to the same (txt, y). Real runs pass the pipeline's encoder.
  """
  def embed(prompts):
    txt, y = [], []
    for p in prompts:
      h = int.from_bytes(hashlib.sha256(f'{seed}:{p}'.encode()).digest()[:8],
                         'little')
      r = np.random.default_rng(h)
      txt.append(r.standard_normal((txt_len, cfg.context_in_dim), np.float32))
      y.append(r.standard_normal((cfg.vec_in_dim,), np.float32))
    return {'txt': np.stack(txt), 'y': np.stack(y)}
  return embed


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  if global_batch % process_count:
    raise ValueError(f'batch size {global_batch} is not divisible by the '
                     f'{process_count} processes')
  n = global_batch // process_count
  return slice(process_index * n, (process_index + 1) * n)


class PromptData:
  """Prompt embeddings + fresh noise (+ optional real latents) per step.

  Embeddings of all prompts are computed once up front. Each step draws
  prompt indices and noise from an RNG seeded by (seed, step).
  """

  def __init__(self, prompts: Sequence[str], embed_fn: EmbedFn, cfg: FluxConfig,
               grid: tuple[int, int], batch_size: int, seed: int = 0,
               latents: np.ndarray | None = None):
    """latents: optional [N, L, in_channels] real x_0, one per prompt."""
    self.prompts = list(prompts)
    self.emb = {k: np.asarray(v, np.float32)
                for k, v in embed_fn(self.prompts).items()}
    self.cfg, self.grid, self.batch_size, self.seed = cfg, tuple(grid), \
        batch_size, seed
    self.seq_len = grid[0] * grid[1]
    if latents is not None:
      latents = np.asarray(latents, np.float32)
      want = (len(self.prompts), self.seq_len, cfg.in_channels)
      if latents.shape != want:
        raise ValueError(f'PromptData: latents {latents.shape}, expected '
                         f'{want}')
    self.latents = latents

  def batch(self, step: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    b = self.batch_size
    rng = np.random.default_rng([self.seed, step])
    idx = rng.integers(0, len(self.prompts), b)
    noise = rng.standard_normal((b, self.seq_len, self.cfg.in_channels),
                                np.float32)
    out = {'txt': self.emb['txt'][idx], 'y': self.emb['y'][idx],
           'noise': noise}
    if self.latents is not None:
      out['latents'] = self.latents[idx]
    rows = process_rows(b, process_index, process_count)
    return {k: v[rows] for k, v in out.items()}


# ---------------------------------------------------------------------------
# Teacher targets.
# ---------------------------------------------------------------------------
def teacher_trajectory(cfg: FluxConfig, params, noise, txt, y,
                       schedule: Sequence[float], grid: tuple[int, int],
                       guidance: float | None = None):
  """Runs the teacher's Euler sampler, recording every evaluated state.

  Args:
    noise: [B, L, C] x at schedule[0].
    txt, y: prompt embeddings.
    schedule: n + 1 timesteps from 1 to 0.
    guidance: the guidance scale, for a teacher with a guidance embedder
      (None there means DEFAULT_GUIDANCE, FluxPipeline's default); ignored
      otherwise.
  Returns:
    (xs [B, n, L, C] state at schedule[k], vs [B, n, L, C] teacher velocity
    there, x_final [B, L, C] the sample at schedule[-1]), float32.
  """
  g = None
  if cfg.guidance_embed:
    g = jnp.full((noise.shape[0],),
                 DEFAULT_GUIDANCE if guidance is None else guidance,
                 jnp.float32)
  return sampling.trajectory(cfg, params, noise, txt, y, jnp.asarray(
      schedule, jnp.float32), g, img_grid=tuple(grid))


# ---------------------------------------------------------------------------
# Cache of teacher trajectories.
# ---------------------------------------------------------------------------
_META = 'cache_meta.json'


def build_cache(cache_dir: str, data, cfg: FluxConfig, params,
                schedule: Sequence[float], num_shards: int, *,
                guidance: float | None = None) -> 'CachedData':
  """Writes `num_shards` global batches of teacher trajectories, or reuses them.

  Each shard `shard-XXXXX.npz` holds one global batch of `data` (steps 0 ..
  num_shards - 1): txt, y, noise, traj_x, traj_v (and latents if present).
  An existing cache is reused when its metadata matches (one with real
  latents also serves data without them: the loss then ignores them); a
  mismatching one raises rather than being silently overwritten.
  """
  meta = {'teacher': json.loads(cfg.to_json()),
          'schedule': [float(t) for t in schedule], 'grid': list(data.grid),
          'batch_size': data.batch_size, 'seed': data.seed,
          'num_shards': num_shards, 'num_prompts': len(data.prompts),
          'latents': getattr(data, 'latents', None) is not None}
  if guidance is not None:  # Teachers with a guidance embedder only.
    meta['guidance'] = float(guidance)
  meta_file = os.path.join(cache_dir, _META)
  if os.path.isfile(meta_file):
    with open(meta_file) as f:
      old = json.load(f)
    meta = json.loads(json.dumps(meta))  # Tuples -> lists, as on disk.
    if old.get('latents') and not meta['latents']:
      meta['latents'] = True
    if old != meta:
      diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
      raise ValueError(f'teacher cache {cache_dir!r} was built with other '
                       f'settings ({", ".join(diff)} differ); delete it or '
                       'choose another cache_dir')
    return CachedData(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  traj = jax.jit(lambda p, n, t, y: teacher_trajectory(
      cfg, p, n, t, y, schedule, data.grid, guidance))
  if jax.process_index() == 0:
    for i in range(num_shards):
      b = data.batch(i)
      xs, vs, _ = traj(params, b['noise'], b['txt'], b['y'])
      arrays = dict(b, traj_x=np.asarray(xs), traj_v=np.asarray(vs))
      tmp = os.path.join(cache_dir, f'.shard-{i:05d}.tmp.npz')
      np.savez(tmp, **arrays)
      os.replace(tmp, os.path.join(cache_dir, f'shard-{i:05d}.npz'))
    with open(meta_file, 'w') as f:  # Written last: marks a complete cache.
      json.dump(meta, f, indent=2)
  return CachedData(cache_dir)


class CachedData:
  """Reads a cache written by `build_cache`; step s uses shard s mod n."""

  def __init__(self, cache_dir: str):
    self.files = sorted(glob.glob(os.path.join(cache_dir, 'shard-*.npz')))
    if not self.files:
      raise FileNotFoundError(f'teacher cache {cache_dir!r} has no shards')
    self._loaded = (None, None)

  def batch(self, step: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    file = self.files[step % len(self.files)]
    if self._loaded[0] != file:
      with np.load(file) as z:
        self._loaded = (file, {k: z[k] for k in z.files})
    arrays = self._loaded[1]
    rows = process_rows(len(arrays['noise']), process_index, process_count)
    return {k: v[rows] for k, v in arrays.items()}


def to_global(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over (data, fsdp).

  On one host this is a device_put; on many, each process passes only the
  rows it loaded (`batch(step, jax.process_index(), jax.process_count())`).
  """
  return {k: jax.make_array_from_process_local_data(
      parallel.batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


# ---------------------------------------------------------------------------
# Text-encoder distillation data: token ids, a pooled vector, fresh noise.
# ---------------------------------------------------------------------------
def random_tokens(num: int, length: int, vocab_size: int, seed: int = 0,
                  pad_id: int = 0, eos_id: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Stand-in tokenised prompts for toy runs: random ids, EOS, then padding.

  Returns:
    (ids [num, length] int32, mask [num, length] int32), lengths (EOS
    included) uniform in [max(2, length // 4), length].
  """
  if vocab_size <= max(pad_id, eos_id) + 1:
    raise ValueError(f'random_tokens: vocab_size={vocab_size} too small')
  r = np.random.default_rng(seed)
  lo = min(length, max(2, length // 4))
  lens = r.integers(lo, length + 1, num)
  ids = r.integers(max(pad_id, eos_id) + 1, vocab_size, (num, length))
  pos = np.arange(length)[None]
  ids = np.where(pos == lens[:, None] - 1, eos_id, ids)
  ids = np.where(pos >= lens[:, None], pad_id, ids).astype(np.int32)
  return ids, (pos < lens[:, None]).astype(np.int32)


def tokenize(tokenizer, prompts: Sequence[str],
             length: int) -> tuple[np.ndarray, np.ndarray]:
  """HF T5 tokenizer -> (ids, mask) [N, length] int32, padded/truncated."""
  out = tokenizer(list(prompts), padding='max_length', max_length=length,
                  truncation=True)
  return (np.asarray(out['input_ids'], np.int32),
          np.asarray(out['attention_mask'], np.int32))


def pipeline_tokens(pipe, prompts: Sequence[str], length: int,
                    chunk: int = 64) -> dict[str, np.ndarray]:
  """{'ids', 'mask', 'y'} from a FluxPipeline: T5 ids as the pipeline
  tokenizes them and the pooled CLIP vector the denoiser is conditioned on."""
  ids, clip_ids = pipe.tokenize(prompts, length)
  pad = pipe.tokenizer_2.pad_token_id
  y = np.concatenate([
      np.asarray(pipeline_lib.clip_pooled(
          pipe.clip_cfg, pipe.clip_params, clip_ids[i:i + chunk]))
      for i in range(0, len(clip_ids), chunk)])
  return {'ids': ids, 'mask': (ids != pad).astype(np.int32), 'y': y}


def random_pooled(num: int, dim: int, seed: int = 0) -> np.ndarray:
  """A fixed stand-in pooled CLIP vector per row [num, dim] (toy runs)."""
  h = int.from_bytes(hashlib.sha256(f'pooled:{seed}'.encode()).digest()[:8],
                     'little')
  return np.random.default_rng(h).standard_normal((num, dim)).astype(
      np.float32)


class TokenData:
  """Rows of (ids, mask, y) plus fresh noise; batch(step) is a pure function
  of (seed, step), so a resumed run sees the batches it would have seen."""

  def __init__(self, ids: np.ndarray, mask: np.ndarray, y: np.ndarray,
               grid: tuple[int, int], in_channels: int, batch_size: int,
               seed: int = 0):
    """ids, mask: [N, T]; y: [N, vec]; grid: packed token grid (h, w)."""
    self.ids = np.asarray(ids, np.int32)
    self.mask = np.asarray(mask, np.int32)
    self.y = np.asarray(y, np.float32)
    n = len(self.ids)
    if n == 0:
      raise ValueError('TokenData: no token rows')
    if self.mask.shape != self.ids.shape or self.ids.ndim != 2:
      raise ValueError(f'TokenData: ids {self.ids.shape} and mask '
                       f'{self.mask.shape} must be equal [N, T] shapes')
    if self.y.ndim != 2 or len(self.y) != n:
      raise ValueError(f'TokenData: y {self.y.shape}, expected ({n}, vec)')
    self.grid, self.in_channels = tuple(grid), in_channels
    self.batch_size, self.seed = batch_size, seed

  def batch(self, step: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    b = self.batch_size
    rng = np.random.default_rng([self.seed, step])
    idx = rng.integers(0, len(self.ids), b)
    noise = rng.standard_normal(
        (b, self.grid[0] * self.grid[1], self.in_channels), np.float32)
    out = {'ids': self.ids[idx], 'mask': self.mask[idx], 'y': self.y[idx],
           'noise': noise}
    rows = process_rows(b, process_index, process_count)
    return {k: v[rows] for k, v in out.items()}

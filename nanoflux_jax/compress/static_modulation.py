"""Static modulation (Static-LN): AdaLN linears -> per-timestep tables.

FLUX computes every block's shift/scale/gate vectors as Linear(SiLU(vec)) with
vec = time_in(t) + vector_in(pooled CLIP) (+ guidance_in(g)). For a fixed
sampling schedule t takes S known values, so each block's modulation can be
replaced by a table [S, n, D] indexed by the step. The tables are initialised
with the teacher's modulation at each timestep averaged over calibration
pooled vectors; with one pooled vector they reproduce the teacher exactly for
that prompt. The D -> n*D linears (~3.2B of schnell's 11.9B parameters) and
the embedders time_in / vector_in / guidance_in are dropped.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.compress import counting
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import flux as flux_model
from nanoflux_jax.models import layers
from nanoflux_jax.models import sharding

Array = jax.Array


def _mod_paths(cfg: FluxConfig) -> list[tuple[tuple[str, ...], int]]:
  """(param path of each Modulation module, n) in the model."""
  out = [(('final_mod',), 2)]
  for i in range(cfg.depth):
    out += [((f'double_blocks_{i}', f'{s}_mod'), 6) for s in ('img', 'txt')]
  out += [((f'single_blocks_{j}', 'modulation'), 3)
          for j in range(cfg.depth_single_blocks)]
  return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  """Copy of nested dict `tree` with tree[path] = value."""
  tree = dict(tree)
  if len(path) == 1:
    tree[path[0]] = value
  else:
    tree[path[0]] = _set(tree[path[0]], path[1:], value)
  return tree


def adaln_vec(cfg: FluxConfig, params: dict, timesteps: Array, y: Array,
              guidance: Array | None = None) -> Array:
  """The teacher's conditioning vector [B, D] (before each block's SiLU).

  Uses the model's own embedder modules, so the values are bit-identical to
  those inside `Flux.__call__`.
  """
  dtype, _ = layers.dtypes(cfg)
  emb = lambda name, x: flux_model.MLPEmbedder(cfg).apply(
      {'params': params[name]}, x.astype(dtype))
  vec = emb('time_in', layers.timestep_embedding(timesteps, 256))
  if cfg.guidance_embed:
    vec = vec + emb('guidance_in', layers.timestep_embedding(guidance, 256))
  return vec + emb('vector_in', y)


def to_static_modulation(cfg: FluxConfig, params: dict,
                         timesteps: Sequence[float], calib_pooled: Array,
                         guidance: float | None = None
                         ) -> tuple[FluxConfig, dict]:
  """Replaces AdaLN modulation by per-timestep tables.

  Args:
    cfg: an 'adaln' config; params: its params.
    timesteps: the S timesteps the student will be sampled at (e.g. schnell's
      4-step schedule without the final 0: [1.0, 0.75, 0.5, 0.25]).
    calib_pooled: [N, vec_in_dim] pooled text vectors to average over.
    guidance: the fixed guidance scale, required for guidance-distilled
      (dev-like) models; it is baked into the tables.
  Returns:
    (static_cfg, static_params): modulation='static', static_timesteps set,
    guidance_embed=False (baked in); each `<mod>/lin` replaced by
    `<mod>/table` [S, n, D]; time_in, vector_in, guidance_in removed.
  """
  if cfg.modulation != 'adaln':
    raise ValueError(f'to_static_modulation: config modulation is '
                     f'{cfg.modulation!r}, expected an adaln model')
  ts = tuple(float(t) for t in timesteps)
  if not ts:
    raise ValueError('to_static_modulation: timesteps is empty')
  pooled = jnp.asarray(calib_pooled)
  if pooled.ndim != 2 or pooled.shape[1] != cfg.vec_in_dim:
    raise ValueError(f'to_static_modulation: calib_pooled has shape '
                     f'{tuple(pooled.shape)}, expected [N, {cfg.vec_in_dim}]')
  if cfg.guidance_embed and guidance is None:
    raise ValueError('to_static_modulation: this model has a guidance '
                     'embedder; pass the fixed guidance= scale')
  n = pooled.shape[0]
  s = len(ts)
  # Every (timestep, pooled vector) pair in one batch [S*N].
  t_all = jnp.repeat(jnp.asarray(ts, jnp.float32), n)
  y_all = jnp.tile(pooled, (s, 1))
  g_all = (jnp.full((s * n,), guidance, jnp.float32)
           if cfg.guidance_embed else None)
  vec = adaln_vec(cfg, params, t_all, y_all, g_all)
  _, param_dtype = layers.dtypes(cfg)
  new = {k: v for k, v in params.items()
         if k not in ('time_in', 'vector_in', 'guidance_in')}
  for path, k in _mod_paths(cfg):
    mods = flux_model.Modulation(cfg, k).apply(
        {'params': _get(params, path)}, vec)           # k x [S*N, 1, D]
    out = jnp.concatenate(mods, axis=1)                 # [S*N, k, D]
    table = out.reshape(s, n, k, -1).astype(jnp.float32).mean(axis=1)
    new = _set(new, path, {'table': table.astype(param_dtype)})
  static_cfg = cfg.replace(modulation='static', static_timesteps=ts,
                           guidance_embed=False)
  # Sharded params: the tables were computed on their devices; lay them out
  # by the rules like every other param.
  return static_cfg, sharding.place_flux(static_cfg, new,
                                         parallel.mesh_of(params))


def removed_params(cfg: FluxConfig, num_steps: int = 4) -> int:
  """Parameters static modulation removes from `cfg` (net of the tables)."""
  # A count depends on the tables' row count only, not on the resolution
  # the schedule is shifted for.
  rows = sampling.schedule_for(cfg, num_steps, image_seq_len=1024)[:-1]
  static = cfg.replace(modulation='static', guidance_embed=False,
                       static_timesteps=tuple(rows))
  return counting.count_params(cfg) - counting.count_params(static)

"""Keep-masks over heads, MLP channels and blocks; soft masking and slicing.

A `PruneMask` holds one keep-vector per prunable unit group:
  double_heads[i]    [H_i]  heads of double block i (shared by its img and txt
                            streams: their attention is joint)
  double_mlp_img[i]  [M_i]  img MLP channels of double block i
  double_mlp_txt[i]  [M_i]  txt MLP channels of double block i
  single_heads[j]    [H_j]  heads of single block j
  single_mlp[j]      [M_j]  MLP channels of single block j
  double_blocks      [depth]               keep flag of each double block
  single_blocks      [depth_single_blocks] keep flag of each single block
The same pytree of floats holds sensitivity scores.

`apply_masks` multiplies weights by the mask (same shapes, differentiable in
the mask: its gradient at 1 is the first-order Taylor score). `prune` slices
the kept units out into a smaller `FluxConfig` with per-block widths; for a
0/1 mask the two models compute the same function.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import sharding

Array = Any  # jax or numpy array.
_UNIT_FIELDS = ('double_heads', 'double_mlp_img', 'double_mlp_txt',
                'single_heads', 'single_mlp')


@flax.struct.dataclass
class PruneMask:
  """Keep-masks (or scores) for every prunable unit; a jax pytree."""
  double_heads: tuple
  double_mlp_img: tuple
  double_mlp_txt: tuple
  single_heads: tuple
  single_mlp: tuple
  double_blocks: Array
  single_blocks: Array

  @classmethod
  def full(cls, cfg: FluxConfig, value: float = 1.0,
           dtype=jnp.float32) -> 'PruneMask':
    """A mask of `cfg`'s shapes filled with `value`."""
    vec = lambda n: jnp.full((n,), value, dtype)
    return cls(*(tuple(vec(n) for n in getattr(cfg, f)) for f in _UNIT_FIELDS),
               double_blocks=vec(cfg.depth),
               single_blocks=vec(cfg.depth_single_blocks))

  @classmethod
  def ones(cls, cfg: FluxConfig) -> 'PruneMask':
    """Keep everything."""
    return cls.full(cfg, 1.0)

  def check(self, cfg: FluxConfig) -> 'PruneMask':
    """Raises ValueError naming the first field whose shape does not fit."""
    for f in _UNIT_FIELDS:
      got = tuple(np.shape(v)[0] if np.ndim(v) == 1 else np.shape(v)
                  for v in getattr(self, f))
      if got != getattr(cfg, f):
        raise ValueError(f'PruneMask.{f} has sizes {got} but the config has '
                         f'{getattr(cfg, f)}')
    for f, n in (('double_blocks', cfg.depth),
                 ('single_blocks', cfg.depth_single_blocks)):
      if np.shape(getattr(self, f)) != (n,):
        raise ValueError(f'PruneMask.{f} has shape {np.shape(getattr(self, f))}'
                         f', expected ({n},)')
    return self


# ----------------------------------------------------------------------------
# Soft masking.
# ----------------------------------------------------------------------------
def _mask_attn(p: dict, heads: Array) -> dict:
  """Zeroes q/k/v (kernel [D,3,H,Dh], bias [3,H,Dh]) and proj rows [H,Dh,D]."""
  p = dict(p)
  qkv = dict(p['qkv'])
  qkv['kernel'] = qkv['kernel'] * heads[None, None, :, None].astype(
      qkv['kernel'].dtype)
  if 'bias' in qkv:
    qkv['bias'] = qkv['bias'] * heads[None, :, None].astype(qkv['bias'].dtype)
  proj = dict(p['proj'])
  proj['kernel'] = proj['kernel'] * heads[:, None, None].astype(
      proj['kernel'].dtype)
  p['qkv'], p['proj'] = qkv, proj
  return p


def _mask_in(p: dict, m: Array) -> dict:
  """Zeroes output channels of a Dense (kernel [D, M], bias [M])."""
  p = dict(p)
  p['kernel'] = p['kernel'] * m[None].astype(p['kernel'].dtype)
  if 'bias' in p:
    p['bias'] = p['bias'] * m.astype(p['bias'].dtype)
  return p


def _mask_out(p: dict, m: Array) -> dict:
  """Zeroes input rows of a Dense (kernel [M, D]); its bias stays."""
  p = dict(p)
  p['kernel'] = p['kernel'] * m[:, None].astype(p['kernel'].dtype)
  return p


def _mask_gates(p: dict, gates: tuple[int, ...], keep: Array) -> dict:
  """Scales modulation rows `gates` by keep (adaln lin [D,n,D]/[n,D], or the
  static table [S,n,D]). A zero gate makes the block's residual add zero, so
  a dropped block is exactly the identity."""
  p = dict(p)
  if 'table' in p:
    n = p['table'].shape[1]
    row = jnp.ones((n,), p['table'].dtype).at[jnp.array(gates)].set(keep)
    p['table'] = p['table'] * row[None, :, None]
    return p
  lin = dict(p['lin'])
  n = lin['bias'].shape[0]
  row = jnp.ones((n,), lin['kernel'].dtype).at[jnp.array(gates)].set(keep)
  lin['kernel'] = lin['kernel'] * row[None, :, None]
  lin['bias'] = lin['bias'] * row[:, None]
  p['lin'] = lin
  return p


def apply_masks(params: dict, mask: PruneMask, cfg: FluxConfig) -> dict:
  """Soft-masks `params`: same shapes, masked units' weights multiplied by 0.

  Heads: q/k/v kernel and bias slices and proj rows. MLP channels: fc1 (or
  mlp_in) columns and bias, fc2 (or mlp_out) rows. Blocks: the modulation
  gate rows (double: img/txt gates 2 and 5; single: gate 2), so a dropped
  block adds nothing to its residual stream. Differentiable in `mask`.
  """
  mask.check(cfg)
  params = dict(params)
  for i in range(cfg.depth):
    name = f'double_blocks_{i}'
    b = dict(params[name])
    heads, keep = mask.double_heads[i], mask.double_blocks[i]
    for s, m in (('img', mask.double_mlp_img[i]),
                 ('txt', mask.double_mlp_txt[i])):
      b[f'{s}_attn'] = _mask_attn(b[f'{s}_attn'], heads)
      mlp = dict(b[f'{s}_mlp'])
      mlp['fc1'], mlp['fc2'] = _mask_in(mlp['fc1'], m), _mask_out(mlp['fc2'], m)
      b[f'{s}_mlp'] = mlp
      b[f'{s}_mod'] = _mask_gates(b[f'{s}_mod'], (2, 5), keep)
    params[name] = b
  for j in range(cfg.depth_single_blocks):
    name = f'single_blocks_{j}'
    b = dict(params[name])
    m = mask.single_mlp[j]
    b['attn'] = _mask_attn(b['attn'], mask.single_heads[j])
    b['mlp_in'], b['mlp_out'] = _mask_in(b['mlp_in'], m), _mask_out(
        b['mlp_out'], m)
    b['modulation'] = _mask_gates(b['modulation'], (2,), mask.single_blocks[j])
    params[name] = b
  return params


# ----------------------------------------------------------------------------
# Structural pruning.
# ----------------------------------------------------------------------------
def _keep_index(v, what: str, min_keep: int = 0) -> np.ndarray:
  v = np.asarray(v)
  if not np.all((v == 0) | (v == 1)):
    raise ValueError(f'prune: {what} mask must be 0/1, got values '
                     f'{np.unique(v)[:5]}')
  idx = np.nonzero(v > 0.5)[0]
  if len(idx) < min_keep:
    raise ValueError(f'prune: {what} keeps {len(idx)} units; at least '
                     f'{min_keep} needed')
  return idx


def _slice_attn(p: dict, h: np.ndarray) -> dict:
  out = {'qkv': {'kernel': p['qkv']['kernel'][:, :, h]},
         'proj': {'kernel': p['proj']['kernel'][h], 'bias': p['proj']['bias']},
         # QK-norm scales act per head_dim channel, shared by all heads.
         'query_norm': p['query_norm'], 'key_norm': p['key_norm']}
  if 'bias' in p['qkv']:
    out['qkv']['bias'] = p['qkv']['bias'][:, h]
  return out


def _slice_in(p: dict, m: np.ndarray) -> dict:
  out = {'kernel': p['kernel'][:, m]}
  if 'bias' in p:
    out['bias'] = p['bias'][m]
  return out


def remap_downsample(cfg: FluxConfig, keep_blocks: np.ndarray) -> dict:
  """New (downsample_start, downsample_end) after keeping global blocks
  `keep_blocks` (sorted indices); raises if no kept block is in the range."""
  if cfg.downsample_start is None:
    return {}
  inside = [n for n, g in enumerate(keep_blocks)
            if cfg.downsample_start <= g <= cfg.downsample_end]
  if not inside:
    raise ValueError(
        f'prune: every block of the down-sampled range [{cfg.downsample_start}'
        f', {cfg.downsample_end}] is removed; keep at least one')
  return dict(downsample_start=inside[0], downsample_end=inside[-1])


def prune(cfg: FluxConfig, params: dict, mask: PruneMask
          ) -> tuple[FluxConfig, dict]:
  """Slices the kept units (mask == 1) out into a smaller model.

  Args:
    cfg: the model's config; params: its (unboxed) params.
    mask: a 0/1 `PruneMask` of cfg's shapes (concrete values, not traced).
  Returns:
    (new_cfg, new_params): per-block widths, dropped blocks removed and the
    remaining ones renumbered; the down-sampler range is remapped. Its output
    equals `apply_masks(params, mask, cfg)`'s up to float rounding.
  """
  mask.check(cfg)
  # Nothing is copied to a host: numpy params are sliced on the host, jax
  # arrays on their devices (sharded params: a device gather of one tensor
  # at a time, then laid out on the same mesh by the rules), and tracers
  # pass, so `jax.eval_shape` can prune a model that only exists as shapes.
  mesh = parallel.mesh_of(params)
  keep_d = _keep_index(mask.double_blocks, 'double_blocks')
  keep_s = _keep_index(mask.single_blocks, 'single_blocks')
  out = {k: v for k, v in params.items()
         if not k.startswith(('double_blocks_', 'single_blocks_'))}
  widths = {f: [] for f in _UNIT_FIELDS}
  for n, i in enumerate(keep_d):
    b = params[f'double_blocks_{i}']
    h = _keep_index(mask.double_heads[i], f'double_heads[{i}]', 1)
    nb = {f'{s}_mod': b[f'{s}_mod'] for s in ('img', 'txt')}
    widths['double_heads'].append(len(h))
    for s in ('img', 'txt'):
      m = _keep_index(getattr(mask, f'double_mlp_{s}')[i],
                      f'double_mlp_{s}[{i}]', 1)
      widths[f'double_mlp_{s}'].append(len(m))
      nb[f'{s}_attn'] = _slice_attn(b[f'{s}_attn'], h)
      nb[f'{s}_mlp'] = {'fc1': _slice_in(b[f'{s}_mlp']['fc1'], m),
                        'fc2': {'kernel': b[f'{s}_mlp']['fc2']['kernel'][m],
                                'bias': b[f'{s}_mlp']['fc2']['bias']}}
    out[f'double_blocks_{n}'] = nb
  for n, j in enumerate(keep_s):
    b = params[f'single_blocks_{j}']
    h = _keep_index(mask.single_heads[j], f'single_heads[{j}]', 1)
    m = _keep_index(mask.single_mlp[j], f'single_mlp[{j}]', 1)
    widths['single_heads'].append(len(h))
    widths['single_mlp'].append(len(m))
    out[f'single_blocks_{n}'] = {
        'modulation': b['modulation'], 'attn': _slice_attn(b['attn'], h),
        'mlp_in': _slice_in(b['mlp_in'], m),
        'mlp_out': {'kernel': b['mlp_out']['kernel'][m]}}
  keep_global = np.concatenate([keep_d, cfg.depth + keep_s])
  new_cfg = cfg.replace(depth=len(keep_d), depth_single_blocks=len(keep_s),
                        **{f: tuple(v) for f, v in widths.items()},
                        **remap_downsample(cfg, keep_global))
  return new_cfg, sharding.place_flux(new_cfg, jax.tree.map(jnp.asarray, out),
                                      mesh)

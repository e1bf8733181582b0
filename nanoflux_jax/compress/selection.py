"""Turning sensitivity scores into a keep-mask.

Ratios keep the highest-scoring units, either ranked over all blocks at once
(scope='global') or per block (scope='block'); a block always keeps at least
one head and one MLP channel (pruning a block away is done with its keep
flag). `target_params` then removes the lowest-scoring remaining units until
the pruned model has at most that many parameters.
"""
from __future__ import annotations

import numpy as np

from nanoflux_jax.compress import counting
from nanoflux_jax.compress.masks import PruneMask
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import downsample

_HEADS = ('double_heads', 'single_heads')
_MLPS = ('double_mlp_img', 'double_mlp_txt', 'single_mlp')


def _check_ratio(name: str, r):
  if r is not None and not 0 < r <= 1:
    raise ValueError(f'select: {name}={r} must be a fraction in (0, 1]')


def _keep_ratio(groups: list[np.ndarray], ratio: float, scope: str,
                what: str) -> list[np.ndarray]:
  """0/1 keep vectors keeping the top `ratio` of units (>= 1 per group)."""
  if any(np.isnan(g).any() for g in groups):
    raise ValueError(f'select: {what} scores contain NaN (the criterion does '
                     f'not score {what}; e.g. block_io scores blocks only)')
  keep = [np.zeros(len(g), np.float32) for g in groups]
  if scope == 'block':
    for g, k in zip(groups, keep):
      k[np.argsort(-g, kind='stable')[:max(1, round(ratio * len(g)))]] = 1
  elif scope == 'global':
    flat = np.concatenate(groups)
    owner = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    pos = np.concatenate([np.arange(len(g)) for g in groups])
    for u in np.argsort(-flat, kind='stable')[:round(ratio * len(flat))]:
      keep[owner[u]][pos[u]] = 1
    for g, k in zip(groups, keep):  # never empty a block.
      if not k.any():
        k[np.argmax(g)] = 1
  else:
    raise ValueError(f"select: scope={scope!r}; expected 'global' or 'block'")
  return keep


def _keep_blocks(scores: PruneMask, cfg: FluxConfig, keep_blocks):
  s = np.concatenate([np.asarray(scores.double_blocks, np.float64),
                      np.asarray(scores.single_blocks, np.float64)])
  n = len(s)
  if isinstance(keep_blocks, float):
    _check_ratio('keep_blocks', keep_blocks)
    keep_blocks = max(1, round(keep_blocks * n))
  if not 1 <= keep_blocks <= n:
    raise ValueError(f'select: keep_blocks={keep_blocks} must be in [1, {n}]')
  if np.isnan(s).any():
    raise ValueError('select: block scores contain NaN')
  keep = np.zeros(n, np.float32)
  keep[np.argsort(-s, kind='stable')[:keep_blocks]] = 1
  return keep[:cfg.depth], keep[cfg.depth:]


def _params_of(cfg: FluxConfig, m: PruneMask) -> int:
  kd, ks = np.asarray(m.double_blocks) > 0, np.asarray(m.single_blocks) > 0
  w = lambda f, keep: tuple(int(np.sum(v)) for v, k in
                            zip(getattr(m, f), keep) if k)
  return counting.count_params(cfg.replace(
      depth=int(kd.sum()), depth_single_blocks=int(ks.sum()),
      double_heads=w('double_heads', kd),
      double_mlp_img=w('double_mlp_img', kd),
      double_mlp_txt=w('double_mlp_txt', kd),
      single_heads=w('single_heads', ks), single_mlp=w('single_mlp', ks),
      downsample_start=None, downsample_end=None)
  ) + downsample.num_params(cfg)


def _unit_costs(cfg: FluxConfig) -> dict[str, int]:
  d, hd = cfg.hidden_size, cfg.head_dim
  head = d * 3 * hd + (3 * hd if cfg.qkv_bias else 0) + hd * d
  return dict(double_heads=2 * head, single_heads=head,
              double_mlp_img=2 * d + 1, double_mlp_txt=2 * d + 1,
              single_mlp=2 * d + 1)


def _reach_target(cfg, scores, mask, target: int) -> PruneMask:
  """Greedily drops the lowest-scoring kept units until <= target params."""
  kd = np.asarray(mask.double_blocks) > 0
  ks = np.asarray(mask.single_blocks) > 0
  fields = {f: [np.array(v) for v in getattr(mask, f)] for f in _HEADS + _MLPS}
  cands = []
  for f in _HEADS + _MLPS:
    alive = kd if f.startswith('double') else ks
    for b, (sc, k) in enumerate(zip(getattr(scores, f), fields[f])):
      if alive[b]:
        sc = np.asarray(sc, np.float64)
        if np.isnan(sc).any():
          raise ValueError(f'select: {f} scores contain NaN; target_params '
                           'needs head and MLP scores')
        cands += [(sc[u], f, b, u) for u in np.nonzero(k)[0]]
  cands.sort(key=lambda c: c[0])
  cost = _unit_costs(cfg)
  total = _params_of(cfg, mask)
  for _, f, b, u in cands:
    if total <= target:
      break
    if fields[f][b].sum() > 1:
      fields[f][b][u] = 0
      total -= cost[f]
  if total > target:
    raise ValueError(f'select: target_params={target} is unreachable; the '
                     f'smallest model with these blocks has {total} params')
  return mask.replace(**{f: tuple(v) for f, v in fields.items()})


def select(cfg: FluxConfig, scores: PruneMask, keep_heads: float | None = None,
           keep_mlp: float | None = None,
           keep_blocks: int | float | None = None,
           scope: str = 'global', target_params: int | None = None
           ) -> PruneMask:
  """A 0/1 numpy `PruneMask` keeping the highest-scoring units.

  Args:
    scores: from `sensitivity` (low = least important).
    keep_heads, keep_mlp: fraction of heads / MLP channels to keep (None:
      all), ranked over all blocks (scope='global') or in each block
      (scope='block'); a double block's img and txt MLPs are separate groups.
    keep_blocks: number (int) or fraction (float) of blocks to keep, ranked
      by the block scores over double and single blocks together.
    target_params: afterwards remove the lowest-scoring heads/channels until
      `count_params` of the pruned model is at most this.
  """
  scores.check(cfg)
  _check_ratio('keep_heads', keep_heads)
  _check_ratio('keep_mlp', keep_mlp)
  out = {}
  for fields, ratio, what in ((_HEADS, keep_heads, 'head'),
                              (_MLPS, keep_mlp, 'MLP')):
    groups = [np.asarray(v, np.float64) for f in fields
              for v in getattr(scores, f)]
    keep = ([np.ones(len(g), np.float32) for g in groups] if ratio is None
            else _keep_ratio(groups, ratio, scope, what))
    for f in fields:
      n = len(getattr(cfg, f))
      out[f], keep = tuple(keep[:n]), keep[n:]
  if keep_blocks is None:
    out['double_blocks'] = np.ones(cfg.depth, np.float32)
    out['single_blocks'] = np.ones(cfg.depth_single_blocks, np.float32)
  else:
    out['double_blocks'], out['single_blocks'] = _keep_blocks(
        scores, cfg, keep_blocks)
  mask = PruneMask(**out)
  if target_params is not None:
    mask = _reach_target(cfg, scores, mask, int(target_params))
  return mask

"""Depth compression: remove blocks, optionally merging them into neighbours.

`remove_blocks(cfg, params, keep)` is `prune` with only block keep flags.
With `merge=True` every removed block is first averaged into the nearest kept
block of the same kind (double or single; ties go to the earlier one), so a
kept block starts as the mean of itself and the blocks it replaces — a better
initialisation for distillation than dropping them outright.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax.compress.masks import PruneMask, prune
from nanoflux_jax.configs import FluxConfig


def _keep_flags(cfg: FluxConfig, keep) -> np.ndarray:
  n = cfg.num_blocks
  keep = np.asarray(keep)
  if keep.dtype == bool:
    if keep.shape != (n,):
      raise ValueError(f'remove_blocks: boolean keep has shape {keep.shape}, '
                       f'expected ({n},)')
    return keep
  idx = keep.astype(int).ravel()
  bad = [int(i) for i in idx if not 0 <= i < n]
  if bad:
    raise ValueError(f'remove_blocks: block indices {bad} not in [0, {n - 1}]')
  flags = np.zeros(n, bool)
  flags[idx] = True
  return flags


def _merge_into(kept: Sequence[int], removed: Sequence[int]) -> dict:
  """kept block -> [itself + removed blocks nearest to it]."""
  groups = {k: [k] for k in kept}
  for r in removed:
    if kept:
      groups[min(kept, key=lambda k: (abs(k - r), k))].append(r)
  return groups


def remove_blocks(cfg: FluxConfig, params: dict, keep,
                  merge: bool = False) -> tuple[FluxConfig, dict]:
  """Keeps the global blocks `keep` (indices, or a [num_blocks] bool array).

  Global indices run over double blocks first, then single blocks. With
  `merge`, each kept block's params become the mean over itself and the
  removed blocks of its kind closest to it (all must have equal widths).
  """
  flags = _keep_flags(cfg, keep)
  params = dict(params)
  if merge:
    for kind, lo, n, width in (
        ('double_blocks', 0, cfg.depth,
         lambda i: (cfg.double_heads[i], cfg.double_mlp_img[i],
                    cfg.double_mlp_txt[i])),
        ('single_blocks', cfg.depth, cfg.depth_single_blocks,
         lambda i: (cfg.single_heads[i], cfg.single_mlp[i]))):
      kept = [i for i in range(n) if flags[lo + i]]
      removed = [i for i in range(n) if not flags[lo + i]]
      for k, members in _merge_into(kept, removed).items():
        if len(members) == 1:
          continue
        widths = {m: width(m) for m in members}
        if len(set(widths.values())) > 1:
          raise ValueError(f'remove_blocks: cannot merge {kind} {members} '
                           f'with different widths {widths}')
        trees = [params[f'{kind}_{m}'] for m in members]
        # On the params' devices (sharded params stay sharded).
        params[f'{kind}_{k}'] = jax.tree.map(
            lambda *xs: (sum(jnp.asarray(x, jnp.float32) for x in xs) /
                         len(xs)).astype(xs[0].dtype), *trees)
  mask = PruneMask.ones(cfg).replace(
      double_blocks=flags[:cfg.depth].astype(np.float32),
      single_blocks=flags[cfg.depth:].astype(np.float32))
  return prune(cfg, params, mask)

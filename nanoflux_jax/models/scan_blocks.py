"""Scanned runs of identical blocks (FluxConfig.scan_blocks).

With `scan_blocks`, consecutive blocks of one kind and the same widths form
a run whose params are stacked on a leading 'layers' axis and which runs as
one lax.scan (`scanned`): one block body to compile per run. `scan_params`
/ `unscan_params` convert between that layout and the unrolled one (one
`{kind}_blocks_{i}` per block) that the loaders and `save_bfl` use.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanoflux_jax.configs import FluxConfig


def block_runs(cfg: FluxConfig) -> list[tuple[str, int, int]]:
  """The blocks as runs (kind, start, stop): 'double' runs first, in order.

  Without `scan_blocks` every block is its own run. With it, consecutive
  blocks of one kind with the same widths (heads, MLP widths) form a run,
  scanned when it has more than one block. The down-sampler's coarse range
  [downsample_start, downsample_end] is its own run(s): runs break before
  its first block (tokens go down before it) and after its last (they go
  back up after it), so `Flux` resamples between runs.
  """
  ds = cfg.downsample_start, cfg.downsample_end
  kinds = (('double', 0, tuple(zip(cfg.double_heads, cfg.double_mlp_img,
                                   cfg.double_mlp_txt))),
           ('single', cfg.depth, tuple(zip(cfg.single_heads,
                                           cfg.single_mlp))))
  runs = []
  for kind, offset, widths in kinds:
    for i, w in enumerate(widths):
      joins = (cfg.scan_blocks and runs and runs[-1][0] == kind and
               runs[-1][2] == i and widths[i - 1] == w and
               offset + i != ds[0] and offset + i - 1 != ds[1])
      if joins:
        runs[-1] = (kind, runs[-1][1], i + 1)
      else:
        runs.append((kind, i, i + 1))
  return runs


def run_name(kind: str, start: int, stop: int) -> str:
  """Param name of a run: 'double_blocks_3' alone, 'double_blocks_0_to_18'
  (params stacked on a leading axis) when scanned."""
  if stop - start == 1:
    return f'{kind}_blocks_{start}'
  return f'{kind}_blocks_{start}_to_{stop - 1}'


def maybe_remat(block, cfg: FluxConfig, **kw):
  """`block` under nn.remat with cfg.remat_policy, when cfg.remat."""
  if not cfg.remat:
    return block
  return nn.remat(block, policy=getattr(jax.checkpoint_policies,
                                        cfg.remat_policy), **kw)


def scanned(block, cfg: FluxConfig, length: int):
  """`block` whose `scan_step` runs `length` times in a lax.scan (params
  stacked on a leading 'layers' axis, one RNG per layer at init)."""
  # prevent_cse=False: inside a scan the loop already keeps XLA from CSE-ing
  # the recomputation into the forward (as flax recommends).
  body = maybe_remat(block, cfg, prevent_cse=False, methods=['scan_step'])
  return nn.scan(body, variable_axes={'params': 0},
                 split_rngs={'params': True},
                 in_axes=(nn.broadcast, nn.broadcast), length=length,
                 metadata_params={nn.PARTITION_NAME: 'layers'},
                 methods=['scan_step'])


def scan_params(cfg: FluxConfig, params: dict) -> dict:
  """Unrolled params (one `{kind}_blocks_{i}` per block: what the BFL /
  diffusers loaders and `save_bfl` use) -> `cfg`'s scanned layout."""
  out = dict(params)
  for kind, a, b in block_runs(cfg):
    if b - a > 1:
      blocks = [out.pop(f'{kind}_blocks_{i}') for i in range(a, b)]
      out[run_name(kind, a, b)] = jax.tree.map(
          lambda *xs: jnp.stack(xs), *blocks)
  return out


def unscan_params(cfg: FluxConfig, params: dict, take=None) -> dict:
  """`cfg`'s scanned layout -> unrolled params (the inverse of scan_params).

  take: (stacked leaf, i) -> leaf of layer i; default indexing (a tree of
  shardings, say, needs its own).
  """
  take = take or (lambda x, i: x[i])
  out = dict(params)
  for kind, a, b in block_runs(cfg):
    if b - a > 1:
      stacked = out.pop(run_name(kind, a, b))
      for i in range(a, b):
        out[f'{kind}_blocks_{i}'] = jax.tree.map(
            lambda x, i=i: take(x, i - a), stacked)
  return out

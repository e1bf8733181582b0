"""Block layouts at rung boundaries: scanned <-> unrolled, on the mesh.

A `scan_blocks` student keeps each run of identical blocks stacked on a
leading 'layers' axis (`models.scan_blocks`), so FSDP gathers one block at a
time in the train step. The compression transforms (sensitivity, prune,
remove_blocks, to_static_modulation, add_downsampler) and the exporters
address blocks one by one (`double_blocks_{i}`), so a rung converts at its
boundary instead of learning the stacked layout: unscan before the
transform, re-scan its result (`compress_unrolled`). The transforms stay as
they are, and the re-scan re-forms the runs from the new config:
  * block-scoped pruning keeps equal widths in a run, so it stays one run;
  * a depth rung's kept blocks are re-stacked into (fewer) runs;
  * the down-sampler's coarse range is its own run (`block_runs`).
On a mesh the conversion is one jit whose out_shardings are the new
layout's shardings: each stacked slice moves device to device, no host copy.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import scan_blocks
from nanoflux_jax.models import sharding

Student = tuple[FluxConfig, Any]


def _abstract(params) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(params))


def relayout(cfg: FluxConfig, params, scan: bool, mesh=None) -> Student:
  """(cfg, params) in the `scan_blocks=scan` layout (a no-op if it is).

  params: arrays (sharded or not), ShapeDtypeStructs (the memory plan:
    converted under eval_shape) or None (a resuming rung: config only).
  mesh: with concrete params, the converted tree is placed by the sharding
    rules on it (`models.sharding.param_shardings`) inside the jit.
  """
  new = cfg.replace(scan_blocks=scan)
  if new == cfg or params is None:
    return new, params
  # Stacking follows the scanned config's runs, both ways.
  fn = ((lambda p: scan_blocks.scan_params(new, p)) if scan else
        (lambda p: scan_blocks.unscan_params(cfg, p)))
  if _abstract(params):
    return new, jax.eval_shape(fn, params)
  if mesh is None:
    return new, jax.jit(fn)(params)
  out_sh = sharding.param_shardings(new, mesh)
  return new, jax.jit(fn, out_shardings=out_sh)(params)


def unrolled(student: Student, mesh=None) -> Student:
  """The student with one `{kind}_blocks_{i}` per block (exporters,
  save_bfl, the compression transforms)."""
  return relayout(*student, False, mesh)


def compress_unrolled(transform: Callable[[Student], Student],
                      student: Student, mesh=None) -> Student:
  """transform(student) for a transform written for unrolled blocks.

  A scanned student is unscanned first and the result re-scanned (its runs
  from the result's own config), so a scanned ladder stays scanned; an
  unrolled one passes straight through.
  """
  if not student[0].scan_blocks:
    return transform(student)
  cfg, params = transform(unrolled(student, mesh))
  return relayout(cfg, params, True, mesh)

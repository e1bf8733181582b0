"""The compressing rung kinds: prune, depth, static_modulation, downsample,
and finetune (no compression: the same distillation budget again).

Each compress takes the current stage and student and returns the
compressed student and its stage; `rungs.distill_denoiser` then distils it
from the original teacher. Each compressing kind also declares `shapes`:
the same transform with its data-dependent choice (which heads, which
blocks) replaced by the expected one, traceable on abstract params, for the
memory plan (`memory_plan.rung_shapes` runs it under jax.eval_shape).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import compress
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.ladder.rungs import Context, img_grid, register_rung, Student
from nanoflux_jax.ladder.rungs import unchanged
from nanoflux_jax.ladder.stage import Stage


def _calib(ctx: Context, stage: Stage, student: Student, opts) -> dict:
  """Teacher-sampler states of the student; real prompts with a pipeline."""
  cfg, params = student
  emb = {}
  if ctx.pipeline is not None:
    prompts = data_lib.load_prompts(ctx.config.distill.data.prompts)
    emb = ctx.embed((prompts * opts['calib_n'])[:opts['calib_n']])
  return compress.calibration_set(
      cfg, params, jax.random.PRNGKey(opts['calib_seed']), opts['calib_n'],
      num_steps=stage.num_steps, img_grid=ctx.grid,
      txt_len=ctx.config.distill.data.txt_len, **emb)


def _check_prune(c, opts, where):
  del c
  if opts['keep_heads'] is None and opts['keep_mlp'] is None and (
      opts['target_params'] is None):
    raise ValueError(f'{where}: prune needs keep_heads, keep_mlp or '
                     'target_params')
  if opts['criterion'] not in compress.CRITERIA:
    raise ValueError(f"{where}: unknown criterion {opts['criterion']!r}; "
                     f'registered: {sorted(compress.CRITERIA)}')


def _position_scores(cfg) -> compress.PruneMask:
  """Stand-in sensitivity scores, 1 - i / n for unit i of n in each block
  (and block i of n): `select` keeps every block's first units, and
  target_params removes units from all blocks at the same rate."""
  rank = lambda m: 1.0 - np.arange(len(m), dtype=np.float32) / len(m)
  return jax.tree.map(rank, compress.PruneMask.ones(cfg))


def _prune_shapes(stage: Stage, student: Student, opts
                  ) -> tuple[Student, Stage]:
  """_prune with the expected widths: round(keep * width) units in every
  block (scope 'global' keeps the same total, unevenly), then
  target_params."""
  cfg, params = student
  mask = compress.select(cfg, _position_scores(cfg),
                         keep_heads=opts['keep_heads'],
                         keep_mlp=opts['keep_mlp'], scope='block',
                         target_params=opts['target_params'])
  return compress.prune(cfg, params, mask), stage


@register_rung('prune', dict(
    criterion='taylor', keep_heads=0.5, keep_mlp=0.5, scope='global',
    target_params=None, calib_n=2, calib_seed=0, criterion_kw={}),
               check=_check_prune, shapes=_prune_shapes)
def _prune(ctx: Context, stage: Stage, student: Student, opts
           ) -> tuple[Student, Stage]:
  """Heads / MLP channels ranked by sensitivity on the student's
  trajectories."""
  cfg, params = student
  scores = compress.sensitivity(
      cfg, params, _calib(ctx, stage, student, opts), opts['criterion'],
      img_grid=img_grid(cfg, ctx.grid), **dict(opts['criterion_kw']))
  mask = compress.select(cfg, scores, keep_heads=opts['keep_heads'],
                         keep_mlp=opts['keep_mlp'], scope=opts['scope'],
                         target_params=opts['target_params'])
  return compress.prune(cfg, params, mask), stage


def _check_depth(c, opts, where):
  del c
  if (opts['keep'] is None) == (opts['keep_blocks'] is None):
    raise ValueError(f'{where}: depth needs exactly one of keep (global block '
                     'indices) or keep_blocks (count or fraction)')


def _depth_shapes(stage: Stage, student: Student, opts
                  ) -> tuple[Student, Stage]:
  """_depth itself when `keep` lists the blocks; for keep_blocks, the
  expected choice: double and single blocks in proportion, the first of
  each kind."""
  cfg, _ = student
  keep = opts['keep']
  if keep is None:
    n, k = cfg.num_blocks, opts['keep_blocks']
    k = int(round(k * n)) if isinstance(k, float) else int(k)
    kd = int(round(cfg.depth * k / n))
    keep = np.zeros(n, bool)
    keep[:kd] = True
    keep[cfg.depth:cfg.depth + (k - kd)] = True
  # With keep set, _depth reads nothing from the context. Its keep-mask
  # (PruneMask.ones, jnp) must stay concrete under eval_shape: prune reads
  # its values; the params stay abstract.
  with jax.ensure_compile_time_eval():
    return _depth(None, stage, student, dict(opts, keep=keep))


@register_rung('depth', dict(keep=None, keep_blocks=None, criterion='block_io',
                             merge=False, calib_n=2, calib_seed=0),
               check=_check_depth, shapes=_depth_shapes)
def _depth(ctx: Context, stage: Stage, student: Student, opts
           ) -> tuple[Student, Stage]:
  """Drops blocks: the listed ones, or the least sensitive keep_blocks."""
  cfg, params = student
  keep = opts['keep']
  if keep is None:
    scores = compress.sensitivity(cfg, params,
                                  _calib(ctx, stage, student, opts),
                                  opts['criterion'],
                                  img_grid=img_grid(cfg, ctx.grid))
    mask = compress.select(cfg, scores, keep_blocks=opts['keep_blocks'])
    keep = np.concatenate([np.asarray(mask.double_blocks),
                           np.asarray(mask.single_blocks)]) > 0.5
  flags = np.zeros(cfg.num_blocks, bool)
  flags[np.arange(cfg.num_blocks)[np.asarray(keep)]] = True
  origin = stage.teacher_blocks or tuple(range(cfg.num_blocks))
  return compress.remove_blocks(cfg, params, keep, merge=opts['merge']), (
      dataclasses.replace(stage, teacher_blocks=tuple(
          int(t) for t, f in zip(origin, flags) if f)))


def _static_shapes(stage: Stage, student: Student, opts
                   ) -> tuple[Student, Stage]:
  """_static on stand-in pooled vectors: the tables' shapes do not depend
  on their values."""
  cfg, params = student
  y = jnp.zeros((2, cfg.vec_in_dim), jnp.float32)
  return compress.to_static_modulation(
      cfg, params, stage.schedule[:-1], y, guidance=opts['guidance']), stage


@register_rung('static_modulation', dict(guidance=None),
               shapes=_static_shapes)
def _static(ctx: Context, stage: Stage, student: Student, opts
            ) -> tuple[Student, Stage]:
  """AdaLN -> per-timestep tables, averaged over the training prompts' y."""
  cfg, params = student
  prompts = data_lib.load_prompts(ctx.config.distill.data.prompts)
  return compress.to_static_modulation(
      cfg, params, stage.schedule[:-1], ctx.embed(prompts)['y'],
      guidance=opts['guidance']), stage


def _check_downsample(c, opts, where):
  for k in ('start', 'end'):
    if not isinstance(opts[k], int):
      raise ValueError(f'{where}: downsample needs integer {k} (a global '
                       f'block index, negative counts from the end), got '
                       f'{opts[k]!r}')
  grid = tuple(c.distill.data.grid)
  if any(g % opts['factor'] for g in grid):
    raise ValueError(f"{where}: data.grid {grid} is not divisible by the "
                     f"downsample factor {opts['factor']}")


def _downsample_shapes(stage: Stage, student: Student, opts
                       ) -> tuple[Student, Stage]:
  """_downsample itself: it reads nothing from the context."""
  return _downsample(None, stage, student, opts)


@register_rung('downsample', dict(start=None, end=None, factor=2, channels=0,
                                  seed=0), check=_check_downsample,
               shapes=_downsample_shapes)
def _downsample(ctx: Context, stage: Stage, student: Student, opts
                ) -> tuple[Student, Stage]:
  """A fresh ResNet token down-sampler over global blocks [start, end]; on
  a student that has one, widens its coarse range to [start, end] instead
  (progressive down-sampling: the trained down-sampler is kept)."""
  cfg, params = student
  n = cfg.num_blocks
  start, end = (v % n if v < 0 else v for v in (opts['start'], opts['end']))
  if cfg.downsample_start is not None:
    return compress.widen_downsampler(cfg, params, start, end,
                                      opts['factor']), stage
  return compress.add_downsampler(cfg, params, start, end,
                                  jax.random.PRNGKey(opts['seed']),
                                  opts['factor'], opts['channels']), stage


# No compression: the same distillation budget again, for ablations (e.g.
# the student without the token down-sampler, trained as long as with it).
register_rung('finetune', {})(unchanged)



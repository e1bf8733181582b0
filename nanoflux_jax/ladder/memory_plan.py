"""Per-rung, per-device memory plan of a ladder, before anything is launched.

`plan_ladder(config, mesh, hbm_bytes)` walks the ladder's rungs the way
`runner.run_ladder` does, but on shapes only: every rung asks its kind
(rungs.RUNG_KINDS). Its `shapes` (the kind's compression with the expected
data-dependent choices: `compress.prune`, `remove_blocks`,
`to_static_modulation`, `add_downsampler`, ...) runs under `jax.eval_shape`
and gives the student and the stage the next rung starts from (its sampling
steps included); a kind without one keeps both. Its `role` says what is
trained: the DiT ('denoiser'), a student T5 beside the frozen DiT, or
nothing (an export). An ablation rung is planned but, as in the ladder, the
rungs after it start from the stage before it. Every byte count is the
shard of an array on one device under
`parallel.RULES` (`NamedSharding.shard_shape`). Nothing is allocated, and
the mesh may be an `AbstractMesh` of any size
(`memory_bytes.abstract_mesh`), so a 64-device plan runs on a laptop.

Per rung and device it reports the frozen teacher's params (the DiT; for the
text-encoder rung also T5-XXL), the student's params, their gradients, the
optimizer state (AdamW's two moments, in the params' dtype), the batch, an
activation estimate (`memory_bytes.activation_bytes`: rematerialised
blocks keep only their inputs; one block's working set at a time), FSDP's
whole-tensor copies (`memory_bytes.gathered_bytes`), the total against the
budget, and the largest tensor.
The gradients column holds two param-shaped trees (the gradients and the
optimizer's updates). The transient terms were fitted to XLA:CPU's
memory_analysis of the real step on one scaled model and checked on two
others (scanned with remat, unrolled without; tests/test_memory_plan.py);
TPU's scheduler may free gathered weights sooner, so the plan errs high.
A ladder whose config.teacher.scan_blocks is set is planned scanned: the
teacher and every student (the transforms re-scan what they return).

`lower_train_step` builds the real distillation train step (the one
`trainer.train` runs) from abstract shapes, so tests can hold the plan
against XLA's `compile().memory_analysis()`.

Data-dependent choices are planned with their expected sizes (the kinds'
`shapes`, compress_rungs.py): pruning keeps `round(keep * width)` units in
every block (scope='block'; 'global' keeps the same total, unevenly), a
depth rung with keep_blocks keeps double and single blocks in proportion.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nanoflux_jax import parallel
from nanoflux_jax.compress import layout
from nanoflux_jax.compress import student_t5 as te_student
from nanoflux_jax.configs import FluxConfig, T5Config
from nanoflux_jax.distill import loop
from nanoflux_jax.ladder import memory_bytes as mb
from nanoflux_jax.ladder import rungs
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import sharding
from nanoflux_jax.models.t5 import StudentTextEncoder, T5Encoder

Student = tuple[FluxConfig, Any]  # (config, abstract params)

# ---------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class RungPlan:
  name: str
  teacher: int           # frozen teacher params (DiT, + T5-XXL for te).
  student: int           # trainable params.
  grads: int
  opt_state: int
  batch: int
  activations: int       # estimate (remat).
  gathered: int          # FSDP: params gathered whole + gradient buffers.
  budget: int
  largest: str
  largest_bytes: int
  params_count: int = 0  # trainable params (whole model).
  notes: tuple[str, ...] = ()

  @property
  def total(self) -> int:
    return (self.teacher + self.student + self.grads + self.opt_state +
            self.batch + self.activations + self.gathered)

  @property
  def fits(self) -> bool:
    return self.total <= self.budget


# ---------------------------------------------------------------------------
# Rungs on shapes.
# ---------------------------------------------------------------------------
def rung_options(rung: Mapping, where: str = 'rung'
                 ) -> tuple[rungs.RungKind, dict]:
  """(its kind, its options with the kind's defaults) of a config.rungs
  entry, as runner.check_config fills them (without the kind's checks,
  which may need files the plan does not).

  Raises:
    ValueError: naming `where` and the kind, when it is not registered.
  """
  r = dict(rung.to_dict() if isinstance(rung, ml_collections.ConfigDict)
           else rung)
  kind = rungs.RUNG_KINDS.get(r.get('kind'))
  if kind is None:
    raise ValueError(f"{where}: unknown kind {r.get('kind')!r}; known kinds: "
                     f'{sorted(rungs.RUNG_KINDS)}')
  return kind, {**kind.defaults, 'ablation': False, **r,
                'distill': dict(r.get('distill') or {})}


def rung_shapes(rung: Mapping, stage: Stage, student: Student
                ) -> tuple[Student, Stage]:
  """(student, stage) after the compression of `rung` (a config.rungs
  entry), on shapes: its kind's `shapes` under jax.eval_shape, on unrolled
  blocks as the ladder compresses (a scanned student is unscanned, then
  the result re-scanned). A kind without `shapes` keeps both.

  student: (cfg, params as ShapeDtypeStructs); stage: the one the rung
  starts from (its dit_config is student's config).
  """
  kind, opts = rung_options(rung)
  if kind.shapes is None:
    return student, stage
  stages = []

  def transform(s: Student) -> Student:
    def fn(params):
      (cfg, out), new = kind.shapes(stage, (s[0], params), opts)
      return out, (cfg, new)
    out, (cfg, new) = mb.shaped(fn, s[1])
    stages.append(new)
    return cfg, out
  out = layout.compress_unrolled(transform, student)
  return out, dataclasses.replace(stages[0], dit_config=out[0])


def _rung_config(config, kind: rungs.RungKind, opts: dict, stage: Stage,
                 where: str) -> ml_collections.ConfigDict:
  """The rung's distillation config (the kind's base + its overrides), at
  the stage's sampling steps for a denoiser (rungs.distill_config)."""
  dc = kind.base_distill(config)
  rungs.override(dc, opts['distill'], f'{where}.distill')
  if kind.trains_denoiser:
    dc.num_sampling_steps = stage.num_steps
  return dc


def _state_parts(c, params, shardings, mesh):
  """Per-device (params, grads, opt state) bytes of a TrainState."""
  tx = loop.make_optimizer(c)
  st_sh = loop.state_shardings(tx, params, shardings, mesh)
  opt = jax.eval_shape(tx.init, params)
  p = mb.tree_bytes(params, shardings)
  return p, p, mb.tree_bytes(opt, st_sh.opt_state)


def _dit_shardings(cfg: FluxConfig, mesh):
  return sharding.param_shardings(cfg, mesh)


def _micro_batch(c, mesh) -> tuple[int, list[str]]:
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  per_step = c.batch_size // c.grad_accum
  if per_step % shards:
    return per_step, [f'batch {per_step} does not split over {shards} batch '
                      'shards: every device runs all of it (and to_global '
                      'raises); use a batch divisible by data*fsdp or a '
                      'tensor axis']
  return per_step // shards, []


def dit_rung_plan(name: str, c, s_cfg: FluxConfig, s_params,
                  t_cfg: FluxConfig | None, t_params, mesh, budget: int,
                  attention: str) -> RungPlan:
  """The plan of one DiT distillation (trainer.train) on `mesh`."""
  s_cfg = s_cfg.replace(remat=c.remat)
  s_sh = _dit_shardings(s_cfg, mesh)
  sp, g, o = _state_parts(c, {'student': s_params}, {'student': s_sh}, mesh)
  g *= 2  # The gradients and the optimizer's update tree.
  tb = 0
  lg = mb.largest(s_params, s_sh, 'student/')
  # Measured on XLA:CPU: without remat a gathered tensor stays split over
  # the tensor axis; with remat (the re-gathered backward copies) the
  # compiled step holds it whole, as if unsharded (tests/test_memory_plan).
  g_sh = lambda sh: None if c.remat else sh
  gathered = mb.gathered_bytes(s_cfg, s_params, c.compute_dtype, grads=True,
                               shardings=g_sh(s_sh))
  if t_cfg is not None:
    t_sh = _dit_shardings(t_cfg, mesh)
    tb = mb.tree_bytes(t_params, t_sh)
    lg = max(lg, mb.largest(t_params, t_sh, 'teacher/'))
    gathered += mb.gathered_bytes(t_cfg, t_params, c.compute_dtype,
                                  grads=False, shardings=g_sh(t_sh))
  b, notes = _micro_batch(c, mesh)
  grid = tuple(c.data.grid)
  li, lt = grid[0] * grid[1], c.data.txt_len
  batch = c.batch_size // max(1, mesh.shape['data'] * mesh.shape['fsdp']) * (
      lt * s_cfg.context_in_dim + s_cfg.vec_in_dim +
      li * s_cfg.in_channels) * 4 if not notes else c.batch_size * (
          lt * s_cfg.context_in_dim + s_cfg.vec_in_dim +
          li * s_cfg.in_channels) * 4
  w = dict(c.loss.weights)
  pairs = (len(c.loss.feature_pairs) if w.get('feature_kd', 0) > 0 and
           c.loss.feature_pairs != 'identity' else
           (s_cfg.num_blocks if w.get('feature_kd', 0) > 0 else 0))
  act = mb.activation_bytes(
      s_cfg, t_cfg, grid, lt, b, mesh.shape['tensor'], c.compute_dtype,
      attention, num_steps=c.num_sampling_steps, feature_pairs=pairs,
      cached_trajectory=bool(c.data.get('cache_dir')))
  n = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(s_params))
  return RungPlan(name, tb, sp, g, o, int(batch), int(act), int(gathered),
                  budget, lg[1], lg[0], n, tuple(notes))


def _t5_plan(name, tc, student: tuple, mesh, budget, attention):
  """A text-encoder rung (distillation config tc): T5-XXL (frozen) +
  denoiser (frozen) + student."""
  t_cfg = T5Config(dtype='bfloat16', param_dtype='bfloat16')  # T5-XXL.
  f_cfg, f_params = student
  out_dim = t_cfg.d_model
  sc = tc.student
  s_cfg = te_student.student_t5_config(
      t_cfg, num_layers=sc.get('num_layers'), d_model=sc.get('d_model'),
      num_heads=sc.get('num_heads'), d_ff=sc.get('d_ff'), dtype='float32',
      param_dtype='float32')
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = lambda m: nn.meta.unbox(jax.eval_shape(
      lambda: m.init(jax.random.PRNGKey(0), ids))['params'])
  sh = lambda m: parallel.variable_shardings(m, mesh, parallel.RULES,
                                             ids)['params']
  t_mod, s_mod = T5Encoder(t_cfg), StudentTextEncoder(s_cfg, out_dim)
  t_params, s_params = shapes(t_mod), shapes(s_mod)
  t_sh, s_sh = sh(t_mod), sh(s_mod)
  f_sh = _dit_shardings(f_cfg, mesh)
  teacher = mb.tree_bytes(t_params, t_sh) + mb.tree_bytes(f_params, f_sh)
  sp, g, o = _state_parts(tc, s_params, s_sh, mesh)
  b, notes = _micro_batch(tc, mesh)
  lt = tc.data.txt_len
  act_b = mb.ITEM_BYTES[tc.compute_dtype]
  # T5 layers keep their activations (no remat): residual, q/k/v/o, the
  # gated FFN's two hidden states, [b, H, T, T] scores; teacher T5 forward
  # one layer at a time; the denoiser's trajectory as in the DiT plan.
  h_s = mb.tensor_split(s_cfg.num_heads, mesh.shape['tensor'])
  d_ff = mb.tensor_split(s_cfg.d_ff, mesh.shape['tensor'])
  per_layer = b * lt * (6 * s_cfg.d_model + 4 * h_s * s_cfg.d_kv +
                        3 * d_ff) * act_b + 2 * b * h_s * lt * lt * 4
  act = s_cfg.num_layers * per_layer + b * lt * t_cfg.d_model * 4 * 4
  grid = tuple(tc.data.grid)
  act += mb.activation_bytes(f_cfg.replace(remat=False), None, grid, lt, b,
                          mesh.shape['tensor'], tc.compute_dtype, attention,
                          num_steps=tc.num_sampling_steps) // max(
                              1, f_cfg.num_blocks) * 2
  g *= 2  # The gradients and the optimizer's update tree.
  # T5s unrolled: both whole in the compute dtype (+ the student's fp32
  # gradients); the frozen denoiser only up to its vis blocks (one block).
  n_t = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(t_params))
  n_s = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(s_params))
  gathered = (n_t + n_s) * act_b + n_s * 4 + mb.gathered_block_bytes(
      f_cfg, f_params, tc.compute_dtype)
  lg = max(mb.largest(t_params, t_sh, 't5_xxl/'), mb.largest(f_params, f_sh,
                                                       'denoiser/'),
           mb.largest(s_params, s_sh, 'student_t5/'))
  n = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(s_params))
  return RungPlan(name, teacher, sp, g, o, b * lt * 4 * 4, int(act),
                  int(gathered), budget, lg[1], lg[0], n, tuple(notes))


def teacher_shapes(config, preset: str = 'schnell',
                   dtype: str | None = 'bfloat16'):
  """(cfg, abstract params) of the ladder's teacher: config.teacher.preset
  (+ overrides) if set, else `preset` (a real checkpoint: its stored
  dtype, bf16 for FLUX.1 releases), scanned if config.teacher.scan_blocks."""
  t = config.teacher
  name = t.get('preset') or preset
  cfg = getattr(FluxConfig, name)(**dict(t.get('overrides', {}) or {}))
  # teacher.scan_blocks: the ladder scans its teacher, and so every student
  # (the transforms re-scan what they return).
  cfg = cfg.replace(scan_blocks=bool(t.get('scan_blocks', cfg.scan_blocks)))
  return cfg, mb.abstract_params(cfg, dtype if not t.get('preset') else None)


def plan_ladder(config, mesh, hbm_bytes: int, *, teacher_preset='schnell',
                teacher_dtype: str | None = 'bfloat16',
                student_dtype: str | None = None,
                attention: str = 'splash') -> list[RungPlan]:
  """One RungPlan per trained rung of `config` (a ladder config).

  Args:
    mesh: a Mesh or AbstractMesh with axes (data, fsdp, tensor).
    hbm_bytes: the per-device budget.
    teacher_dtype: the teacher checkpoint's dtype (students inherit it
      through the transforms, as in the ladder); student_dtype: cast each
      student to this before training instead (e.g. 'float32' masters).
    attention: the attention kernel the step runs ('splash' on TPU: no
      [B, H, L, L] scores; 'xla' and 'batched' keep them).
  """
  t_cfg, t_params = teacher_shapes(config, teacher_preset, teacher_dtype)
  student = (t_cfg, t_params)
  stage = Stage(t_cfg, config.distill.num_sampling_steps,
                tuple(config.distill.data.grid))
  out = []
  for i, rung in enumerate(config.rungs):
    kind, opts = rung_options(rung, f'plan rung {i}')
    name = f'{i} {kind.name}'
    new_student, new_stage = rung_shapes(opts, stage, student)
    if kind.role == 'text_encoder':
      out.append(_t5_plan(name, _rung_config(config, kind, opts, new_stage,
                                             name), new_student, mesh,
                          hbm_bytes, attention))
    elif kind.trains_denoiser:
      s_cfg, params = new_student
      if student_dtype is not None:
        params = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, student_dtype), params)
      c = _rung_config(config, kind, opts, new_stage, name)
      out.append(dit_rung_plan(name, c, s_cfg, params, t_cfg, t_params, mesh,
                               hbm_bytes, attention))
    # Any other role (an export) trains nothing.
    if not opts['ablation']:  # The rungs after an ablation skip it.
      student, stage = new_student, new_stage
  return out


def format_plan(plans: Sequence[RungPlan], mesh, hbm_bytes: int) -> str:
  """A markdown table, GiB per device."""
  g = lambda b: f'{b / mb.GIB:.2f}'
  shape = ' x '.join(f'{k} {v}' for k, v in mesh.shape.items())
  lines = [f'per device, GiB; mesh {shape}; budget {g(hbm_bytes)} GiB',
           '',
           '| rung | teacher | student | grads | Adam | batch | activations '
           '| gathered | total | fits | largest tensor (per device) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---|']
  for p in plans:
    lines.append(
        f'| {p.name} | {g(p.teacher)} | {g(p.student)} | {g(p.grads)} | '
        f'{g(p.opt_state)} | {g(p.batch)} | {g(p.activations)} | '
        f'{g(p.gathered)} | '
        f'{g(p.total)} | {"yes" if p.fits else "NO"} | {p.largest} '
        f'({p.largest_bytes / 2**20:.0f} MiB) |')
  for p in plans:
    for n in p.notes:
      lines.append(f'\n{p.name}: {n}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# The real step, from shapes (for memory_analysis checks).
# ---------------------------------------------------------------------------
def lower_train_step(c, s_cfg: FluxConfig, s_params, t_cfg: FluxConfig | None,
                     t_params, mesh):
  """jit(train_step).lower(...) of trainer.train's step, on shapes.

  Builds the same DistillSpec, optimizer and shardings as `trainer.train`
  (with c.data.cache_dir empty: the teacher trajectory runs in the step).
  """
  s_cfg = s_cfg.replace(remat=c.remat)
  spec = trainer.distill_spec(c, s_cfg, t_cfg)
  loss_fn = lambda *a: trainer.distill_loss(*a, spec=spec)
  tx = loop.make_optimizer(c)
  params = {'student': s_params}
  p_sh = {'student': sharding.param_shardings(s_cfg, mesh)}
  state_sh = loop.state_shardings(tx, params, p_sh, mesh)
  state = jax.eval_shape(lambda p: loop.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.PRNGKey(0)), params)
  frozen, frozen_sh = {}, {}
  if t_cfg is not None:
    frozen = {'teacher': t_params}
    frozen_sh = {'teacher': sharding.param_shardings(t_cfg, mesh)}
  b, li, lt = c.batch_size, spec.grid[0] * spec.grid[1], c.data.txt_len
  batch = {'txt': jax.ShapeDtypeStruct((b, lt, s_cfg.context_in_dim),
                                       jnp.float32),
           'y': jax.ShapeDtypeStruct((b, s_cfg.vec_in_dim), jnp.float32),
           'noise': jax.ShapeDtypeStruct((b, li, s_cfg.in_channels),
                                         jnp.float32)}
  batch_sh = {k: parallel.batch_sharding(mesh, len(v.shape))
              for k, v in batch.items()}
  step = loop.compile_train_step(loss_fn, tx, c.grad_accum, state_sh,
                                    batch_sh, frozen_sh, mesh)
  return step.lower(state, batch, frozen)


def compiled_peak_bytes(compiled) -> dict[str, int]:
  """memory_analysis() of a compiled step -> its parts and the peak."""
  m = compiled.memory_analysis()
  parts = dict(arguments=m.argument_size_in_bytes,
               outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
               temp=m.temp_size_in_bytes)
  parts['peak'] = (parts['arguments'] + parts['outputs'] - parts['aliased'] +
                   parts['temp'])
  return parts

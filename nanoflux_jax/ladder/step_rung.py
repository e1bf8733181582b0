"""The step_distill rung kind: the student learns to sample in fewer steps.

Progressive distillation (Salimans & Ho, 2022) on the original teacher's
trajectories: the compressed stage samples in num_steps // factor Euler
steps, and at each of its schedule points t_k (a point of the teacher's
schedule, teacher index j_k) the student is trained to predict the velocity
whose one Euler step lands where the teacher lands after its own steps up to
t_{k+1}:

  v*_k = (x_teacher(t_{k+1}) - x_teacher(t_k)) / (t_{k+1} - t_k).

The teacher samples on its own schedule (the ladder teacher's steps), so a
second step rung (8 -> 4 -> 2) still distils from the 8-step teacher, with
four teacher steps per student step. A static-modulation student keeps the
table rows of the timesteps its new schedule uses. The stage the rung ends
with carries the new step count, so sampling, evaluation and export follow.

Options: factor (int >= 2; the stage's num_steps must divide by it). The
loss is output KD against v* only: the rung refuses distill overrides that
ask for feature KD, rectified flow or off-schedule timesteps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import losses
from nanoflux_jax.ladder.rungs import Context, distill_denoiser, override
from nanoflux_jax.ladder.rungs import register_rung, RungResult, Student
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models import sharding

KIND = 'step_distill'
# Schedule points that agree this closely are the same point: the teacher's
# and the student's schedules come from one formula at different step
# counts (float64 linspace, maybe shifted), so shared points agree to ~1e-16.
_TOL = 1e-6


# ---------------------------------------------------------------------------
# Schedules and targets.
# ---------------------------------------------------------------------------
def _index_of(points: np.ndarray, t: float) -> int | None:
  """The index of t among points (within _TOL); None if it is not one."""
  i = int(np.argmin(np.abs(points - t)))
  return i if abs(points[i] - t) <= _TOL else None


def landing_indices(schedule: Sequence[float],
                    teacher_schedule: Sequence[float]) -> tuple[int, ...]:
  """Index into teacher_schedule of every point of the student's schedule.

  Args:
    schedule: the student's n_s + 1 timesteps, 1 -> 0.
    teacher_schedule: the teacher's n_t + 1 timesteps, 1 -> 0.
  Returns:
    n_s + 1 strictly increasing indices, the first 0 and the last n_t.
  Raises:
    ValueError: a student point is not on the teacher's schedule (naming
      both schedules).
  """
  teacher = np.asarray(teacher_schedule, np.float64)
  out = []
  for t in schedule:
    j = _index_of(teacher, t)
    if j is None:
      raise ValueError(
          f'{KIND}: the student schedule {list(schedule)} is not a subset of '
          f'the teacher schedule {list(teacher_schedule)} (t={t} is not on '
          "it): the student's steps must divide the teacher's, on the same "
          'schedule rule')
    out.append(j)
  if (out[0] != 0 or out[-1] != len(teacher) - 1 or
      any(b <= a for a, b in zip(out, out[1:]))):
    raise ValueError(f'{KIND}: the student schedule {list(schedule)} does not '
                     f'run from the first to the last point of the teacher '
                     f'schedule {list(teacher_schedule)}')
  return tuple(out)


def step_targets(xs, vs, schedule: Sequence[float],
                 teacher_schedule: Sequence[float]):
  """Student start states and velocity targets from a teacher trajectory.

  Args:
    xs, vs: [B, n_t, L, C] the teacher's states and velocities at
      teacher_schedule[:-1] (data.teacher_trajectory, or the cache's
      traj_x / traj_v).
    schedule, teacher_schedule: see `landing_indices`.
  Returns:
    (starts [B, n_s, L, C]: the teacher state at each student point
    schedule[k], targets [B, n_s, L, C]: the velocity v*_k whose Euler step
    of length schedule[k + 1] - schedule[k] lands on the teacher's state at
    schedule[k + 1]), float32.
  """
  idx = landing_indices(schedule, teacher_schedule)
  xs = jnp.asarray(xs, jnp.float32)
  # The teacher's final sample: its last Euler step.
  last = (teacher_schedule[-1] - teacher_schedule[-2]) * jnp.asarray(
      vs[:, -1], jnp.float32)
  states = jnp.concatenate([xs, (xs[:, -1] + last)[:, None]], axis=1)
  starts = states[:, np.asarray(idx[:-1])]
  ends = states[:, np.asarray(idx[1:])]
  dt = np.diff(np.asarray(schedule, np.float64)).astype(np.float32)
  return starts, (ends - starts) / dt[None, :, None, None]


def step_distill_loss(params, frozen, batch, rng, *, spec):
  """Output KD of the fewer-step student against the teacher's landing.

  A trainer.train loss: spec.schedule is the student's (n_s steps),
  spec.trajectory_schedule the teacher's (n_t steps, the cache's); each
  example gets one uniform student step k and its loss is
  MSE(v_student(x_teacher(t_k), t_k), v*_k) (see `step_targets`).
  Pure and jittable; the schedules are static.

  Args:
    params: {'student': ...} (any 'proj' is unused).
    frozen: {'teacher': ...}; used when the batch carries no cached
      trajectory.
    batch: txt [B, T, ctx], y [B, vec], noise [B, L, C], optionally traj_x /
      traj_v [B, n_t, L, C] on spec.trajectory_schedule.
  Returns:
    (loss, {'output_kd', 'loss'}).
  """
  sched, t_sched = tuple(spec.schedule), tuple(spec.trajectory_schedule)
  w = dict(spec.weights)
  noise = batch['noise']
  b = noise.shape[0]
  if 'traj_x' in batch:
    xs, vs = batch['traj_x'], batch['traj_v']
  else:
    xs, vs, _ = data_lib.teacher_trajectory(
        spec.teacher, jax.lax.stop_gradient(frozen['teacher']), noise,
        batch['txt'], batch['y'], t_sched, spec.grid, guidance=spec.guidance)
  starts, targets = step_targets(xs, vs, sched, t_sched)
  k = jax.random.randint(rng, (b,), 0, len(sched) - 1)
  pick = lambda a: jnp.take_along_axis(a, k[:, None, None, None], 1)[:, 0]
  t = jnp.asarray(sched[:-1], jnp.float32)[k]
  model = flux_lib.Flux(spec.student)
  g = (jnp.full((b,), spec.guidance, jnp.float32)
       if spec.student.guidance_embed else None)
  v = model.apply({'params': params['student']}, img=pick(starts),
                  img_ids=sampling.image_ids(b, *spec.grid), txt=batch['txt'],
                  txt_ids=sampling.text_ids(b, batch['txt'].shape[1]),
                  timesteps=t, y=batch['y'], guidance=g,
                  img_grid=spec.grid).velocity
  kd = losses.output_kd(v, pick(targets))
  loss = w.get('output_kd', 1.0) * kd
  return loss, {'output_kd': kd, 'loss': loss}


# ---------------------------------------------------------------------------
# Static-modulation tables.
# ---------------------------------------------------------------------------
def _take_rows(params, rows: np.ndarray):
  """Every '.../table' leaf [..., S, n, D] -> its `rows` along S."""
  def take(path, x):
    if getattr(path[-1], 'key', None) != 'table':
      return x
    return jnp.take(x, rows, axis=x.ndim - 3)
  return jax.tree_util.tree_map_with_path(take, params)


def keep_table_rows(cfg: FluxConfig, params, timesteps: Sequence[float]
                    ) -> tuple[FluxConfig, object]:
  """A static-modulation DiT reduced to the table rows of `timesteps`.

  Args:
    cfg: a modulation='static' config; params its params (arrays, sharded
      arrays or ShapeDtypeStructs).
    timesteps: the new schedule's evaluated points (without the final 0);
      each must be one of cfg.static_timesteps.
  Returns:
    (cfg with static_timesteps=timesteps, params with every table [S, n, D]
    cut to those rows, placed like the input on its mesh).
  Raises:
    ValueError: a timestep has no row (a rung would otherwise sample it on
      a neighbouring row's modulation).
  """
  table = np.asarray(cfg.static_timesteps, np.float64)
  rows = []
  for t in timesteps:
    i = _index_of(table, t)
    if i is None:
      raise ValueError(
          f'{KIND}: timestep {t} of the new schedule {list(timesteps)} has '
          f'no static-modulation table row (rows: {list(cfg.static_timesteps)})'
          '; the tables were built for another schedule')
    rows.append(i)
  new_cfg = cfg.replace(static_timesteps=tuple(float(table[i]) for i in rows))
  rows = np.asarray(rows, np.int32)
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    return new_cfg, jax.eval_shape(lambda p: _take_rows(p, rows), params)
  out = _take_rows(params, rows)
  return new_cfg, sharding.place_flux(new_cfg, out, parallel.mesh_of(params))


# ---------------------------------------------------------------------------
# The rung.
# ---------------------------------------------------------------------------
def _rung_factor(r) -> int:
  """A rung's step factor; 1 for other kinds (and for a bad factor, which
  that rung's own check names)."""
  f = r.get('factor', 2) if r.get('kind') == KIND else 1
  return f if isinstance(f, int) and not isinstance(f, bool) and f >= 1 else 1


def _check(c: ml_collections.ConfigDict, opts, where: str) -> None:
  f = opts['factor']
  if not isinstance(f, int) or isinstance(f, bool) or f < 2:
    raise ValueError(f'{where}: factor must be an integer >= 2, got {f!r}')
  n = c.distill.num_sampling_steps
  # The main line's step rungs compound (8 -> 4 -> 2); an ablation does not
  # feed it (where it sits in the line, compress checks against its stage).
  total = math.prod(_rung_factor(r) for r in (c.get('rungs') or ())
                    if not r.get('ablation', False))
  for k in (f, total):
    if n % k:
      raise ValueError(f'{where}: distill.num_sampling_steps={n} is not '
                       f'divisible by factor={f} (the main line\'s '
                       f'step_distill factors multiply to {total})')
  tc = ml_collections.ConfigDict(c.distill.to_dict())
  override(tc, opts['distill'], f'{where}.distill')
  w = dict(tc.loss.weights)
  if w.get('output_kd', 0.0) <= 0:
    raise ValueError(f'{where}: distill.loss.weights.output_kd must be > 0 '
                     f"(the step target's weight), got {w.get('output_kd')}")
  extra = sorted(k for k, v in w.items() if k != 'output_kd' and v)
  if extra:
    raise ValueError(f'{where}: the step-distillation loss has no {extra} '
                     f'term; set distill.loss.weights.{extra[0]}=0.0 in the '
                     'rung')
  if tc.timesteps.mode != 'schedule':
    raise ValueError(f"{where}: distill.timesteps.mode={tc.timesteps.mode!r};"
                     " step distillation trains on schedule points only "
                     "(mode='schedule')")


def _fewer_steps(stage: Stage, student: Student, opts
                 ) -> tuple[Student, Stage]:
  """The stage at num_steps // factor; a static student's tables keep the
  rows of the new schedule's timesteps. Traceable on abstract params (the
  memory plan's `shapes`)."""
  f, n = opts['factor'], stage.num_steps
  if n % f:
    raise ValueError(f'{KIND}: the stage samples in {n} steps, not divisible '
                     f'by factor={f}')
  cfg, params = student
  # The student's config (not stage.dit_config): its table rows decide.
  schedule = sampling.schedule_for(cfg, n // f, stage.grid[0] * stage.grid[1])
  if cfg.modulation == 'static':
    cfg, params = keep_table_rows(cfg, params, schedule[:-1])
  return (cfg, params), dataclasses.replace(stage, num_steps=n // f)


def _compress(ctx: Context, stage: Stage, student: Student, opts
              ) -> tuple[Student, Stage]:
  """_fewer_steps, once the new schedule is known to lie on the teacher's
  (refused here, before any training, rather than inside the loss)."""
  out, new = _fewer_steps(stage, student, opts)
  length = new.grid[0] * new.grid[1]
  landing_indices(sampling.schedule_for(out[0], new.num_steps, length),
                  ctx.teacher_stage.schedule)
  return out, new


def _run(ctx: Context, stage: Stage, student: Student, opts) -> RungResult:
  """Distils the fewer-step student from the original teacher, which
  samples on its own (the ladder teacher's) schedule."""
  teacher_steps = ctx.teacher_stage.num_steps
  result = distill_denoiser(ctx, stage, student, opts,
                            loss=step_distill_loss,
                            teacher_steps=teacher_steps)
  return dataclasses.replace(result, fields=dict(
      result.fields, sampling_steps=stage.num_steps,
      teacher_sampling_steps=teacher_steps))


register_rung(KIND, dict(factor=2), check=_check, run=_run,
              shapes=_fewer_steps)(_compress)

"""Sharded distillation / rectified-flow training of a FLUX DiT student.

`train(config, workdir, ...)` is the testable entry point: it builds the mesh,
teacher (frozen, FSDP-sharded; `teacher.load_teacher`), student and
optimizer state (sharded by `parallel.RULES` or config.sharding_rules), and
runs `loop.fit` with `distill_loss`: output KD on the teacher's sampler
states, feature KD on matched blocks and rectified flow on real latents. A
compression ladder calls `train` once per rung with `student=(cfg, params)`
and a workdir subfolder. `check_config` validates a config before any model
is built.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from nanoflux_jax import atomic
from nanoflux_jax import checkpoint as nf_checkpoint
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.call_args import DEFAULT_GUIDANCE
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import config_checks
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import losses
from nanoflux_jax.distill import teacher as teacher_lib
from nanoflux_jax.distill import workdir_lock
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models import sharding



def _check_preset(c, path: str) -> None:
  preset = config_checks.config_field(c, path)
  if preset not in teacher_lib.PRESETS:
    raise ValueError(f'config.{path}={preset!r}; expected one of '
                     f'{teacher_lib.PRESETS}')


def check_config(c: ml_collections.ConfigDict) -> None:
  """Validates a `train` config (see `default_config`) before any work.

  Raises:
    ValueError: naming `config.<field>` and what was expected.
  """
  if c is None:
    raise ValueError('no config given (pass --config=<file>)')
  loop.check_loop_config(c)
  config_checks.check_int(c, 'num_sampling_steps', 1)
  if c.get('teacher_num_sampling_steps') is not None:
    config_checks.check_int(c, 'teacher_num_sampling_steps', 1)
  config_checks.check_int(c, 'data.txt_len', 1)
  grid = config_checks.config_field(c, 'data.grid')
  if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
      isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1
      for g in grid)):
    raise ValueError(f'config.data.grid={grid!r} must be two integers >= 1')
  if 'preset' in c.student:
    _check_preset(c, 'student.preset')
  if not c.teacher.get('path') and c.teacher.get('preset'):
    _check_preset(c, 'teacher.preset')
  config_checks.check_float(c, 'guidance', 0.0, optional=True)


# ---------------------------------------------------------------------------
# The FLUX distillation / rectified-flow loss.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Everything static the Flux loss needs (hashable)."""
  student: FluxConfig            # with the compute dtype.
  teacher: FluxConfig | None     # None: from-scratch rectified flow.
  schedule: tuple[float, ...]    # the student's sampling schedule, 1 -> 0.
  grid: tuple[int, int]
  weights: tuple[tuple[str, float], ...]
  pairs: tuple[tuple[int, int], ...] = ()
  t_mode: str = 'schedule'
  logit_mean: float = 0.0
  logit_std: float = 1.0
  schedule_prob: float = 0.5
  # Guidance scale fed to every model with a guidance embedder (FLUX.1-dev
  # style), teacher and student alike; ignored by the others.
  guidance: float = DEFAULT_GUIDANCE
  # The teacher's sampling schedule (its trajectories); None: `schedule`.
  teacher_schedule: tuple[float, ...] | None = None

  @property
  def trajectory_schedule(self) -> tuple[float, ...]:
    return self.teacher_schedule or self.schedule


def distill_loss(params, frozen, batch, rng, *, spec: DistillSpec):
  """Weighted sum of output KD, feature KD and rectified flow.

  Distillation: the student is evaluated where the teacher's own sampler
  goes: at schedule points x_t is the teacher trajectory state (cached in
  batch['traj_x'] or computed here), at logit-normal t it is the
  interpolation between noise and the teacher's final sample.
  """
  w = dict(spec.weights)
  noise = batch['noise']
  b = noise.shape[0]
  img_ids = sampling.image_ids(b, *spec.grid)
  txt_ids = sampling.text_ids(b, batch['txt'].shape[1])
  student = flux_lib.Flux(spec.student)

  def run(model, p, x, t, inter=False):
    """-> (velocity, intermediates ({} unless inter))."""
    g = (jnp.full((b,), spec.guidance, jnp.float32)
         if model.config.guidance_embed else None)
    out = model.apply({'params': p}, img=x, img_ids=img_ids,
                      txt=batch['txt'], txt_ids=txt_ids, timesteps=t,
                      y=batch['y'], guidance=g, return_intermediates=inter,
                      img_grid=spec.grid)
    return out.velocity, out.intermediates

  k_t, k_rf = jax.random.split(rng)
  t, idx, on = losses.sample_timesteps(
      k_t, b, spec.schedule, spec.t_mode, spec.logit_mean, spec.logit_std,
      spec.schedule_prob)
  terms = {}
  if spec.teacher is not None:
    teacher = flux_lib.Flux(spec.teacher)
    tp = jax.lax.stop_gradient(frozen['teacher'])
    if 'traj_x' in batch:
      xs, vs = batch['traj_x'], batch['traj_v']
      x_final = xs[:, -1] + (spec.schedule[-1] - spec.schedule[-2]) * vs[:, -1]
    else:
      xs, vs, x_final = data_lib.teacher_trajectory(
          spec.teacher, tp, noise, batch['txt'], batch['y'], spec.schedule,
          spec.grid, guidance=spec.guidance)
    pick = lambda a: jnp.take_along_axis(
        a, idx[:, None, None, None], axis=1)[:, 0]
    x_t = jnp.where(on[:, None, None], pick(xs),
                    losses.interpolate(x_final, noise, t))
    feat = bool(spec.pairs) and w.get('feature_kd', 0.0) > 0
    if feat or spec.t_mode != 'schedule':
      v_t, f_t = run(teacher, tp, x_t, t, inter=True)
    else:
      v_t, f_t = pick(vs), None
    v_s, f_s = run(student, params['student'], x_t, t, inter=True)
    terms['output_kd'] = losses.output_kd(v_s, v_t)
    if feat:
      ds, dt = spec.student.hidden_size, spec.teacher.hidden_size
      proj = None
      if ds != dt:
        proj = lambda fs: losses.FeatureProjection(spec.pairs, ds, dt).apply(
            {'params': params['proj']}, fs)
      terms['feature_kd'] = losses.feature_kd(
          f_s['img'], jax.lax.stop_gradient(f_t['img']), spec.pairs, proj)
  if 'latents' in batch and (spec.teacher is None or w.get('rf', 0.0) > 0):
    x0 = batch['latents']
    t_rf = t if spec.teacher is None else losses.sample_timesteps(
        k_rf, b, spec.schedule, spec.t_mode, spec.logit_mean, spec.logit_std,
        spec.schedule_prob)[0]
    v, _ = run(student, params['student'],
               losses.interpolate(x0, noise, t_rf), t_rf)
    terms['rf'] = losses.rectified_flow(v, x0, noise)
  if not terms:
    raise ValueError('distill_loss: no loss term is active (no teacher and no '
                     "'latents' in the batch)")
  loss = losses.weighted_total(terms, w)
  return loss, dict(terms, loss=loss)


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------
def feature_pairs(spec, student: FluxConfig, teacher: FluxConfig | None
                  ) -> tuple[tuple[int, int], ...]:
  """(student block, teacher block) pairs for feature KD.

  spec: explicit pairs, or 'identity' (block i to block i: students with the
  teacher's depth, e.g. after pruning widths or static modulation).
  """
  if isinstance(spec, str) and spec != 'identity':
    raise ValueError(f"loss.feature_pairs={spec!r}: expected 'identity' or "
                     '((student block, teacher block), ...)')
  if spec != 'identity':
    return tuple(tuple(p) for p in spec)
  if teacher is None or student.num_blocks != teacher.num_blocks:
    raise ValueError(
        "loss.feature_pairs='identity' needs a teacher with the student's "
        f'{student.num_blocks} blocks, got '
        f"{None if teacher is None else teacher.num_blocks}")
  return tuple((i, i) for i in range(student.num_blocks))


def distill_spec(c: ml_collections.ConfigDict, s_cfg: FluxConfig,
                 t_cfg: FluxConfig | None) -> 'DistillSpec':
  """The loss's static settings from the config: compute dtype, the fixed
  sampling schedules over c.data.grid (the student's, and the teacher's
  when c.teacher_num_sampling_steps differs), loss weights, feature pairs,
  timestep sampling and guidance."""
  grid = tuple(c.data.grid)
  length = grid[0] * grid[1]
  t_steps = c.get('teacher_num_sampling_steps')
  t_sched = None
  if t_cfg is not None and t_steps and t_steps != c.num_sampling_steps:
    t_sched = tuple(sampling.schedule_for(t_cfg, t_steps, length))
  return DistillSpec(
      student=s_cfg.replace(dtype=c.compute_dtype),
      teacher=None if t_cfg is None else t_cfg.replace(dtype=c.compute_dtype),
      schedule=tuple(sampling.schedule_for(s_cfg, c.num_sampling_steps,
                                           length)),
      teacher_schedule=t_sched,
      grid=grid, weights=tuple(sorted(dict(c.loss.weights).items())),
      pairs=feature_pairs(c.loss.feature_pairs, s_cfg, t_cfg),
      t_mode=c.timesteps.mode, logit_mean=c.timesteps.logit_mean,
      logit_std=c.timesteps.logit_std,
      schedule_prob=c.timesteps.schedule_prob,
      guidance=float(DEFAULT_GUIDANCE if c.get('guidance') is None
                     else c.guidance))


LossFn = Callable[..., tuple[jax.Array, dict]]


def _sharded_teacher(c, teacher, mesh, rules):
  """(cfg, params, shardings) of the frozen teacher, laid out on the mesh;
  Nones without one (from-scratch rectified flow)."""
  t_cfg, t_params = (teacher if teacher is not None else
                     teacher_lib.load_teacher(c.teacher, mesh))
  if t_cfg is None:
    return None, None, None
  t_sh = sharding.param_shardings(t_cfg, mesh, rules)
  return t_cfg, parallel.shard_like(t_params, t_sh), t_sh


def _student(c, student, workdir: str, mesh, rules):
  """(cfg, params, shardings) of the student. Its values come from, in
  order: only shapes when workdir has a checkpoint (fit restores it), the
  given params, c.init, a fresh sharded init."""
  s_cfg, s_params = student if student is not None else (
      teacher_lib.flux_config(c.student, 'student'), None)
  if s_params is None and c.get('init'):
    s_cfg = nf_checkpoint.load_config(c.init)
  s_cfg = s_cfg.replace(remat=c.remat)
  s_sh = sharding.param_shardings(s_cfg, mesh, rules)
  if loop.latest_step(workdir) is not None:
    s_params = flux_lib.param_shapes(s_cfg)
  elif s_params is not None:
    s_params = parallel.shard_like(s_params, s_sh)
  elif c.get('init'):
    s_params = nf_checkpoint.load(c.init, shardings=s_sh)[1]
  else:
    s_params = sharding.init_flux(s_cfg, mesh, jax.random.PRNGKey(c.seed),
                                  rules)[0]
  return s_cfg, s_params, s_sh


def _projection(c, spec: DistillSpec, mesh, rules):
  """(params, shardings) of the student -> teacher width projection of
  feature KD."""
  ds, dt = spec.student.hidden_size, spec.teacher.hidden_size
  proj = losses.FeatureProjection(spec.pairs, ds, dt)
  dummy = [jnp.zeros((1, 1, ds))] * len(spec.pairs)
  v, v_sh = parallel.sharded_init(proj, mesh, rules,
                                  jax.random.PRNGKey(c.seed + 1), dummy)
  return v['params'], v_sh['params']


def _prompt_data(c, spec: DistillSpec, prompts, t_params, embed_fn,
                 latents_fn):
  """The default batch source: prompts, their embeddings and noise (and
  real latents); with c.data.cache_dir, the teacher's trajectories on
  spec.trajectory_schedule cached to disk once."""
  ref = spec.teacher or spec.student
  data = data_lib.PromptData(
      prompts, embed_fn or data_lib.random_embedder(ref, c.data.txt_len,
                                                    c.seed),
      ref, spec.grid, c.batch_size, c.seed,
      latents=None if latents_fn is None else latents_fn(prompts))
  if c.data.get('cache_dir') and spec.teacher is not None:
    data = data_lib.build_cache(
        c.data.cache_dir, data, spec.teacher, t_params,
        spec.trajectory_schedule, c.data.cache_shards,
        guidance=spec.guidance if spec.teacher.guidance_embed else None)
  return data


@workdir_lock.holding('trainer')  # One run per workdir.
def train(c: ml_collections.ConfigDict, workdir: str, *, teacher=None,
          student=None, data=None, embed_fn=None, latents_fn=None,
          sample_fn=None, mesh=None, loss: LossFn | None = None):
  """Distils `student` from `teacher` (or trains it from scratch) in workdir.

  Args:
    c: experiment config (see experiments/configs/distill_tiny.py).
    workdir: checkpoints, samples; an existing checkpoint here is resumed.
    teacher: optional (FluxConfig, params); else c.teacher (path / preset /
      neither = from-scratch rectified flow).
    student: optional (FluxConfig, params or None); else c.student. Params
      are used only when neither a workdir checkpoint nor c.init exists.
    data: a batch source; default PromptData from c.data.
    embed_fn: prompts -> {'txt', 'y'} for the default PromptData (e.g. a
      pipeline's encoder); default a random stand-in encoder.
    latents_fn: prompts -> real latents [N, L, in_channels], one per prompt,
      for the rectified-flow term on real data (loss.weights.rf > 0).
    sample_fn: (step, params) -> uint8 images, for the sample-grid hook.
    mesh: default parallel.create_mesh(c.mesh).
    loss: fn(params, frozen, batch, rng, *, spec: DistillSpec) -> (loss,
      metrics), pure and jittable; default `distill_loss`. params has
      'student' (and 'proj' with feature KD across widths), frozen
      'teacher'; batch the data's arrays (with the teacher's cached
      trajectory on spec.trajectory_schedule, when cached).
  Returns:
    (final TrainState, history of logged metrics).
  Raises:
    ValueError: the config is invalid (checked before any model is built).
    loop.TrainingInterrupted: SIGINT / SIGTERM; the last step was checkpointed.
  """
  check_config(c)
  # The student is written there at the end; refuse a foreign folder now.
  atomic.check_replaceable(os.path.join(workdir, 'student'),
                           nf_checkpoint.is_checkpoint, 'nanoflux checkpoint')
  mesh = mesh or parallel.create_mesh(dict(c.mesh))
  # Bad prompt files fail before any model is built.
  prompts = data_lib.load_prompts(c.data.prompts) if data is None else None
  rules = loop.sharding_rules(c)
  t_cfg, t_params, t_sh = _sharded_teacher(c, teacher, mesh, rules)
  s_cfg, s_params, s_sh = _student(c, student, workdir, mesh, rules)
  spec = distill_spec(c, s_cfg, t_cfg)
  if loss is None and spec.teacher_schedule is not None:
    raise ValueError(
        f'config.teacher_num_sampling_steps={c.teacher_num_sampling_steps} '
        f'differs from num_sampling_steps={c.num_sampling_steps}: the '
        'default distillation loss matches the teacher step for step; pass '
        'a loss that maps the two schedules (e.g. the step_distill rung)')
  params, sh = {'student': s_params}, {'student': s_sh}
  if t_cfg is not None and spec.pairs and (
      t_cfg.hidden_size != s_cfg.hidden_size):
    params['proj'], sh['proj'] = _projection(c, spec, mesh, rules)
  if data is None:
    data = _prompt_data(c, spec, prompts, t_params, embed_fn, latents_fn)
  frozen = {} if t_cfg is None else {'teacher': t_params}
  frozen_sh = {} if t_cfg is None else {'teacher': t_sh}
  state, history = loop.fit(
      c, workdir, loss_fn=functools.partial(loss or distill_loss, spec=spec),
      params=params, param_sh=sh, frozen=frozen, frozen_sh=frozen_sh,
      data=data, mesh=mesh, sample_fn=sample_fn,
      tokens_per_example=spec.grid[0] * spec.grid[1] + c.data.txt_len)
  if int(jax.device_get(state.step)) >= c.num_steps:
    nf_checkpoint.save(os.path.join(workdir, 'student'), s_cfg,
                       state.params['student'])
  return state, history


def default_config() -> ml_collections.ConfigDict:
  """Defaults for `train`: a tiny teacher distilled into a tiny student."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}
  c.teacher = {'path': '', 'preset': 'tiny', 'overrides': {}, 'seed': 1}
  c.student = {'preset': 'tiny', 'overrides': {}}
  c.init = ''                      # nanoflux checkpoint to start from.
  loop.add_loop_defaults(c)
  c.remat = False
  c.num_sampling_steps = 4         # the fixed schedule (schnell: 4, no shift).
  c.teacher_num_sampling_steps = None  # the teacher's, if other (a custom
                                   # loss maps the two; see `train`).
  c.guidance = None                # models with a guidance embedder (dev):
                                   # the scale both see; None: 3.5.
  # feature_pairs: ((student block, teacher block), ...) or 'identity'.
  c.loss = {'weights': {'output_kd': 1.0, 'feature_kd': 0.0, 'rf': 0.0},
            'feature_pairs': ()}
  c.timesteps = {'mode': 'schedule', 'logit_mean': 0.0, 'logit_std': 1.0,
                 'schedule_prob': 0.5}
  c.data = {'prompts': 'builtin', 'grid': (4, 4), 'txt_len': 8,
            'cache_dir': '', 'cache_shards': 8}
  return c


"""Sharded distillation / rectified-flow trainer (flax examples/lm1b style).

`train(config, workdir, ...)` is the testable entry point: it builds the mesh,
teacher (frozen, FSDP-sharded), student and optimizer state (sharded by
`parallel.RULES`), restores the newest checkpoint in `workdir` (else
`config.init`), and runs `fit`, the generic loop that the text-encoder
distillation reuses. A compression ladder calls `train` once per rung with
`student=(cfg, params)` and a workdir subfolder.

`train_step` is a pure top-level function; everything the step needs that is
not an array (loss function, optimizer, accumulation) is bound with
functools.partial before jit.

`check_config` validates a config before any model is built. On resume an
unreadable newest checkpoint is logged and moved aside, and the newest
readable one is used. SIGINT / SIGTERM stop the loop after the current step
with a checkpoint saved (as on a pod's preemption), then raise
`TrainingInterrupted`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from nanoflux_jax import atomic
from nanoflux_jax import checkpoint as nf_checkpoint
from nanoflux_jax import images
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert.safetensors_io import CheckpointError
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import losses
from nanoflux_jax.models import flux as flux_lib

LossFn = Callable[..., tuple[jax.Array, dict]]
PRESETS = ('schnell', 'dev', 'tiny', 'benchmark')
DEFAULT_GUIDANCE = 3.5  # As FluxPipeline: diffusers' FLUX.1-dev default.


class TrainingInterrupted(KeyboardInterrupt):
  """SIGINT / SIGTERM stopped training; a checkpoint of the last step was
  saved, so rerunning the same command resumes there."""


# ---------------------------------------------------------------------------
# Config validation (before any model is built).
# ---------------------------------------------------------------------------
def _field(c, path: str):
  cur = c
  for part in path.split('.'):
    if cur is None or part not in cur:
      raise ValueError(f'config.{path} is missing')
    cur = cur[part]
  return cur


def _check_int(c, path: str, low: int, optional: bool = False) -> None:
  v = _field(c, path)
  if optional and v is None:
    return
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
    raise ValueError(f'config.{path}={v!r} must be an integer >= {low}')


def _check_float(c, path: str, low: float, high: float = math.inf, *,
                 open_low: bool = False, optional: bool = False) -> None:
  v = _field(c, path)
  if optional and v is None:
    return
  ok = (not isinstance(v, bool) and isinstance(v, numbers.Real) and
        math.isfinite(v) and (v > low if open_low else v >= low) and v < high)
  if not ok:
    rng = f'{"(" if open_low else "["}{low}, {high})'
    raise ValueError(f'config.{path}={v!r} must be a finite number in {rng}')


def check_loop_config(c: ml_collections.ConfigDict) -> None:
  """Validates the fields `fit` and `make_optimizer` read.

  Raises:
    ValueError: naming `config.<field>` and what was expected.
  """
  for path, low in (('num_steps', 1), ('batch_size', 1), ('grad_accum', 1),
                    ('warmup_steps', 0), ('log_every', 1),
                    ('checkpoint_every', 1), ('keep_checkpoints', 1),
                    ('sample_every', 0), ('seed', 0)):
    _check_int(c, path, low)
  _check_int(c, 'stop_after', 0, optional=True)
  if c.batch_size % c.grad_accum:
    raise ValueError(f'config.batch_size={c.batch_size} is not divisible by '
                     f'config.grad_accum={c.grad_accum}')
  _check_float(c, 'learning_rate', 0.0, open_low=True)
  _check_float(c, 'min_lr_ratio', 0.0)
  _check_float(c, 'weight_decay', 0.0)
  _check_float(c, 'grad_clip', 0.0, open_low=True)
  _check_float(c, 'b1', 0.0, 1.0)
  _check_float(c, 'b2', 0.0, 1.0)
  if 'adam_eps' in c:
    _check_float(c, 'adam_eps', 0.0, open_low=True)
  if c.compute_dtype not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f'config.compute_dtype={c.compute_dtype!r}; expected '
                     "'float32', 'bfloat16' or 'float16'")


def _check_preset(c, path: str) -> None:
  preset = _field(c, path)
  if preset not in PRESETS:
    raise ValueError(f'config.{path}={preset!r}; expected one of {PRESETS}')


def check_config(c: ml_collections.ConfigDict) -> None:
  """Validates a `train` config (see `default_config`) before any work.

  Raises:
    ValueError: naming `config.<field>` and what was expected.
  """
  if c is None:
    raise ValueError('no config given (pass --config=<file>)')
  check_loop_config(c)
  _check_int(c, 'num_sampling_steps', 1)
  _check_int(c, 'data.txt_len', 1)
  grid = _field(c, 'data.grid')
  if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
      isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1
      for g in grid)):
    raise ValueError(f'config.data.grid={grid!r} must be two integers >= 1')
  if 'preset' in c.student:
    _check_preset(c, 'student.preset')
  if not c.teacher.get('path') and c.teacher.get('preset'):
    _check_preset(c, 'teacher.preset')
  _check_float(c, 'guidance', 0.0, optional=True)


@struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer steps taken.
  params: Any           # trainable params, e.g. {'student': ..., 'proj': ...}.
  opt_state: Any
  rng: jax.Array        # uint32[2] base key; step key = fold_in(rng, step).


# ---------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------
def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip -> AdamW with linear warmup + cosine decay; no decay on vectors."""
  lr = optax.warmup_cosine_decay_schedule(
      0.0, c.learning_rate, c.warmup_steps,
      max(c.num_steps, c.warmup_steps + 1), c.learning_rate * c.min_lr_ratio)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  return optax.chain(
      optax.clip_by_global_norm(c.grad_clip),
      optax.adamw(lr, c.b1, c.b2, eps=c.get('adam_eps', 1e-8),
                  weight_decay=c.weight_decay, mask=decay_mask))


def state_shardings(tx, params, param_shardings, mesh):
  """TrainState of NamedShardings: opt-state leaves follow their params."""
  rep = parallel.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt,
                              param_shardings,
                              transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=param_shardings, opt_state=opt, rng=rep)


# ---------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------
def train_step(state: TrainState, batch: dict, frozen: Any, *,
               loss_fn: LossFn, tx: optax.GradientTransformation,
               grad_accum: int = 1) -> tuple[TrainState, dict]:
  """One optimizer step over `grad_accum` micro-batches.

  Args:
    state: the train state (donated by the jitted wrapper).
    batch: dict of [B, ...] arrays; B divisible by grad_accum.
    frozen: non-trainable arrays the loss reads (teacher params); never
      differentiated.
    loss_fn: (params, frozen, batch, rng) -> (scalar loss, metrics dict).
  Returns:
    (new state, metrics: every loss term averaged over micro-batches,
    'grad_norm' before clipping).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    (_, metrics), grads = grad_fn(state.params, frozen, batch, rng)
  else:
    # [B] -> [B/A, A] keeps each micro-batch spread over all data shards.
    micro = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(x.shape[0] // grad_accum, grad_accum,
                                         *x.shape[1:]), 1, 0), batch)

    def body(carry, xs):
      i, mb = xs
      (_, m), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (g, m)), None

    zeros = jax.eval_shape(grad_fn, state.params, frozen,
                           jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         (zeros[1], zeros[0][1]))
    (grads, metrics), _ = jax.lax.scan(
        body, zeros, (jnp.arange(grad_accum), micro))
    grads, metrics = jax.tree.map(lambda x: x / grad_accum, (grads, metrics))
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), metrics


def compile_train_step(loss_fn, tx, grad_accum, state_sh, batch_sh, frozen_sh,
                       mesh, rules=parallel.RULES):
  """jit(train_step) with explicit in/out shardings and the state donated.

  The step is traced under `jax.set_mesh(mesh)` and `rules`, so the models'
  activation constraints (act_batch / act_len / act_embed, and every
  `layers.dense` output) are active. They are needed for correctness, not
  only speed: without them XLA's propagation may split the residual stream
  over 'tensor', and on a (data, fsdp, tensor) mesh XLA's SPMD partitioner
  then miscompiles a dot (experiments/repro_xla_sharding.py).
  """
  fn = jax.jit(
      functools.partial(train_step, loss_fn=loss_fn, tx=tx,
                        grad_accum=grad_accum),
      in_shardings=(state_sh, batch_sh, frozen_sh),
      out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=0)

  def under_mesh(f):
    @functools.wraps(f)
    def wrapped(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return f(*args)
    return wrapped

  step = under_mesh(fn)
  step.lower = under_mesh(fn.lower)  # For benchmarks' cost analysis.
  return step


# ---------------------------------------------------------------------------
# The FLUX distillation / rectified-flow loss.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Everything static the Flux loss needs (hashable)."""
  student: FluxConfig            # with the compute dtype.
  teacher: FluxConfig | None     # None: from-scratch rectified flow.
  schedule: tuple[float, ...]
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
    g = (jnp.full((b,), spec.guidance, jnp.float32)
         if model.config.guidance_embed else None)
    return model.apply({'params': p}, img=x, img_ids=img_ids,
                       txt=batch['txt'], txt_ids=txt_ids, timesteps=t,
                       y=batch['y'], guidance=g, return_intermediates=inter,
                       img_grid=spec.grid)

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
    v = run(student, params['student'], losses.interpolate(x0, noise, t_rf),
            t_rf)
    terms['rf'] = losses.rectified_flow(v, x0, noise)
  if not terms:
    raise ValueError('distill_loss: no loss term is active (no teacher and no '
                     "'latents' in the batch)")
  loss = losses.weighted_total(terms, w)
  return loss, dict(terms, loss=loss)


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------
def _check_finite(step: int, metrics: dict) -> dict:
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = sorted(k for k, v in host.items() if not math.isfinite(v))
  if bad:
    raise FloatingPointError(f'step {step}: non-finite {bad}: '
                             f'{ {k: host[k] for k in bad} }')
  return host


class _StopSignals:
  """Turns SIGINT / SIGTERM into a flag the loop checks between steps.

  Only the main thread can install signal handlers; elsewhere this is a
  no-op. A second signal while the checkpoint is being written interrupts
  at once.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt(f'second {signal.Signals(signum).name}')
    self.signum = signum
    logging.warning('%s received: stopping after this step and saving a '
                    'checkpoint', signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def _restore_newest_readable(mngr, abstract, workdir: str):
  """Restores the newest readable step -> (state, step).

  An unreadable newer step (e.g. a corrupt file after a crash) is logged
  with its error and moved aside to workdir/unreadable_checkpoints/, so the
  run continues from the step before it and can save that step again.
  Raises:
    CheckpointError: naming the folder when no step is readable.
  """
  folder = os.path.join(workdir, 'checkpoints')
  unreadable = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      # orbax raises many types (JSONDecodeError, ValueError, OSError, ...).
      logging.warning('%s: the checkpoint of step %d is unreadable (%s: %s); '
                      'trying the previous one', folder, step,
                      type(e).__name__, str(e)[:500])
      unreadable.append(step)
      continue
    if unreadable and jax.process_index() == 0:
      aside = os.path.join(workdir, 'unreadable_checkpoints')
      os.makedirs(aside, exist_ok=True)
      for bad in unreadable:
        src = os.path.join(folder, str(bad))
        if os.path.isdir(src):
          os.replace(src, os.path.join(aside, f'{bad}-{int(time.time())}'))
          logging.warning('moved the unreadable step %d to %s', bad, aside)
    if unreadable:
      mngr.reload()
    return state, step
  raise CheckpointError(f'{folder}: no readable checkpoint (steps '
                        f'{unreadable} all failed to restore; see the log)')


def fit(c: ml_collections.ConfigDict, workdir: str, *, loss_fn: LossFn,
        params, param_sh, frozen, frozen_sh, data, mesh,
        tokens_per_example: int = 0, sample_fn=None):
  """Runs (or resumes) the loop; shared by all distillation binaries.

  Args:
    c: needs num_steps, seed, grad_accum, log_every, checkpoint_every,
      keep_checkpoints, async_checkpoint, sample_every, stop_after
      (None, or stop early to simulate preemption) + make_optimizer's fields.
    params: initial trainable params (ignored when a checkpoint exists).
    data: `batch(step, process_index, process_count)` source.
    sample_fn: optional (step, params) -> uint8 [N, H, W, 3], written to
      workdir/samples/step_XXXXXXX.png every c.sample_every steps.
  Returns:
    (final state, history: list of host metric dicts at log steps).
  Raises:
    ValueError: a config field is out of range (before any work).
    TrainingInterrupted: SIGINT / SIGTERM; the last step was checkpointed.
  """
  check_loop_config(c)
  tx = make_optimizer(c)
  state_sh = state_shardings(tx, params, param_sh, mesh)
  mngr = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=c.keep_checkpoints, create=True,
          enable_async_checkpointing=c.async_checkpoint,
          cleanup_tmp_directories=True))  # Debris of interrupted saves.
  latest = mngr.latest_step()
  if latest is not None:  # Resume: the workdir checkpoint wins over --init.
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(lambda p: TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
            rng=jax.random.PRNGKey(0)), params), state_sh)
    state, latest = _restore_newest_readable(mngr, abstract, workdir)
    logging.info('resumed from %s at step %d', workdir, latest)
  else:
    init = jax.jit(lambda p: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
        rng=jax.random.PRNGKey(c.seed)), out_shardings=state_sh)
    state = init(params)
  del params
  start = int(jax.device_get(state.step))
  first = jax.tree.map(np.asarray, data.batch(start, jax.process_index(),
                                              jax.process_count()))
  batch_sh = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in first.items()}
  step_fn = compile_train_step(loss_fn, tx, c.grad_accum, state_sh, batch_sh,
                               frozen_sh, mesh)
  history, pending = [], None
  examples = c.batch_size
  t0, s0 = time.time(), start
  end = c.num_steps if c.stop_after is None else min(c.num_steps, c.stop_after)
  with _StopSignals() as stop:
    for step in range(start, end):
      local = first if step == start else data.batch(
          step, jax.process_index(), jax.process_count())
      state, metrics = step_fn(state, data_lib.to_global(local, mesh), frozen)
      if pending is not None:  # Checked one step late: keeps dispatch async.
        host = _check_finite(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      if done % c.log_every == 0 or done in (start + 1, end):  # + initial.
        host = _check_finite(*pending)
        rate = (done - s0) / max(time.time() - t0, 1e-9)
        host.update(step=done, steps_per_s=rate,
                    tokens_per_s=rate * examples * tokens_per_example)
        history.append(host)
        eta = (c.num_steps - done) / max(rate, 1e-9)
        logging.info('step %d | %s | %.2f steps/s | %.0f tokens/s | '
                     'ETA %.0fs', done, ' '.join(f'{k}={v:.4g}' for k, v in host.items()
                                    if k not in ('step', 'steps_per_s',
                                                 'tokens_per_s')),
                     rate, host['tokens_per_s'], eta)
      if done % c.checkpoint_every == 0 or done == end:
        _check_finite(*pending)  # Never save a NaN state.
        mngr.save(done, args=ocp.args.StandardSave(state))
      if (sample_fn is not None and c.sample_every and
          done % c.sample_every == 0):
        samples = sample_fn(done, state.params)
        if jax.process_index() == 0:
          images.save_grid(samples, os.path.join(workdir, 'samples',
                                                 f'step_{done:07d}.png'))
      if stop.signum is not None:
        _check_finite(*pending)
        if done % c.checkpoint_every and done != end:
          mngr.save(done, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        mngr.close()
        name = signal.Signals(stop.signum).name
        raise TrainingInterrupted(
            f'{name} at step {done}: checkpoint saved in '
            f'{os.path.join(workdir, "checkpoints")}; rerun to resume')
  if pending is not None:
    _check_finite(*pending)
  mngr.wait_until_finished()
  mngr.close()
  return state, history


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------
def _flux_config(c: ml_collections.ConfigDict,
                 where: str = 'student') -> FluxConfig:
  """FluxConfig.<c.preset>(**c.overrides); errors name config.<where>."""
  name = c.get('preset', 'tiny')
  if name not in PRESETS:
    raise ValueError(f'config.{where}.preset={name!r}; expected one of '
                     f'{PRESETS}')
  try:
    return getattr(FluxConfig, name)(**dict(c.get('overrides', {}) or {}))
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.{where}.overrides: {e}') from e


def _resolve_teacher(c, teacher, mesh):
  """(cfg, params) from the argument, config.teacher.path or a preset."""
  tc = c.teacher
  if teacher is not None:
    cfg, params = teacher
    return cfg, parallel.shard_like(params, parallel.param_shardings(cfg, mesh))
  if tc.get('path'):
    from nanoflux_jax.convert import flux as convert_flux  # pylint: disable=g-import-not-at-top
    return convert_flux.load_flux_transformer(
        tc.path, shardings=parallel.loading_shardings(mesh))
  if tc.get('preset'):  # Random teacher: toy runs, tests, benchmarks.
    cfg = _flux_config(tc, 'teacher')
    return cfg, parallel.init_flux(cfg, mesh, jax.random.PRNGKey(tc.seed))[0]
  return None, None


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
  sampling schedule over c.data.grid, loss weights, feature pairs,
  timestep sampling and guidance."""
  grid = tuple(c.data.grid)
  return DistillSpec(
      student=s_cfg.replace(dtype=c.compute_dtype),
      teacher=None if t_cfg is None else t_cfg.replace(dtype=c.compute_dtype),
      schedule=tuple(sampling.get_schedule(c.num_sampling_steps,
                                           grid[0] * grid[1], shift=False)),
      grid=grid, weights=tuple(sorted(dict(c.loss.weights).items())),
      pairs=feature_pairs(c.loss.feature_pairs, s_cfg, t_cfg),
      t_mode=c.timesteps.mode, logit_mean=c.timesteps.logit_mean,
      logit_std=c.timesteps.logit_std,
      schedule_prob=c.timesteps.schedule_prob,
      guidance=float(c.get('guidance') or DEFAULT_GUIDANCE))


def train(c: ml_collections.ConfigDict, workdir: str, *, teacher=None,
          student=None, data=None, embed_fn=None, latents_fn=None,
          sample_fn=None, mesh=None):
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
  Returns:
    (final TrainState, history of logged metrics).
  Raises:
    ValueError: the config is invalid (checked before any model is built).
    TrainingInterrupted: SIGINT / SIGTERM; the last step was checkpointed.
  """
  check_config(c)
  # The student is written there at the end; refuse a foreign folder now.
  atomic.check_replaceable(os.path.join(workdir, 'student'),
                           nf_checkpoint.is_checkpoint, 'nanoflux checkpoint')
  mesh = mesh or parallel.create_mesh(dict(c.mesh))
  # Bad prompt files fail before any model is built.
  prompts = data_lib.load_prompts(c.data.prompts) if data is None else None
  t_cfg, t_params = _resolve_teacher(c, teacher, mesh)
  s_cfg, s_params = student if student is not None else (
      _flux_config(c.student, 'student'), None)
  resuming = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints'))).latest_step()
  if s_params is None and c.get('init'):
    s_cfg = nf_checkpoint.load_config(c.init)
  s_cfg = s_cfg.replace(remat=c.remat)
  s_sh = parallel.param_shardings(s_cfg, mesh)
  if resuming is not None:  # Only shapes needed: the checkpoint has values.
    s_params = flux_lib.param_shapes(s_cfg)
  elif s_params is not None:
    s_params = parallel.shard_like(s_params, s_sh)
  elif c.get('init'):
    s_params = nf_checkpoint.load(c.init, shardings=s_sh)[1]
  else:
    s_params = parallel.init_flux(s_cfg, mesh, jax.random.PRNGKey(c.seed))[0]
  spec = distill_spec(c, s_cfg, t_cfg)
  grid, schedule, pairs = spec.grid, spec.schedule, spec.pairs
  params, sh = {'student': s_params}, {'student': s_sh}
  if t_cfg is not None and pairs and t_cfg.hidden_size != s_cfg.hidden_size:
    proj = losses.FeatureProjection(pairs, s_cfg.hidden_size,
                                    t_cfg.hidden_size)
    dummy = [jnp.zeros((1, 1, s_cfg.hidden_size))] * len(pairs)
    v, v_sh = parallel.sharded_init(proj, mesh, None,
                                    jax.random.PRNGKey(c.seed + 1), dummy)
    params['proj'], sh['proj'] = v['params'], v_sh['params']
  if data is None:
    ref = t_cfg or s_cfg
    data = data_lib.PromptData(
        prompts, embed_fn or data_lib.random_embedder(ref, c.data.txt_len,
                                                      c.seed),
        ref, grid, c.batch_size, c.seed,
        latents=None if latents_fn is None else latents_fn(prompts))
    if c.data.get('cache_dir') and t_cfg is not None:
      data = data_lib.build_cache(
          c.data.cache_dir, data, spec.teacher, t_params, schedule,
          c.data.cache_shards,
          guidance=spec.guidance if t_cfg.guidance_embed else None)
  frozen = {} if t_cfg is None else {'teacher': t_params}
  frozen_sh = {} if t_cfg is None else {
      'teacher': parallel.param_shardings(t_cfg, mesh)}
  state, history = fit(
      c, workdir, loss_fn=functools.partial(distill_loss, spec=spec),
      params=params, param_sh=sh, frozen=frozen, frozen_sh=frozen_sh,
      data=data, mesh=mesh, sample_fn=sample_fn,
      tokens_per_example=grid[0] * grid[1] + c.data.txt_len)
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
  add_loop_defaults(c)
  c.remat = False
  c.num_sampling_steps = 4         # the fixed schedule (schnell: 4, no shift).
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


def add_loop_defaults(c: ml_collections.ConfigDict) -> None:
  """The optimizer, precision and checkpointing fields `fit` reads, shared by
  every config that trains through it (DiT and text-encoder distillation)."""
  c.num_steps = 100
  c.stop_after = None              # int: stop early (preemption tests).
  c.batch_size = 8
  c.grad_accum = 1
  c.learning_rate = 1e-3
  c.min_lr_ratio = 0.1
  c.warmup_steps = 10
  c.weight_decay = 0.0
  c.b1, c.b2 = 0.9, 0.999
  c.adam_eps = 1e-8
  c.grad_clip = 1.0
  c.compute_dtype = 'bfloat16'     # params stay fp32 (master weights).
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.sample_every = 0

"""The training loop every distillation shares (flax examples/lm1b style).

`fit(c, workdir, loss_fn=..., ...)` runs (or resumes) a jitted, sharded
`train_step` over a batch source: orbax checkpoints in workdir/checkpoints
(`checkpoint_manager`), one line per logged step in workdir/metrics.jsonl
(`read_metrics`), optional sample grids and a `jax.profiler` trace of a step
range (`c.profile_steps`). The DiT trainer (trainer.py) and the
text-encoder distillation (text_encoder.py) bring their loss and data.

`train_step` is a pure top-level function; everything the step needs that is
not an array (loss function, optimizer, accumulation) is bound with
functools.partial before jit. On resume an unreadable newest checkpoint is
logged and moved aside, and the newest readable one is used. SIGINT /
SIGTERM stop the loop after the current step with a checkpoint saved (as on
a pod's preemption), then raise `TrainingInterrupted`.
"""
from __future__ import annotations

import functools
import json
import math
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
from ml_collections import config_dict
import numpy as np
import optax
import orbax.checkpoint as ocp

from nanoflux_jax import images
from nanoflux_jax import parallel
from nanoflux_jax.convert.safetensors_io import CheckpointError
from nanoflux_jax.distill import config_checks
from nanoflux_jax.distill import data as data_lib

LossFn = Callable[..., tuple[jax.Array, dict]]
METRICS_FILE = 'metrics.jsonl'
# Logged fields that are not loss terms.
RATE_KEYS = ('step', 'steps_per_s', 'tokens_per_s', 'eta_s')


class TrainingInterrupted(KeyboardInterrupt):
  """SIGINT / SIGTERM stopped training; a checkpoint of the last step was
  saved, so rerunning the same command resumes there."""


# ---------------------------------------------------------------------------
# Config validation (before any model is built).
# ---------------------------------------------------------------------------
def sharding_rules(c: ml_collections.ConfigDict):
  """parallel.RULES with the config's `sharding_rules` overrides."""
  return parallel.rules_from(c.get('sharding_rules'))


def check_loop_config(c: ml_collections.ConfigDict) -> None:
  """Validates the fields `fit` and `make_optimizer` read.

  Raises:
    ValueError: naming `config.<field>` and what was expected.
  """
  for path, low in (('num_steps', 1), ('batch_size', 1), ('grad_accum', 1),
                    ('warmup_steps', 0), ('log_every', 1),
                    ('checkpoint_every', 1), ('keep_checkpoints', 1),
                    ('sample_every', 0), ('seed', 0)):
    config_checks.check_int(c, path, low)
  config_checks.check_int(c, 'stop_after', 0, optional=True)
  sharding_rules(c)  # Raises on an unknown axis.
  profile = c.get('profile_steps')
  if profile is not None and not (
      isinstance(profile, (tuple, list)) and len(profile) == 2 and
      all(isinstance(v, int) for v in profile) and 1 <= profile[0] <= profile[1]):
    raise ValueError(f'config.profile_steps={profile!r} must be None or two '
                     'integers 1 <= first <= last')
  if c.batch_size % c.grad_accum:
    raise ValueError(f'config.batch_size={c.batch_size} is not divisible by '
                     f'config.grad_accum={c.grad_accum}')
  config_checks.check_float(c, 'learning_rate', 0.0, open_low=True)
  config_checks.check_float(c, 'min_lr_ratio', 0.0)
  config_checks.check_float(c, 'weight_decay', 0.0)
  config_checks.check_float(c, 'grad_clip', 0.0, open_low=True)
  config_checks.check_float(c, 'b1', 0.0, 1.0)
  config_checks.check_float(c, 'b2', 0.0, 1.0)
  if 'adam_eps' in c:
    config_checks.check_float(c, 'adam_eps', 0.0, open_low=True)
  if c.compute_dtype not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f'config.compute_dtype={c.compute_dtype!r}; expected '
                     "'float32', 'bfloat16' or 'float16'")


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
# Checkpoints and metrics on disk.
# ---------------------------------------------------------------------------
def checkpoint_manager(workdir: str, c: ml_collections.ConfigDict | None = None
                       ) -> ocp.CheckpointManager:
  """The orbax manager of workdir/checkpoints; read-only without a config
  (e.g. to ask for the latest step), else with c's retention options."""
  path = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if c is None:
    return ocp.CheckpointManager(path)
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=c.keep_checkpoints, create=True,
      enable_async_checkpointing=c.async_checkpoint,
      cleanup_tmp_directories=True))  # Debris of interrupted saves.


def latest_step(workdir: str) -> int | None:
  """The newest saved step in workdir/checkpoints, or None.

  Always through a CheckpointManager, never a look at the folder first: on
  several hosts the manager's construction is a collective, so every
  process must build one whatever another has written meanwhile.
  """
  return checkpoint_manager(workdir).latest_step()


def read_metrics(workdir: str) -> list[dict]:
  """The logged steps of workdir/metrics.jsonl, oldest first ([] if none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class _MetricsWriter:
  """Appends one JSON line per logged step to workdir/metrics.jsonl (process
  0 only). On resume, lines past the restored step (logged after the last
  checkpoint of a killed run) are dropped first, so steps never repeat."""

  def __init__(self, workdir: str, start: int):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = jax.process_index() == 0
    if self.enabled:
      kept = [m for m in read_metrics(workdir) if m['step'] <= start]
      os.makedirs(workdir, exist_ok=True)
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(m) + '\n' for m in kept)
      os.replace(tmp, self.path)

  def write(self, metrics: dict) -> None:
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(metrics) + '\n')


class _Profiler:
  """A jax.profiler trace of steps [a, b] (c.profile_steps = (a, b)) into
  workdir/profile, for TensorBoard / Perfetto."""

  def __init__(self, steps, workdir: str):
    self.first, self.last = (int(s) for s in steps) if steps else (0, -1)
    self.dir = os.path.join(workdir, 'profile')
    self.active = False

  def before(self, step: int) -> None:  # step: 1-based, the one to run.
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info('profile of steps %d-%d written to %s', self.first,
                   self.last, self.dir)


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
      (None, or stop early to simulate preemption), profile_steps (None or
      (first, last) 1-based steps to trace) + make_optimizer's fields.
    params: initial trainable params (ignored when a checkpoint exists).
    data: `batch(step, process_index, process_count)` source.
    sample_fn: optional (step, params) -> uint8 [N, H, W, 3], written to
      workdir/samples/step_XXXXXXX.png every c.sample_every steps.
  Returns:
    (final state, history: the host metric dicts this call logged; all
    logged steps, resumed runs included, are in workdir/metrics.jsonl).
  Raises:
    ValueError: a config field is out of range (before any work).
    TrainingInterrupted: SIGINT / SIGTERM; the last step was checkpointed.
  """
  check_loop_config(c)
  tx = make_optimizer(c)
  state_sh = state_shardings(tx, params, param_sh, mesh)
  mngr = checkpoint_manager(workdir, c)
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
                               frozen_sh, mesh, sharding_rules(c))
  history, pending = [], None
  writer = _MetricsWriter(workdir, start)
  profiler = _Profiler(c.get('profile_steps'), workdir)
  examples = c.batch_size
  t0, s0 = time.time(), start
  end = c.num_steps if c.stop_after is None else min(c.num_steps, c.stop_after)
  with _StopSignals() as stop:
    for step in range(start, end):
      local = first if step == start else data.batch(
          step, jax.process_index(), jax.process_count())
      profiler.before(step + 1)
      state, metrics = step_fn(state, data_lib.to_global(local, mesh), frozen)
      if pending is not None:  # Checked one step late: keeps dispatch async.
        host = _check_finite(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      if done % c.log_every == 0 or done in (start + 1, end):  # + initial.
        host = _check_finite(*pending)
        rate = (done - s0) / max(time.time() - t0, 1e-9)
        eta = (c.num_steps - done) / max(rate, 1e-9)
        host.update(step=done, steps_per_s=rate,
                    tokens_per_s=rate * examples * tokens_per_example,
                    eta_s=eta)
        history.append(host)
        writer.write(host)
        logging.info('step %d | %s | %.2f steps/s | %.0f tokens/s | '
                     'ETA %.0fs', done, ' '.join(f'{k}={v:.4g}' for k, v in host.items()
                                    if k not in RATE_KEYS),
                     rate, host['tokens_per_s'], eta)
      profiler.after(done, state)
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


def add_loop_defaults(c: ml_collections.ConfigDict) -> None:
  """The optimizer, precision and checkpointing fields `fit` reads, shared by
  every config that trains through it (DiT and text-encoder distillation)."""
  c.num_steps = 100
  # int: stop early (preemption tests). A typed placeholder (None until
  # set), so that --config.stop_after=2 parses on a locked config.
  c.stop_after = config_dict.placeholder(int)
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
  c.profile_steps = None           # (first, last): a jax.profiler trace.
  # Logical axis -> mesh axis / axes / None for the params, optimizer state
  # and activations: parallel.RULES, each entry overridable, e.g.
  # --config.sharding_rules.mlp=fsdp.
  c.sharding_rules = dict(parallel.RULES)


"""Text-encoder distillation (NanoFLUX rung 5): a small T5 learns the big one.

The student is a shallower and/or narrower T5 encoder plus a learned Dense
projection to the teacher's width (`StudentTextEncoder`), so it drops into the
pipeline in place of T5-XXL. Its loss has up to three terms, each with its
weight (config loss.lambda_emb, lambda_vis, lambda_vel):

  emb  masked MSE between student and teacher T5 embeddings over the non-pad
       tokens;
  vis  MSE between the FROZEN denoiser's early-block image features when it is
       conditioned on the student's vs the teacher's embeddings (NanoFLUX).
       This teaches the student the visual cues the denoiser actually reads,
       which plain embedding matching weights no differently from everything
       else;
  vel  MSE between the frozen denoiser's velocity (its whole output) with the
       student's vs the teacher's embeddings (DistillT5, CVPR 2025): what the
       embeddings finally do to the sample, at the cost of whole forwards.

Where the denoiser is probed: at the states x_t of the teacher's own Euler
trajectory (noise -> sample, conditioned on the TEACHER embeddings, on the
fixed sampling schedule), one schedule point per example drawn at random, the
same point for vis and vel. That is the distribution the student's embeddings
meet at inference. It costs `num_sampling_steps` full denoiser forwards per
step (no gradient) unless the batch carries a cached trajectory 'traj_x'. vis
uses only the early blocks' outputs, so under jit XLA drops the later blocks
of its two probing forwards; vel runs two whole forwards.

Training reuses `loop.fit` (orbax resume, per-term logging, NaN check): the
trainable tree is the student's params; the teacher T5 and the denoiser live in
`frozen`, which `fit` never differentiates, and every read of them is also
wrapped in stop_gradient.

Both encoders are run WITHOUT an attention mask, as FLUX's pipeline runs T5
(diffusers does not pass one), so the pad positions the denoiser attends to
are produced exactly as at inference; the mask only selects the tokens the
embedding term averages over.
"""
from __future__ import annotations

import dataclasses
import functools
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np

from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.call_args import DEFAULT_GUIDANCE
from nanoflux_jax.compress import student_t5 as te_student
from nanoflux_jax.configs import FluxConfig, T5Config
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import losses
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import teacher as teacher_lib
from nanoflux_jax.distill import workdir_lock
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models import sharding
# StudentTextEncoder lives in models/ so that the pipeline can run it.
from nanoflux_jax.models.t5 import StudentTextEncoder
from nanoflux_jax.models.t5 import T5Encoder
from nanoflux_jax.pipeline import FluxPipeline

Array = jax.Array
STUDENT_DIR = 'student_text_encoder'


# ---------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextDistillSpec:
  """Everything static the loss needs (hashable).

  Attributes:
    student, teacher: T5 configs (with the compute dtype).
    out_dim: the student projection's width (= teacher.d_model).
    denoiser: the frozen FLUX DiT's config (with the compute dtype).
    schedule: the sampler's n + 1 timesteps from 1 to 0.
    grid: (h, w) packed image-token grid of the probe images.
    vis_blocks: global block indices (double blocks first, then single) whose
      image tokens the vis term compares.
    lambda_emb, lambda_vis, lambda_vel: term weights; lambda_vis=0 (and
      lambda_vel=0) is the embedding-only ablation.
    vis_normalize: compare features by ||s - t||^2 / ||t||^2 (scale-free
      across blocks) instead of plain MSE.
    monitor_vis: with lambda_vis=0, still compute the vis term (without a
      gradient) so that the ablation logs the same metrics.
    monitor_vel: the same for vel (off by default: two whole forwards).
    guidance: guidance scale for guidance-distilled (dev) denoisers.
  """
  student: T5Config
  teacher: T5Config
  out_dim: int
  denoiser: FluxConfig
  schedule: tuple[float, ...]
  grid: tuple[int, int]
  vis_blocks: tuple[int, ...] = (0,)
  lambda_emb: float = 1.0
  lambda_vis: float = 1.0
  vis_normalize: bool = False
  monitor_vis: bool = True
  guidance: float = DEFAULT_GUIDANCE
  lambda_vel: float = 0.0
  monitor_vel: bool = False

  def __post_init__(self):
    if self.out_dim != self.teacher.d_model:
      raise ValueError(f'TextDistillSpec: out_dim={self.out_dim} must equal '
                       f'the teacher T5 d_model={self.teacher.d_model}')
    if self.denoiser.context_in_dim != self.teacher.d_model:
      raise ValueError(
          f'TextDistillSpec: the denoiser reads {self.denoiser.context_in_dim}'
          f'-wide text but the teacher T5 d_model is {self.teacher.d_model}')
    n = self.denoiser.num_blocks
    bad = [k for k in self.vis_blocks if not 0 <= k < n]
    if bad:
      raise ValueError(f'TextDistillSpec: vis_blocks {self.vis_blocks} has '
                       f'{bad} outside the denoiser\'s blocks [0, {n - 1}]')
    if len(self.schedule) < 2:
      raise ValueError(f'TextDistillSpec: schedule {self.schedule} needs at '
                       'least 2 points')

  @property
  def vis_active(self) -> bool:
    return bool(self.vis_blocks) and (self.lambda_vis > 0 or self.monitor_vis)

  @property
  def vel_active(self) -> bool:
    return self.lambda_vel > 0 or self.monitor_vel


def _guidance(spec: TextDistillSpec, b: int) -> Array | None:
  if not spec.denoiser.guidance_embed:
    return None
  return jnp.full((b,), spec.guidance, jnp.float32)


def teacher_states(spec: TextDistillSpec, params, noise: Array, txt: Array,
                   y: Array) -> Array:
  """The teacher's Euler trajectory states on the schedule (no gradient).

  Args:
    params: the denoiser's params.
    noise: [B, L, C] x at schedule[0].
    txt: [B, T, context] the TEACHER embeddings; y: [B, vec] pooled vector.
  Returns:
    [B, n, L, C] float32: x at schedule[0 .. n-1], the points where the
    sampler evaluates the model.
  """
  xs, _, _ = sampling.trajectory(
      spec.denoiser, params, noise, txt, y,
      jnp.asarray(spec.schedule, jnp.float32),
      _guidance(spec, noise.shape[0]), img_grid=spec.grid)
  return jax.lax.stop_gradient(xs)


def early_features(spec: TextDistillSpec, params, x: Array, t: Array,
                   txt: Array, y: Array) -> list[Array]:
  """The denoiser's image tokens after each of spec.vis_blocks.

  Args:
    x: [B, L, C] state; t: [B] timesteps; txt: [B, T, context]; y: [B, vec].
  Returns:
    one [B, L', hidden] per block (L' = L, or coarse under a down-sampler).
  """
  b = x.shape[0]
  feats = flux_lib.Flux(spec.denoiser).apply(
      {'params': params}, img=x, img_ids=sampling.image_ids(b, *spec.grid),
      txt=txt, txt_ids=sampling.text_ids(b, txt.shape[1]), timesteps=t, y=y,
      guidance=_guidance(spec, b), return_intermediates=True,
      img_grid=spec.grid).intermediates
  return [feats['img'][k] for k in spec.vis_blocks]


def velocity(spec: TextDistillSpec, params, x: Array, t: Array, txt: Array,
             y: Array) -> Array:
  """The denoiser's velocity [B, L, C] at state x [B, L, C], timesteps t [B],
  text txt [B, T, context] and pooled y [B, vec]."""
  b = x.shape[0]
  return flux_lib.Flux(spec.denoiser).apply(
      {'params': params}, img=x, img_ids=sampling.image_ids(b, *spec.grid),
      txt=txt, txt_ids=sampling.text_ids(b, txt.shape[1]), timesteps=t, y=y,
      guidance=_guidance(spec, b), img_grid=spec.grid).velocity


def text_distill_loss(params, frozen, batch: dict, rng: Array, *,
                      spec: TextDistillSpec) -> tuple[Array, dict]:
  """lambda_emb * emb + lambda_vis * vis + lambda_vel * vel (see the
  module docstring).

  Args:
    params: StudentTextEncoder params (the only thing differentiated).
    frozen: {'t5': teacher T5Encoder params, 'flux': denoiser params}.
    batch: ids [B, T] int32, mask [B, T] (1 = real token), y [B, vec],
      noise [B, L, C]; optional teacher_txt [B, T, d] (cached teacher
      embeddings) and traj_x [B, n, L, C] (cached `teacher_states`).
    rng: picks one schedule point per example.
  Returns:
    (scalar loss, {'emb', 'vis', 'vel' (those active), 'loss'}), float32.
  """
  frozen = jax.lax.stop_gradient(frozen)
  ids = batch['ids']
  s_txt = StudentTextEncoder(spec.student, spec.out_dim).apply(
      {'params': params}, ids)
  if 'teacher_txt' in batch:
    t_txt = batch['teacher_txt']
  else:
    t_txt = T5Encoder(spec.teacher).apply({'params': frozen['t5']}, ids)
  t_txt = jax.lax.stop_gradient(t_txt.astype(jnp.float32))
  terms = {'emb': losses.mse(s_txt, t_txt, batch['mask'])}
  if spec.vis_active or spec.vel_active:
    y, b = batch['y'], ids.shape[0]
    xs = batch['traj_x'] if 'traj_x' in batch else teacher_states(
        spec, frozen['flux'], batch['noise'], t_txt, y)
    t, idx, _ = losses.sample_timesteps(rng, b, spec.schedule)
    x_t = jnp.take_along_axis(xs, idx[:, None, None, None], axis=1)[:, 0]
    x_t = jax.lax.stop_gradient(x_t)
  if spec.vel_active:
    v_t = jax.lax.stop_gradient(
        velocity(spec, frozen['flux'], x_t, t, t_txt, y))
    s_in = s_txt if spec.lambda_vel > 0 else jax.lax.stop_gradient(s_txt)
    terms['vel'] = losses.mse(velocity(spec, frozen['flux'], x_t, t, s_in, y),
                              v_t)
  if spec.vis_active:
    feats_t = early_features(spec, frozen['flux'], x_t, t, t_txt, y)
    s_in = s_txt if spec.lambda_vis > 0 else jax.lax.stop_gradient(s_txt)
    feats_s = early_features(spec, frozen['flux'], x_t, t, s_in, y)
    compare = losses.normalized_feature_loss if spec.vis_normalize else (
        lambda s, t_: losses.mse(s, jax.lax.stop_gradient(t_)))
    terms['vis'] = sum(compare(s, t_) for s, t_ in zip(feats_s, feats_t)
                       ) / len(feats_s)
  loss = losses.weighted_total(terms, {'emb': spec.lambda_emb,
                                       'vis': spec.lambda_vis,
                                       'vel': spec.lambda_vel})
  return loss, dict(terms, loss=loss)


# ---------------------------------------------------------------------------
# Data: token ids, a pooled vector and fresh noise per step.
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
def _t5_shardings(module: nn.Module, mesh, rules):
  return parallel.variable_shardings(module, mesh, rules,
                                     te_student.dummy_ids())['params']


def _resolve_models(c, teacher_t5, denoiser, mesh):
  """-> (t5 (cfg, params), flux (cfg, params), pipeline or None)."""
  pipe = None
  if (teacher_t5 is None or denoiser is None) and c.get('pipeline'):
    pipe = FluxPipeline.from_pretrained(c.pipeline, mesh=mesh)
    teacher_t5 = teacher_t5 or (pipe.t5_cfg, pipe.t5_params)
  if teacher_t5 is None:  # Random teacher: toy runs and tests.
    tc = c.teacher_t5
    cfg = getattr(T5Config, tc.preset)(**dict(tc.get('overrides', {}) or {}))
    module = T5Encoder(cfg)
    params = jax.jit(lambda r: nn.meta.unbox(module.init(
        r, te_student.dummy_ids())['params']))(jax.random.PRNGKey(tc.seed))
    teacher_t5 = (cfg, params)
  if denoiser is None:  # The pipeline's, else a random preset.
    dc = ml_collections.ConfigDict(c.denoiser.to_dict())
    dc.overrides = {'context_in_dim': teacher_t5[0].d_model,
                    **dict(dc.get('overrides', {}) or {})}
    denoiser = teacher_lib.load_teacher(dc, mesh, pipe)
  return teacher_t5, denoiser, pipe


def _token_arrays(c, t5_cfg, flux_cfg, tokenizer, tokens, pipe):
  """-> {'ids', 'mask', 'y'} from `tokens`, a tokenizer, the pipeline or
  random ids (in that order)."""
  length = c.data.txt_len
  if tokens is not None:
    tokens = dict(tokens)
  elif tokenizer is not None:
    ids, mask = data_lib.tokenize(tokenizer, data_lib.load_prompts(c.data.prompts),
                         length)
    tokens = {'ids': ids, 'mask': mask}
  elif pipe is not None:
    tokens = data_lib.pipeline_tokens(pipe, data_lib.load_prompts(c.data.prompts),
                             length)
  else:
    ids, mask = data_lib.random_tokens(c.data.num_prompts, length, t5_cfg.vocab_size,
                              c.seed)
    tokens = {'ids': ids, 'mask': mask}
  ids = np.asarray(tokens['ids'])
  if 'mask' not in tokens:  # T5's pad id is 0.
    tokens['mask'] = (ids != 0).astype(np.int32)
  if 'y' not in tokens:
    tokens['y'] = data_lib.random_pooled(len(ids), flux_cfg.vec_in_dim, c.seed)
  if ids.ndim != 2 or (ids < 0).any() or (ids >= t5_cfg.vocab_size).any():
    raise ValueError(f'token ids {ids.shape} must be [N, T] in [0, '
                     f'{t5_cfg.vocab_size})')
  return tokens


def _student(c, t_cfg, t_params, out_dim):
  """-> (student config, initial params) from c.student."""
  sc = c.student
  s_cfg = te_student.student_t5_config(
      t_cfg, num_layers=sc.get('num_layers'), d_model=sc.get('d_model'),
      num_heads=sc.get('num_heads'), d_ff=sc.get('d_ff'),
      dtype='float32', param_dtype='float32')
  how = sc.get('init', 'auto')
  if how not in ('auto', 'teacher', 'random'):
    raise ValueError(f"student.init={how!r}; expected 'auto', 'teacher' or "
                     "'random'")
  same = all(getattr(s_cfg, k) == getattr(t_cfg, k) for k in te_student.SHAPE_FIELDS)
  if how == 'teacher' or (how == 'auto' and same):
    layer_map = sc.get('layer_map')
    return s_cfg, te_student.init_from_teacher(t_cfg, t_params, s_cfg, layer_map)
  return s_cfg, te_student.init_student(s_cfg, out_dim, jax.random.PRNGKey(c.seed))


@workdir_lock.holding('text-encoder distillation')  # One run per workdir.
def train_text_encoder(c: ml_collections.ConfigDict, workdir: str, *,
                       teacher_t5=None, denoiser=None, tokenizer=None,
                       tokens=None, data=None, mesh=None):
  """Distils a small T5 from the teacher T5 through the frozen denoiser.

  Args:
    c: experiment config (see `default_config`).
    workdir: train checkpoints (resumed when present) and, at the end,
      workdir/student_text_encoder (a `save_student` checkpoint).
    teacher_t5: optional (T5Config, params); else from c.pipeline or the
      c.teacher_t5 preset (random).
    denoiser: optional (FluxConfig, params); else from c.pipeline or the
      c.denoiser preset (random, context_in_dim = teacher d_model).
    tokenizer: optional HF T5 tokenizer for c.data.prompts.
    tokens: optional {'ids' [N, T], 'mask' [N, T], 'y' [N, vec]} (mask
      defaults to ids != 0, y to a random stand-in pooled vector).
    data: optional batch source (overrides tokens / tokenizer).
    mesh: default parallel.create_mesh(c.mesh).
  Returns:
    (final TrainState, history of logged metrics: emb, vis, loss, ...).
  """
  mesh = mesh or parallel.create_mesh(dict(c.mesh))
  (t_cfg, t_params), (f_cfg, f_params), pipe = _resolve_models(
      c, teacher_t5, denoiser, mesh)
  out_dim = t_cfg.d_model
  s_cfg, s_params = _student(c, t_cfg, t_params, out_dim)
  grid = tuple(c.data.grid)
  schedule = tuple(sampling.schedule_for(f_cfg, c.num_sampling_steps,
                                         grid[0] * grid[1]))
  dt = c.compute_dtype
  spec = TextDistillSpec(
      student=s_cfg.replace(dtype=dt), teacher=t_cfg.replace(dtype=dt),
      out_dim=out_dim, denoiser=f_cfg.replace(dtype=dt), schedule=schedule,
      grid=grid, vis_blocks=tuple(int(k) for k in c.loss.vis_blocks),
      lambda_emb=float(c.loss.lambda_emb), lambda_vis=float(c.loss.lambda_vis),
      vis_normalize=bool(c.loss.vis_normalize),
      monitor_vis=bool(c.loss.monitor_vis),
      guidance=float(c.get('guidance', DEFAULT_GUIDANCE)),
      lambda_vel=float(c.loss.get('lambda_vel', 0.0)),
      monitor_vel=bool(c.loss.get('monitor_vel', False)))
  if data is None:
    arrays = _token_arrays(c, t_cfg, f_cfg, tokenizer, tokens, pipe)
    data = data_lib.TokenData(arrays['ids'], arrays['mask'], arrays['y'],
                              grid, f_cfg.in_channels, c.batch_size, c.seed)
  rules = loop.sharding_rules(c)
  s_sh = _t5_shardings(StudentTextEncoder(s_cfg, out_dim), mesh, rules)
  frozen_sh = {'t5': _t5_shardings(T5Encoder(t_cfg), mesh, rules),
               'flux': sharding.param_shardings(f_cfg, mesh, rules)}
  frozen = parallel.shard_like({'t5': t_params, 'flux': f_params}, frozen_sh)
  logging.info('text-encoder distillation: student %s -> %d, vis blocks %s, '
               'lambda emb %g vis %g vel %g', s_cfg, out_dim, spec.vis_blocks,
               spec.lambda_emb, spec.lambda_vis, spec.lambda_vel)
  state, history = loop.fit(
      c, workdir, loss_fn=functools.partial(text_distill_loss, spec=spec),
      params=parallel.shard_like(s_params, s_sh), param_sh=s_sh,
      frozen=frozen, frozen_sh=frozen_sh, data=data, mesh=mesh,
      tokens_per_example=c.data.txt_len)
  if int(jax.device_get(state.step)) >= c.num_steps:
    te_student.save_student(os.path.join(workdir, STUDENT_DIR), s_cfg, out_dim,
                 state.params)
  return state, history


def default_config() -> ml_collections.ConfigDict:
  """Defaults: a tiny random teacher T5 + tiny FLUX, a 1-layer student."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}
  # A FluxPipeline folder (nanoflux or diffusers layout): teacher T5,
  # denoiser, T5 tokenizer and CLIP pooled vectors. Empty: random presets.
  c.pipeline = ''
  c.teacher_t5 = {'preset': 'tiny', 'overrides': {}, 'seed': 1}
  c.denoiser = {'preset': 'tiny', 'overrides': {}, 'seed': 2}
  c.student = {
      'num_layers': config_dict.placeholder(int),  # None: teacher's.
      'd_model': config_dict.placeholder(int),
      'num_heads': config_dict.placeholder(int),
      'd_ff': config_dict.placeholder(int),
      # 'teacher' (init_from_teacher), 'random', or 'auto': teacher when
      # the widths match, else random.
      'init': 'auto',
      'layer_map': config_dict.placeholder(tuple),  # None: evenly spaced.
  }
  loop.add_loop_defaults(c)
  c.num_sampling_steps = 4       # the denoiser's fixed schedule.
  c.guidance = DEFAULT_GUIDANCE  # dev denoisers only.
  # lambda_vel > 0: the DistillT5 velocity term (see the module docstring).
  c.loss = {'lambda_emb': 1.0, 'lambda_vis': 1.0, 'vis_blocks': (0,),
            'vis_normalize': False, 'monitor_vis': True, 'lambda_vel': 0.0,
            'monitor_vel': False}
  c.data = {'prompts': 'builtin', 'txt_len': 16, 'grid': (4, 4),
            'num_prompts': 64}   # num_prompts: random ids without tokenizer.
  return c

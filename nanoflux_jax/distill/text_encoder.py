"""Text-encoder distillation (NanoFLUX rung 5): a small T5 learns the big one.

The student is a shallower and/or narrower T5 encoder plus a learned Dense
projection to the teacher's width (`StudentTextEncoder`), so it drops into the
pipeline in place of T5-XXL. Its loss has two terms:

  emb  masked MSE between student and teacher T5 embeddings over the non-pad
       tokens;
  vis  MSE between the FROZEN denoiser's early-block image features when it is
       conditioned on the student's vs the teacher's embeddings. This teaches
       the student the visual cues the denoiser actually reads, which plain
       embedding matching weights no differently from everything else.

Where the denoiser is probed: at the states x_t of the teacher's own Euler
trajectory (noise -> sample, conditioned on the TEACHER embeddings, on the
fixed sampling schedule), one schedule point per example drawn at random. That
is the distribution the student's embeddings meet at inference. It costs
`num_sampling_steps` full denoiser forwards per step (no gradient) unless the
batch carries a cached trajectory 'traj_x'. Only the early blocks' outputs are
used, so under jit XLA drops the later blocks of the two probing forwards.

Training reuses `trainer.fit` (orbax resume, per-term logging, NaN check): the
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
import hashlib
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np

from nanoflux_jax import checkpoint as nf_checkpoint
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig, T5Config
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import losses
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import flux as flux_lib
# StudentTextEncoder lives in models/ so that the pipeline can run it.
from nanoflux_jax.models.t5 import StudentTextEncoder
from nanoflux_jax.models.t5 import student_from_checkpoint
from nanoflux_jax.models.t5 import T5Encoder

Array = jax.Array
STUDENT_DIR = 'student_text_encoder'
DEFAULT_GUIDANCE = 3.5  # diffusers' FLUX.1-dev default; unused for schnell.
# Fields that fix the shape of some T5 parameter other than the layer count.
_SHAPE_FIELDS = ('vocab_size', 'd_model', 'd_kv', 'num_heads', 'd_ff',
                 'relative_attention_num_buckets')


# ---------------------------------------------------------------------------
# The student.
# ---------------------------------------------------------------------------
def student_t5_config(teacher: T5Config, num_layers: int | None = None,
                      d_model: int | None = None, num_heads: int | None = None,
                      d_kv: int | None = None, d_ff: int | None = None,
                      **overrides) -> T5Config:
  """A smaller T5 derived from the teacher's config.

  Unset fields keep the teacher's value, except that a narrower d_model also
  narrows what scales with it: num_heads = d_model // d_kv (the per-head
  width is kept) and d_ff scales by d_model / teacher.d_model.

  Args:
    teacher: the teacher encoder's config.
    num_layers, d_model, num_heads, d_kv, d_ff: student sizes (None: derived).
    **overrides: any other T5Config field (dtype, ...).
  Raises:
    ValueError: a size is not positive, or d_model is not a multiple of d_kv
      when num_heads is derived.
  """
  d_model = teacher.d_model if d_model is None else int(d_model)
  d_kv = teacher.d_kv if d_kv is None else int(d_kv)
  if num_heads is None:
    if d_model == teacher.d_model:
      num_heads = teacher.num_heads
    elif d_model % d_kv:
      raise ValueError(f'student_t5_config: d_model={d_model} is not a '
                       f'multiple of d_kv={d_kv}; pass num_heads')
    else:
      num_heads = d_model // d_kv
  if d_ff is None:
    d_ff = max(1, round(teacher.d_ff * d_model / teacher.d_model))
  cfg = teacher.replace(
      num_layers=teacher.num_layers if num_layers is None else int(num_layers),
      d_model=d_model, d_kv=d_kv, num_heads=int(num_heads), d_ff=int(d_ff),
      **overrides)
  bad = {k: getattr(cfg, k) for k in ('num_layers', 'd_model', 'd_kv',
                                      'num_heads', 'd_ff')
         if getattr(cfg, k) < 1}
  if bad:
    raise ValueError(f'student_t5_config: sizes must be >= 1, got {bad}')
  return cfg


def _dummy_ids(length: int = 4) -> Array:
  return jnp.zeros((1, length), jnp.int32)


def init_student(config: T5Config, out_dim: int, rng: Array) -> dict:
  """Random (unboxed) StudentTextEncoder params, jitted like Flux init."""
  init = jax.jit(lambda r: StudentTextEncoder(config, out_dim).init(
      r, _dummy_ids())['params'])
  return nn.meta.unbox(init(rng))


def default_layer_map(teacher_layers: int,
                      student_layers: int) -> tuple[int, ...]:
  """Evenly spaced teacher layers, first and last included: 24 -> 6 gives
  (0, 5, 9, 14, 18, 23); equal depths give the identity."""
  if student_layers == 1:
    return (0,)
  return tuple(int(i) for i in np.round(
      np.linspace(0, teacher_layers - 1, student_layers)))


def init_from_teacher(teacher_cfg: T5Config, teacher_params,
                      student_cfg: T5Config,
                      layer_map: Sequence[int] | None = None) -> dict:
  """Block-wise init: the student starts as a subset of the teacher's layers.

  Copies the token embedding, the shared relative attention bias, the final
  norm and, for student layer i, teacher layer layer_map[i]; the projection
  starts as the identity (the widths are equal), so a student holding every
  teacher layer reproduces the teacher exactly.

  Args:
    teacher_cfg, teacher_params: the teacher T5Encoder (params tree of
      `T5Encoder`, as loaded by convert.text_encoders.load_t5_encoder).
    student_cfg: the student's config; every shape field but num_layers must
      equal the teacher's.
    layer_map: teacher layer index per student layer; None: evenly spaced.
  Returns:
    StudentTextEncoder params {'t5': ..., 'proj': ...} in the student's
    param_dtype (fresh copies: the train state is donated, the teacher's
    buffers must survive it).
  Raises:
    ValueError: widths differ (names the fields; use `init_student` for a
      narrower student), layer_map has the wrong length or an index outside
      [0, teacher layers).
    KeyError: teacher_params lacks a tree entry the copy needs.
  """
  diff = {k: (getattr(teacher_cfg, k), getattr(student_cfg, k))
          for k in _SHAPE_FIELDS
          if getattr(teacher_cfg, k) != getattr(student_cfg, k)}
  if diff:
    raise ValueError(
        'init_from_teacher: cannot copy teacher layers into a student of a '
        'different width; (teacher, student) differ in '
        f'{diff}. Initialise such a student randomly (init_student / '
        "config student.init='random').")
  n_t, n_s = teacher_cfg.num_layers, student_cfg.num_layers
  layer_map = (default_layer_map(n_t, n_s) if layer_map is None
               else tuple(int(j) for j in layer_map))
  if len(layer_map) != n_s:
    raise ValueError(f'init_from_teacher: layer_map {layer_map} has '
                     f'{len(layer_map)} entries but the student has {n_s} '
                     'layers')
  bad = [j for j in layer_map if not 0 <= j < n_t]
  if bad:
    raise ValueError(f'init_from_teacher: layer_map {layer_map} has indices '
                     f'{bad} outside the teacher\'s layers [0, {n_t - 1}]')
  dtype = jnp.dtype(student_cfg.param_dtype)
  teacher_params = nn.meta.unbox(teacher_params)

  def take(key):
    if key not in teacher_params:
      raise KeyError(f'init_from_teacher: teacher params have no {key!r} '
                     f'(top-level keys: {sorted(teacher_params)})')
    return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True),
                        teacher_params[key])

  t5 = {k: take(k) for k in ('token_embed', 'relative_attention_bias',
                             'final_norm')}
  for i, j in enumerate(layer_map):
    t5[f'layers_{i}'] = take(f'layers_{j}')
  d = student_cfg.d_model
  proj = {'kernel': jnp.eye(d, dtype=dtype), 'bias': jnp.zeros((d,), dtype)}
  return {'t5': t5, 'proj': proj}


def save_student(path: str, config: T5Config, out_dim: int, params) -> None:
  """nanoflux checkpoint with config {'t5': T5Config dict, 'out_dim': int}."""
  nf_checkpoint.save(path, {'t5': config.to_dict(), 'out_dim': int(out_dim)},
                     params)


def load_student(path: str, shardings=None) -> tuple[T5Config, int, Any]:
  """-> (student T5Config, out_dim, params) from a `save_student` folder."""
  return student_from_checkpoint(
      *nf_checkpoint.load(path, shardings=shardings), path)


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
    lambda_emb, lambda_vis: term weights; lambda_vis=0 is the
      embedding-only ablation.
    vis_normalize: compare features by ||s - t||^2 / ||t||^2 (scale-free
      across blocks) instead of plain MSE.
    monitor_vis: with lambda_vis=0, still compute the vis term (without a
      gradient) so that the ablation logs the same metrics.
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


def _guidance(spec: TextDistillSpec, b: int) -> Array | None:
  if not spec.denoiser.guidance_embed:
    return None
  return jnp.full((b,), spec.guidance, jnp.float32)


def teacher_states(spec: TextDistillSpec, params, noise: Array, txt: Array,
                   y: Array) -> Array:
  """The teacher's Euler trajectory states on the schedule (no gradient).

  data.teacher_trajectory does the same for plain DiTs; this one also passes
  guidance and img_grid, so dev and token-down-sampling denoisers work.

  Args:
    params: the denoiser's params.
    noise: [B, L, C] x at schedule[0].
    txt: [B, T, context] the TEACHER embeddings; y: [B, vec] pooled vector.
  Returns:
    [B, n, L, C] float32: x at schedule[0 .. n-1], the points where the
    sampler evaluates the model.
  """
  b = noise.shape[0]
  model = flux_lib.Flux(spec.denoiser)
  img_ids = sampling.image_ids(b, *spec.grid)
  txt_ids = sampling.text_ids(b, txt.shape[1])
  ts = jnp.asarray(spec.schedule, jnp.float32)
  guidance = _guidance(spec, b)

  def step(x, k):
    v = model.apply({'params': params}, img=x, img_ids=img_ids, txt=txt,
                    txt_ids=txt_ids, timesteps=jnp.full((b,), ts[k]), y=y,
                    guidance=guidance, img_grid=spec.grid)
    return x + (ts[k + 1] - ts[k]) * v.astype(jnp.float32), x

  _, xs = jax.lax.scan(step, noise.astype(jnp.float32),
                       jnp.arange(len(spec.schedule) - 1))
  return jax.lax.stop_gradient(jnp.swapaxes(xs, 0, 1))


def early_features(spec: TextDistillSpec, params, x: Array, t: Array,
                   txt: Array, y: Array) -> list[Array]:
  """The denoiser's image tokens after each of spec.vis_blocks.

  Args:
    x: [B, L, C] state; t: [B] timesteps; txt: [B, T, context]; y: [B, vec].
  Returns:
    one [B, L', hidden] per block (L' = L, or coarse under a down-sampler).
  """
  b = x.shape[0]
  _, feats = flux_lib.Flux(spec.denoiser).apply(
      {'params': params}, img=x, img_ids=sampling.image_ids(b, *spec.grid),
      txt=txt, txt_ids=sampling.text_ids(b, txt.shape[1]), timesteps=t, y=y,
      guidance=_guidance(spec, b), return_intermediates=True,
      img_grid=spec.grid)
  return [feats['img'][k] for k in spec.vis_blocks]


def text_distill_loss(params, frozen, batch: dict, rng: Array, *,
                      spec: TextDistillSpec) -> tuple[Array, dict]:
  """lambda_emb * emb + lambda_vis * vis (see the module docstring).

  Args:
    params: StudentTextEncoder params (the only thing differentiated).
    frozen: {'t5': teacher T5Encoder params, 'flux': denoiser params}.
    batch: ids [B, T] int32, mask [B, T] (1 = real token), y [B, vec],
      noise [B, L, C]; optional teacher_txt [B, T, d] (cached teacher
      embeddings) and traj_x [B, n, L, C] (cached `teacher_states`).
    rng: picks one schedule point per example.
  Returns:
    (scalar loss, {'emb', 'vis' (when active), 'loss'}), float32.
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
  if spec.vis_active:
    y, b = batch['y'], ids.shape[0]
    xs = batch['traj_x'] if 'traj_x' in batch else teacher_states(
        spec, frozen['flux'], batch['noise'], t_txt, y)
    t, idx, _ = losses.sample_timesteps(rng, b, spec.schedule)
    x_t = jnp.take_along_axis(xs, idx[:, None, None, None], axis=1)[:, 0]
    x_t = jax.lax.stop_gradient(x_t)
    feats_t = early_features(spec, frozen['flux'], x_t, t, t_txt, y)
    s_in = s_txt if spec.lambda_vis > 0 else jax.lax.stop_gradient(s_txt)
    feats_s = early_features(spec, frozen['flux'], x_t, t, s_in, y)
    compare = losses.normalized_feature_loss if spec.vis_normalize else (
        lambda s, t_: losses.mse(s, jax.lax.stop_gradient(t_)))
    terms['vis'] = sum(compare(s, t_) for s, t_ in zip(feats_s, feats_t)
                       ) / len(feats_s)
  loss = losses.weighted_total(terms, {'emb': spec.lambda_emb,
                                       'vis': spec.lambda_vis})
  return loss, dict(terms, loss=loss)


# ---------------------------------------------------------------------------
# Data: token ids, a pooled vector and fresh noise per step.
# ---------------------------------------------------------------------------
def random_tokens(num: int, length: int, vocab_size: int, seed: int = 0,
                  pad_id: int = 0, eos_id: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Stand-in tokenised prompts for toy runs: random ids, EOS, then padding.

  Returns:
    (ids [num, length] int32, mask [num, length] int32), lengths (EOS
    included) uniform in [max(2, length // 4), length].
  """
  if vocab_size <= max(pad_id, eos_id) + 1:
    raise ValueError(f'random_tokens: vocab_size={vocab_size} too small')
  r = np.random.default_rng(seed)
  lo = min(length, max(2, length // 4))
  lens = r.integers(lo, length + 1, num)
  ids = r.integers(max(pad_id, eos_id) + 1, vocab_size, (num, length))
  pos = np.arange(length)[None]
  ids = np.where(pos == lens[:, None] - 1, eos_id, ids)
  ids = np.where(pos >= lens[:, None], pad_id, ids).astype(np.int32)
  return ids, (pos < lens[:, None]).astype(np.int32)


def tokenize(tokenizer, prompts: Sequence[str],
             length: int) -> tuple[np.ndarray, np.ndarray]:
  """HF T5 tokenizer -> (ids, mask) [N, length] int32, padded/truncated."""
  out = tokenizer(list(prompts), padding='max_length', max_length=length,
                  truncation=True)
  return (np.asarray(out['input_ids'], np.int32),
          np.asarray(out['attention_mask'], np.int32))


def pipeline_tokens(pipe, prompts: Sequence[str], length: int,
                    chunk: int = 64) -> dict[str, np.ndarray]:
  """{'ids', 'mask', 'y'} from a FluxPipeline: T5 ids as the pipeline
  tokenizes them and the pooled CLIP vector the denoiser is conditioned on."""
  from nanoflux_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  ids, clip_ids = pipe.tokenize(prompts, length)
  pad = pipe.tokenizer_2.pad_token_id
  y = np.concatenate([
      np.asarray(pipeline_lib._clip_pooled(  # pylint: disable=protected-access
          pipe.clip_cfg, pipe.clip_params, clip_ids[i:i + chunk]))
      for i in range(0, len(clip_ids), chunk)])
  return {'ids': ids, 'mask': (ids != pad).astype(np.int32), 'y': y}


def random_pooled(num: int, dim: int, seed: int = 0) -> np.ndarray:
  """A fixed stand-in pooled CLIP vector per row [num, dim] (toy runs)."""
  h = int.from_bytes(hashlib.sha256(f'pooled:{seed}'.encode()).digest()[:8],
                     'little')
  return np.random.default_rng(h).standard_normal((num, dim)).astype(
      np.float32)


class TokenData:
  """Rows of (ids, mask, y) plus fresh noise; batch(step) is a pure function
  of (seed, step), so a resumed run sees the batches it would have seen."""

  def __init__(self, ids: np.ndarray, mask: np.ndarray, y: np.ndarray,
               grid: tuple[int, int], in_channels: int, batch_size: int,
               seed: int = 0):
    """ids, mask: [N, T]; y: [N, vec]; grid: packed token grid (h, w)."""
    self.ids = np.asarray(ids, np.int32)
    self.mask = np.asarray(mask, np.int32)
    self.y = np.asarray(y, np.float32)
    n = len(self.ids)
    if n == 0:
      raise ValueError('TokenData: no token rows')
    if self.mask.shape != self.ids.shape or self.ids.ndim != 2:
      raise ValueError(f'TokenData: ids {self.ids.shape} and mask '
                       f'{self.mask.shape} must be equal [N, T] shapes')
    if self.y.ndim != 2 or len(self.y) != n:
      raise ValueError(f'TokenData: y {self.y.shape}, expected ({n}, vec)')
    self.grid, self.in_channels = tuple(grid), in_channels
    self.batch_size, self.seed = batch_size, seed

  def batch(self, step: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    b = self.batch_size
    rng = np.random.default_rng([self.seed, step])
    idx = rng.integers(0, len(self.ids), b)
    noise = rng.standard_normal(
        (b, self.grid[0] * self.grid[1], self.in_channels), np.float32)
    out = {'ids': self.ids[idx], 'mask': self.mask[idx], 'y': self.y[idx],
           'noise': noise}
    rows = data_lib.process_rows(b, process_index, process_count)
    return {k: v[rows] for k, v in out.items()}


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
def _t5_shardings(module: nn.Module, mesh):
  return parallel.variable_shardings(module, mesh, parallel.RULES,
                                     _dummy_ids())['params']


def _resolve_models(c, teacher_t5, denoiser, mesh):
  """-> (t5 (cfg, params), flux (cfg, params), pipeline or None)."""
  pipe = None
  if (teacher_t5 is None or denoiser is None) and c.get('pipeline'):
    from nanoflux_jax.pipeline import FluxPipeline  # pylint: disable=g-import-not-at-top
    pipe = FluxPipeline.from_pretrained(c.pipeline, mesh=mesh)
    teacher_t5 = teacher_t5 or (pipe.t5_cfg, pipe.t5_params)
    denoiser = denoiser or (pipe.flux_cfg, pipe.flux_params)
  if teacher_t5 is None:  # Random teacher: toy runs and tests.
    tc = c.teacher_t5
    cfg = getattr(T5Config, tc.preset)(**dict(tc.get('overrides', {}) or {}))
    module = T5Encoder(cfg)
    params = jax.jit(lambda r: nn.meta.unbox(
        module.init(r, _dummy_ids())['params']))(jax.random.PRNGKey(tc.seed))
    teacher_t5 = (cfg, params)
  if denoiser is None:
    dc = c.denoiser
    kw = {'context_in_dim': teacher_t5[0].d_model,
          **dict(dc.get('overrides', {}) or {})}
    cfg = getattr(FluxConfig, dc.preset)(**kw)
    denoiser = (cfg, parallel.init_flux(cfg, mesh,
                                        jax.random.PRNGKey(dc.seed))[0])
  return teacher_t5, denoiser, pipe


def _token_arrays(c, t5_cfg, flux_cfg, tokenizer, tokens, pipe):
  """-> {'ids', 'mask', 'y'} from `tokens`, a tokenizer, the pipeline or
  random ids (in that order)."""
  length = c.data.txt_len
  if tokens is not None:
    tokens = dict(tokens)
  elif tokenizer is not None:
    ids, mask = tokenize(tokenizer, data_lib.load_prompts(c.data.prompts),
                         length)
    tokens = {'ids': ids, 'mask': mask}
  elif pipe is not None:
    tokens = pipeline_tokens(pipe, data_lib.load_prompts(c.data.prompts),
                             length)
  else:
    ids, mask = random_tokens(c.data.num_prompts, length, t5_cfg.vocab_size,
                              c.seed)
    tokens = {'ids': ids, 'mask': mask}
  ids = np.asarray(tokens['ids'])
  if 'mask' not in tokens:  # T5's pad id is 0.
    tokens['mask'] = (ids != 0).astype(np.int32)
  if 'y' not in tokens:
    tokens['y'] = random_pooled(len(ids), flux_cfg.vec_in_dim, c.seed)
  if ids.ndim != 2 or (ids < 0).any() or (ids >= t5_cfg.vocab_size).any():
    raise ValueError(f'token ids {ids.shape} must be [N, T] in [0, '
                     f'{t5_cfg.vocab_size})')
  return tokens


def _student(c, t_cfg, t_params, out_dim):
  """-> (student config, initial params) from c.student."""
  sc = c.student
  s_cfg = student_t5_config(
      t_cfg, num_layers=sc.get('num_layers'), d_model=sc.get('d_model'),
      num_heads=sc.get('num_heads'), d_ff=sc.get('d_ff'),
      dtype='float32', param_dtype='float32')
  how = sc.get('init', 'auto')
  if how not in ('auto', 'teacher', 'random'):
    raise ValueError(f"student.init={how!r}; expected 'auto', 'teacher' or "
                     "'random'")
  same = all(getattr(s_cfg, k) == getattr(t_cfg, k) for k in _SHAPE_FIELDS)
  if how == 'teacher' or (how == 'auto' and same):
    layer_map = sc.get('layer_map')
    return s_cfg, init_from_teacher(t_cfg, t_params, s_cfg, layer_map)
  return s_cfg, init_student(s_cfg, out_dim, jax.random.PRNGKey(c.seed))


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
      guidance=float(c.get('guidance', DEFAULT_GUIDANCE)))
  if data is None:
    arrays = _token_arrays(c, t_cfg, f_cfg, tokenizer, tokens, pipe)
    data = TokenData(arrays['ids'], arrays['mask'], arrays['y'], grid,
                     f_cfg.in_channels, c.batch_size, c.seed)
  s_sh = _t5_shardings(StudentTextEncoder(s_cfg, out_dim), mesh)
  frozen_sh = {'t5': _t5_shardings(T5Encoder(t_cfg), mesh),
               'flux': parallel.param_shardings(f_cfg, mesh)}
  frozen = parallel.shard_like({'t5': t_params, 'flux': f_params}, frozen_sh)
  logging.info('text-encoder distillation: student %s -> %d, vis blocks %s, '
               'lambda emb %g vis %g', s_cfg, out_dim, spec.vis_blocks,
               spec.lambda_emb, spec.lambda_vis)
  state, history = trainer.fit(
      c, workdir, loss_fn=functools.partial(text_distill_loss, spec=spec),
      params=parallel.shard_like(s_params, s_sh), param_sh=s_sh,
      frozen=frozen, frozen_sh=frozen_sh, data=data, mesh=mesh,
      tokens_per_example=c.data.txt_len)
  if int(jax.device_get(state.step)) >= c.num_steps:
    save_student(os.path.join(workdir, STUDENT_DIR), s_cfg, out_dim,
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
  trainer.add_loop_defaults(c)
  c.num_sampling_steps = 4       # the denoiser's fixed schedule.
  c.guidance = DEFAULT_GUIDANCE  # dev denoisers only.
  c.loss = {'lambda_emb': 1.0, 'lambda_vis': 1.0, 'vis_blocks': (0,),
            'vis_normalize': False, 'monitor_vis': True}
  c.data = {'prompts': 'builtin', 'txt_len': 16, 'grid': (4, 4),
            'num_prompts': 64}   # num_prompts: random ids without tokenizer.
  return c

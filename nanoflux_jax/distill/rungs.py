"""Rung kinds of the compression ladder (`ladder.run_ladder` walks them).

A rung kind compresses the current student (`compress`), may replace the
distillation that follows (`distill`) and checks its options before any
work (`check`). Built in: prune, depth, static_modulation, downsample,
finetune, text_encoder, export; add one with `register_rung`. Any rung may
be an `ablation`: it runs on the current student and is reported, but the
rungs after it continue from the student before it. `Context` is what every
rung reads: the config, the mesh, the original teacher (and its pipeline,
when there is one) and the prompt embedder.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from nanoflux_jax import compress
from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import text_encoder


Student = tuple[FluxConfig, Any]  # (config, unboxed params)


# ---------------------------------------------------------------------------
# Rung registry.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RungKind:
  """compress: (ctx, student, opts) -> student. defaults: every option the
  kind takes besides 'kind' and 'distill'. check: (config, opts, where),
  raises on bad options before any work. distill: replaces trainer.train,
  (ctx, student, opts, rung_dir) -> finished(...)."""
  name: str
  compress: Callable[..., Student]
  defaults: Mapping[str, Any]
  check: Callable[..., None] | None = None
  distill: Callable[..., tuple[bool, dict]] | None = None


RUNG_KINDS: dict[str, RungKind] = {}


def register_rung(name: str, defaults: Mapping[str, Any], *, check=None,
                  distill=None):
  """Decorator adding compress fn(ctx, student, opts) to RUNG_KINDS[name]."""
  def deco(fn):
    RUNG_KINDS[name] = RungKind(name, fn, dict(defaults), check, distill)
    return fn
  return deco


@dataclasses.dataclass
class Context:
  """What rungs read: config, mesh, the original teacher, the embedder."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  grid: tuple[int, int]
  schedule: tuple[float, ...]   # the fixed sampling schedule, 1 -> 0.
  workdir: str
  text_encoder: str | None = None  # the current student T5 folder.
  # The teacher block each student block descends from (global indices,
  # double blocks first); None while the student has the teacher's blocks.
  teacher_blocks: tuple[int, ...] | None = None

  @functools.cached_property
  def pipeline(self):
    """The teacher's FluxPipeline: the shapes-world teacher (trained once,
    cached in workdir/teacher) or config.teacher.pipeline; None for a bare
    DiT teacher (then prompts get random stand-in embeddings)."""
    # pylint: disable=g-import-not-at-top
    t = self.config.teacher
    if t.get('shapes'):
      from nanoflux_jax.distill import shapes_teacher
      return shapes_teacher.load_or_train(
          t.shapes, os.path.join(self.workdir, 'teacher'), mesh=self.mesh)
    if t.get('pipeline'):
      from nanoflux_jax.pipeline import FluxPipeline
      # The DiT and T5 stream tensor by tensor onto the mesh: no host holds
      # a whole 12B teacher (every host of a pod runs this).
      return FluxPipeline.from_pretrained(t.pipeline, mesh=self.mesh)
    return None

  def pipeline_for(self, student: Student, text_encoder: str | None = None):
    """The teacher pipeline with `student` as its DiT (host copies) and,
    if given, a distilled student T5 (a text_encoder rung's folder)."""
    # pylint: disable-next=g-import-not-at-top
    from nanoflux_jax.pipeline import FluxPipeline
    p = self.pipeline
    pipe = FluxPipeline((student[0], jax.device_get(student[1])),
                        (p.clip_cfg, p.clip_params), (p.t5_cfg, p.t5_params),
                        (p.vae_cfg, p.vae_params), p.tokenizer, p.tokenizer_2)
    return pipe.with_text_encoder(text_encoder) if text_encoder else pipe

  @functools.cached_property
  def teacher(self) -> Student:
    """Loaded on first use: a resumed ladder may not need it at all."""
    c = self.config
    if self.pipeline is not None:
      cfg = self.pipeline.flux_cfg
      return cfg, parallel.shard_like(self.pipeline.flux_params,
                                      parallel.param_shardings(cfg, self.mesh))
    if c.teacher.get('path'):
      # pylint: disable-next=g-import-not-at-top
      from nanoflux_jax.convert import flux as convert_flux
      return convert_flux.load_flux_transformer(
          c.teacher.path, shardings=parallel.loading_shardings(self.mesh))
    cfg = getattr(FluxConfig, c.teacher.preset)(**dict(c.teacher.overrides))
    return cfg, parallel.init_flux(cfg, self.mesh, jax.random.PRNGKey(
        c.teacher.seed))[0]

  def embed(self, prompts, chunk: int = 64) -> dict:
    """{'txt', 'y'} of prompts: the pipeline's encoders, or else the random
    stand-in that trainer.train uses."""
    d = self.config.distill
    if self.pipeline is None:
      return data_lib.random_embedder(self.teacher[0], d.data.txt_len,
                                      d.seed)(prompts)
    parts = [self.pipeline.encode_prompt(prompts[i:i + chunk], d.data.txt_len)
             for i in range(0, len(prompts), chunk)]
    return {'txt': np.concatenate([np.asarray(p[0]) for p in parts]),
            'y': np.concatenate([np.asarray(p[1]) for p in parts])}

  def real_latents(self, prompts) -> np.ndarray:
    """Real latents [N, L, C] of the training prompts, for the
    rectified-flow term: the renderings of the shapes scenes whose captions
    config.distill.data.prompts ('shapes:N[:seed]') lists, encoded by the
    teacher pipeline's autoencoder."""
    # pylint: disable=g-import-not-at-top
    from nanoflux_jax.data import shapes
    from nanoflux_jax.distill import shapes_teacher
    source = self.config.distill.data.prompts
    if self.pipeline is None or not (isinstance(source, str) and
                                     source.startswith('shapes:')):
      raise ValueError(f'distill.loss.weights.rf > 0 needs real images: a '
                       f"teacher pipeline and data.prompts 'shapes:N[:seed]',"
                       f' got {source!r}')
    parts = source.split(':')
    world = shapes.ShapesWorld(int(parts[2]) if len(parts) > 2 else 0,
                               self.resolution)
    scenes = [world.scene(i) for i in range(len(prompts))]
    if [sc.caption for sc in scenes] != list(prompts):
      raise ValueError(f'real_latents: the prompts are not the captions of '
                       f'{source!r}')
    chunk = 256
    return np.concatenate([
        shapes_teacher.encode_images(self.pipeline, np.stack(
            [shapes.render(sc, self.resolution)
             for sc in scenes[i:i + chunk]]))
        for i in range(0, len(scenes), chunk)])

  @property
  def resolution(self) -> int:
    """Image side in pixels (pipelines only; square grids)."""
    return self.grid[0] * self.pipeline.latent_factor


def img_grid(cfg: FluxConfig, grid):
  return tuple(grid) if cfg.downsample_start is not None else None


def origin_pairs(ctx: Context, cfg: FluxConfig) -> tuple[tuple[int, int], ...]:
  """Feature-KD pairs (student block, the teacher block it descends from).

  Blocks on a down-sampler's coarse grid are left out: their tokens do not
  line up with the teacher's.
  """
  origin = ctx.teacher_blocks or tuple(range(cfg.num_blocks))
  coarse = (range(cfg.downsample_start, cfg.downsample_end + 1)
            if cfg.downsample_start is not None else ())
  return tuple((i, t) for i, t in enumerate(origin) if i not in coarse)


def _calib(ctx: Context, student: Student, opts) -> dict:
  """Teacher-sampler states of the student; real prompts with a pipeline."""
  cfg, params = student
  emb = {}
  if ctx.pipeline is not None:
    prompts = data_lib.load_prompts(ctx.config.distill.data.prompts)
    emb = ctx.embed((prompts * opts['calib_n'])[:opts['calib_n']])
  return compress.calibration_set(
      cfg, params, jax.random.PRNGKey(opts['calib_seed']), opts['calib_n'],
      num_steps=len(ctx.schedule) - 1, img_grid=ctx.grid,
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


@register_rung('prune', dict(
    criterion='taylor', keep_heads=0.5, keep_mlp=0.5, scope='global',
    target_params=None, calib_n=2, calib_seed=0, criterion_kw={}),
               check=_check_prune)
def _prune(ctx: Context, student: Student, opts) -> Student:
  """Heads / MLP channels ranked by sensitivity on the student's trajectories."""
  cfg, params = student
  scores = compress.sensitivity(
      cfg, params, _calib(ctx, student, opts), opts['criterion'],
      img_grid=img_grid(cfg, ctx.grid), **dict(opts['criterion_kw']))
  mask = compress.select(cfg, scores, keep_heads=opts['keep_heads'],
                         keep_mlp=opts['keep_mlp'], scope=opts['scope'],
                         target_params=opts['target_params'])
  return compress.prune(cfg, params, mask)


def _check_depth(c, opts, where):
  del c
  if (opts['keep'] is None) == (opts['keep_blocks'] is None):
    raise ValueError(f'{where}: depth needs exactly one of keep (global block '
                     'indices) or keep_blocks (count or fraction)')


@register_rung('depth', dict(keep=None, keep_blocks=None, criterion='block_io',
                             merge=False, calib_n=2, calib_seed=0),
               check=_check_depth)
def _depth(ctx: Context, student: Student, opts) -> Student:
  """Drops blocks: the listed ones, or the least sensitive keep_blocks."""
  cfg, params = student
  keep = opts['keep']
  if keep is None:
    scores = compress.sensitivity(cfg, params, _calib(ctx, student, opts),
                                  opts['criterion'],
                                  img_grid=img_grid(cfg, ctx.grid))
    mask = compress.select(cfg, scores, keep_blocks=opts['keep_blocks'])
    keep = np.concatenate([np.asarray(mask.double_blocks),
                           np.asarray(mask.single_blocks)]) > 0.5
  flags = np.zeros(cfg.num_blocks, bool)
  flags[np.arange(cfg.num_blocks)[np.asarray(keep)]] = True
  origin = ctx.teacher_blocks or tuple(range(cfg.num_blocks))
  ctx.teacher_blocks = tuple(int(t) for t, f in zip(origin, flags) if f)
  return compress.remove_blocks(cfg, params, keep, merge=opts['merge'])


@register_rung('static_modulation', dict(guidance=None))
def _static(ctx: Context, student: Student, opts) -> Student:
  """AdaLN -> per-timestep tables, averaged over the training prompts' y."""
  cfg, params = student
  prompts = data_lib.load_prompts(ctx.config.distill.data.prompts)
  return compress.to_static_modulation(
      cfg, params, ctx.schedule[:-1], ctx.embed(prompts)['y'],
      guidance=opts['guidance'])


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


@register_rung('downsample', dict(start=None, end=None, factor=2, channels=0,
                                  seed=0), check=_check_downsample)
def _downsample(ctx: Context, student: Student, opts) -> Student:
  """A fresh ResNet token down-sampler over global blocks [start, end]."""
  cfg, params = student
  n = cfg.num_blocks
  start, end = (v % n if v < 0 else v for v in (opts['start'], opts['end']))
  return compress.add_downsampler(cfg, params, start, end,
                                  jax.random.PRNGKey(opts['seed']),
                                  opts['factor'], opts['channels'])


# No compression: the same distillation budget again, for ablations (e.g.
# the student without the token down-sampler, trained as long as with it).
register_rung('finetune', {})(lambda ctx, student, opts: student)


def _text_encoder_config(c, rung, where) -> ml_collections.ConfigDict:
  tc = text_encoder.default_config()
  override(tc, rung['distill'], f'{where}.distill')
  return tc


def _check_text_encoder(c, opts, where):
  _text_encoder_config(c, opts, where)
  if opts['teacher_t5'] and not os.path.exists(opts['teacher_t5']):
    raise FileNotFoundError(f"{where}: teacher_t5={opts['teacher_t5']!r} does "
                            'not exist')
  if opts['denoiser'] not in ('student', 'teacher'):
    raise ValueError(f"{where}: denoiser={opts['denoiser']!r}; expected "
                     "'student' or 'teacher'")


def _distill_text_encoder(ctx: Context, student: Student, rung, rung_dir):
  """A small T5 learns the teacher T5 through the frozen denoiser.

  teacher_t5: an HF T5EncoderModel folder; '' takes the ladder's teacher
  pipeline (its T5, tokenizer and pooled CLIP vectors), else
  distill.pipeline or a random preset. The student T5 is written to
  rung_dir/student_text_encoder and, unless the rung is an `ablation`,
  becomes the pipeline's T5 for the rungs after it; the denoiser passes on
  unchanged.
  """
  tc = _text_encoder_config(ctx.config, rung, 'text_encoder')
  t5 = tokens = None
  if rung['teacher_t5']:
    # pylint: disable-next=g-import-not-at-top
    from nanoflux_jax.convert.text_encoders import load_t5_encoder
    t5 = load_t5_encoder(rung['teacher_t5'],
                         shardings=parallel.t5_loading_shardings(ctx.mesh))
  elif ctx.pipeline is not None:
    t5 = (ctx.pipeline.t5_cfg, ctx.pipeline.t5_params)
    tokens = text_encoder.pipeline_tokens(
        ctx.pipeline, data_lib.load_prompts(tc.data.prompts), tc.data.txt_len)
  state, history = text_encoder.train_text_encoder(
      tc, rung_dir, teacher_t5=t5, tokens=tokens, mesh=ctx.mesh,
      denoiser=student if rung['denoiser'] == 'student' else ctx.teacher)
  return finished(state, history, tc)


register_rung('text_encoder', dict(teacher_t5='', denoiser='student'),
              check=_check_text_encoder,
              distill=_distill_text_encoder)(lambda ctx, student, opts: student)


_QUANT_NAMES = {'none': 'fp32'}


def _check_export(c, opts, where):
  # pylint: disable-next=g-import-not-at-top
  from nanoflux_jax.export import tflite
  if not (c.teacher.get('shapes') or c.teacher.get('pipeline')):
    raise ValueError(f'{where}: export needs a teacher pipeline '
                     '(teacher.shapes or teacher.pipeline) for the text '
                     'encoders and the VAE')
  if not opts['quantize']:
    raise ValueError(f'{where}: export needs at least one quantize option')
  for q in opts['quantize']:
    try:
      tflite.check_quantize(q)
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from e


def _export(ctx: Context, student: Student, rung, rung_dir):
  """The current pipeline (student DiT + student T5) as a FluxPipeline
  folder, workdir/pipeline, and as .tflite files in
  workdir/tflite/{fp32,int8,...}, one folder per quantization."""
  del rung_dir
  # pylint: disable-next=g-import-not-at-top
  from nanoflux_jax.export import bundle
  pipe = ctx.pipeline_for(student, ctx.text_encoder)
  pipe.save(os.path.join(ctx.workdir, 'pipeline'))
  out = {}
  for q in rung['quantize']:
    path = os.path.join(ctx.workdir, 'tflite', _QUANT_NAMES.get(q, q))
    m = bundle.export_pipeline(
        pipe, path, ctx.resolution, ctx.resolution,
        num_steps=len(ctx.schedule) - 1,
        max_sequence_length=ctx.config.distill.data.txt_len, quantize=q)
    out[_QUANT_NAMES.get(q, q)] = dict(
        dir=os.path.relpath(path, ctx.workdir),
        mb=m['sizes']['total_bytes'] / 1e6, export_s=m['export']['seconds'])
  return True, dict(exports=out, pipeline='pipeline')


register_rung('export', dict(quantize=('none', 'int8')), check=_check_export,
              distill=_export)(lambda ctx, student, opts: student)



def override(base: ml_collections.ConfigDict, over: Mapping[str, Any],
              where: str) -> None:
  """base[k] = over[k] recursively; unknown keys raise."""
  for k, v in dict(over).items():
    if k not in base:
      raise ValueError(f'{where}: unknown distill option {k!r}; known: '
                       f'{sorted(base.keys())}')
    if isinstance(v, Mapping) and isinstance(base.get(k),
                                             ml_collections.ConfigDict):
      override(base[k], v, f'{where}.{k}')
    else:
      base[k] = v



def finished(state, history, tc) -> tuple[bool, dict]:
  """(reached num_steps, report fields: last logged losses, the step this
  call started at (> 0: resumed), num_steps)."""
  step = int(jax.device_get(state.step))
  losses = {k: v for k, v in (history[-1] if history else {}).items()
            if k not in ('step', 'steps_per_s', 'tokens_per_s')}
  start = int(history[0]['step']) - 1 if history else step
  return step >= tc.num_steps, dict(losses=losses, start_step=start,
                                    steps=tc.num_steps)

"""Rung kinds of the compression ladder (`ladder.run_ladder` walks them).

Every rung kind has one protocol:
  check(config, opts, where)       raises on bad options, before any work;
  compress(ctx, student, opts)     -> the compressed student (cfg, params);
  run(ctx, student, opts)          -> RungResult: what the rung trained or
                                   wrote and the denoiser it ends with.
The default `run`, `distill_denoiser`, distils the compressed DiT from the
original teacher (trainer.train in ctx.rung_dir); `text_encoder` and
`export` keep the denoiser and implement their own `run`. Built in: prune,
depth, static_modulation, downsample, finetune, text_encoder, export; add
one with `register_rung`. Any rung may be an `ablation`: it runs on the
current student and is reported, but the rungs after it continue from the
student before it. `Context` is what every rung reads: the config, the
mesh, the original teacher (and its pipeline, when there is one), the
prompt embedder and the rung's folder.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from nanoflux_jax import checkpoint
from nanoflux_jax import compress
from nanoflux_jax.compress import layout
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert.text_encoders import load_t5_encoder
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import loop
from nanoflux_jax.shapes import teacher as shapes_teacher
from nanoflux_jax.distill import teacher as teacher_lib
from nanoflux_jax.distill import t5_distill as text_encoder
from nanoflux_jax.distill import trainer
from nanoflux_jax.export import bundle
from nanoflux_jax.export import tflite
from nanoflux_jax.models import sharding
from nanoflux_jax.pipeline import FluxPipeline


Student = tuple[FluxConfig, Any]  # (config, unboxed params)


@dataclasses.dataclass(frozen=True)
class RungResult:
  """What a rung's `run` returns.

  finished: False when training stopped early (distill.stop_after); rerun
    the ladder to resume.
  fields: report-row fields (losses, steps, start_step, exports, ...).
  student: the denoiser the rung ends with; None: the one it was given. A
    run that changes the denoiser also saves it to ctx.rung_dir/student
    (nanoflux_jax.checkpoint), where a resumed ladder reads it back.
  text_encoder: the student T5 folder the rung wrote, if any.
  """
  finished: bool
  fields: dict
  student: Student | None = None
  text_encoder: str | None = None


# ---------------------------------------------------------------------------
# Rung registry.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RungKind:
  """defaults: every option the kind takes besides 'kind', 'distill' and
  'ablation'. compress / run / check: see the module docstring."""
  name: str
  compress: Callable[..., Student]
  defaults: Mapping[str, Any]
  run: Callable[..., RungResult]
  check: Callable[..., None] | None = None

  @property
  def distills_denoiser(self) -> bool:
    """True for kinds whose run is trainer.train on the compressed DiT."""
    return self.run is distill_denoiser


RUNG_KINDS: dict[str, RungKind] = {}


def register_rung(name: str, defaults: Mapping[str, Any], *, check=None,
                  run=None):
  """Decorator adding compress fn(ctx, student, opts) to RUNG_KINDS[name],
  with `run` (default `distill_denoiser`) and `check`."""
  def deco(fn):
    RUNG_KINDS[name] = RungKind(name, fn, dict(defaults),
                                run or distill_denoiser, check)
    return fn
  return deco


def unchanged(ctx, student: Student, opts) -> Student:
  """The compress of kinds that keep the denoiser as it is."""
  del ctx, opts
  return student


@dataclasses.dataclass
class Context:
  """What rungs read: config, mesh, the original teacher, the embedder."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  grid: tuple[int, int]
  schedule: tuple[float, ...]   # the fixed sampling schedule, 1 -> 0.
  workdir: str
  rung_dir: str = ''               # the folder of the rung being run.
  text_encoder: str | None = None  # the current student T5 folder.
  # The teacher block each student block descends from (global indices,
  # double blocks first); None while the student has the teacher's blocks.
  teacher_blocks: tuple[int, ...] | None = None

  @functools.cached_property
  def pipeline(self):
    """The teacher's FluxPipeline: the shapes-world teacher (trained once,
    cached in workdir/teacher) or config.teacher.pipeline; None for a bare
    DiT teacher (then prompts get random stand-in embeddings)."""
    t = self.config.teacher
    if t.get('shapes'):
      return shapes_teacher.load_or_train(
          t.shapes, os.path.join(self.workdir, 'teacher'), mesh=self.mesh)
    if t.get('pipeline'):
      # The DiT and T5 stream tensor by tensor onto the mesh: no host holds
      # a whole 12B teacher (every host of a pod runs this).
      return FluxPipeline.from_pretrained(t.pipeline, mesh=self.mesh)
    return None

  def pipeline_for(self, student: Student, text_encoder: str | None = None):
    """The teacher pipeline with `student` as its DiT (host copies) and,
    if given, a distilled student T5 (a text_encoder rung's folder)."""
    p = self.pipeline
    pipe = FluxPipeline((student[0], jax.device_get(student[1])),
                        (p.clip_cfg, p.clip_params), (p.t5_cfg, p.t5_params),
                        (p.vae_cfg, p.vae_params), p.tokenizer, p.tokenizer_2)
    return pipe.with_text_encoder(text_encoder) if text_encoder else pipe

  @functools.cached_property
  def teacher(self) -> Student:
    """Loaded on first use: a resumed ladder may not need it at all."""
    return teacher_lib.load_teacher(self.config.teacher, self.mesh,
                                    self.pipeline)

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
    source = self.config.distill.data.prompts
    parsed = shapes.parse_source(source)
    if self.pipeline is None or not parsed:
      raise ValueError(f'distill.loss.weights.rf > 0 needs real images: a '
                       f"teacher pipeline and data.prompts 'shapes:N[:seed]',"
                       f' got {source!r}')
    world = shapes.ShapesWorld(parsed[2], self.resolution, parsed[0])
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


def _trained(rung_dir: str, state, history, num_steps: int
             ) -> tuple[bool, dict]:
  """(reached num_steps, report fields): the last logged losses (from
  rung_dir/metrics.jsonl, so a re-entered finished run has them too), the
  step this call started at (> 0: resumed) and num_steps."""
  step = int(jax.device_get(state.step))
  logged = loop.read_metrics(rung_dir)
  losses = {k: v for k, v in (logged[-1] if logged else {}).items()
            if k not in loop.RATE_KEYS}
  start = int(history[0]['step']) - 1 if history else step
  return step >= num_steps, dict(losses=losses, start_step=start,
                                 steps=num_steps)


def distill_config(ctx: Context, student_cfg: FluxConfig, opts
                   ) -> ml_collections.ConfigDict:
  """config.distill with the rung's overrides, a workdir-relative teacher
  cache and 'origin' feature pairs resolved."""
  tc = ml_collections.ConfigDict(ctx.config.distill.to_dict())
  override(tc, opts['distill'], 'distill')
  if tc.data.get('cache_dir'):  # Relative: one cache inside the workdir.
    tc.data.cache_dir = os.path.join(ctx.workdir, tc.data.cache_dir)
  if tc.loss.feature_pairs == 'origin':
    with tc.ignore_type():
      tc.loss.feature_pairs = origin_pairs(ctx, student_cfg)
  return tc


def distill_denoiser(ctx: Context, student: Student, opts) -> RungResult:
  """The default run: trainer.train of the compressed student from the
  original teacher in ctx.rung_dir (resuming its own checkpoints); the
  distilled student is read back from rung_dir/student.

  `student` may carry params=None when its trainer checkpoint exists (the
  trainer restores the values; see ladder.py).
  """
  tc = distill_config(ctx, student[0], opts)
  real = tc.loss.weights.get('rf', 0.0) > 0
  state, history = trainer.train(
      tc, ctx.rung_dir, teacher=ctx.teacher, student=student, mesh=ctx.mesh,
      embed_fn=None if ctx.pipeline is None else ctx.embed,
      latents_fn=ctx.real_latents if real else None)
  done, fields = _trained(ctx.rung_dir, state, history, tc.num_steps)
  weights = {k: v for k, v in tc.loss.weights.items() if v}
  pairs = trainer.feature_pairs(tc.loss.feature_pairs, student[0],
                                ctx.teacher[0]) if weights.get(
                                    'feature_kd') else ()
  fields.update(loss_weights=weights, feature_pairs=[list(p) for p in pairs])
  out = None
  if done:
    out = checkpoint.load(os.path.join(ctx.rung_dir, 'student'),
                          shardings=sharding.loading_shardings(ctx.mesh))
  return RungResult(done, fields, student=out)


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
  """A fresh ResNet token down-sampler over global blocks [start, end]; on
  a student that has one, widens its coarse range to [start, end] instead
  (progressive down-sampling: the trained down-sampler is kept)."""
  cfg, params = student
  n = cfg.num_blocks
  start, end = (v % n if v < 0 else v for v in (opts['start'], opts['end']))
  if cfg.downsample_start is not None:
    return compress.widen_downsampler(cfg, params, start, end, opts['factor'])
  return compress.add_downsampler(cfg, params, start, end,
                                  jax.random.PRNGKey(opts['seed']),
                                  opts['factor'], opts['channels'])


# No compression: the same distillation budget again, for ablations (e.g.
# the student without the token down-sampler, trained as long as with it).
register_rung('finetune', {})(unchanged)


def text_encoder_config(rung, where) -> ml_collections.ConfigDict:
  """text_encoder.default_config() with the rung's distill overrides."""
  tc = text_encoder.default_config()
  override(tc, rung['distill'], f'{where}.distill')
  return tc


def _check_text_encoder(c, opts, where):
  del c
  text_encoder_config(opts, where)
  if opts['teacher_t5'] and not os.path.exists(opts['teacher_t5']):
    raise FileNotFoundError(f"{where}: teacher_t5={opts['teacher_t5']!r} does "
                            'not exist')
  if opts['denoiser'] not in ('student', 'teacher'):
    raise ValueError(f"{where}: denoiser={opts['denoiser']!r}; expected "
                     "'student' or 'teacher'")


def _distill_text_encoder(ctx: Context, student: Student, opts) -> RungResult:
  """A small T5 learns the teacher T5 through the frozen denoiser.

  teacher_t5: an HF T5EncoderModel folder; '' takes the ladder's teacher
  pipeline (its T5, tokenizer and pooled CLIP vectors), else
  distill.pipeline or a random preset. The student T5 is written to
  rung_dir/student_text_encoder and, unless the rung is an `ablation`,
  becomes the pipeline's T5 for the rungs after it; the denoiser passes on
  unchanged.
  """
  tc = text_encoder_config(opts, 'text_encoder')
  t5 = tokens = None
  if opts['teacher_t5']:
    t5 = load_t5_encoder(opts['teacher_t5'],
                         shardings=sharding.t5_loading_shardings(ctx.mesh))
  elif ctx.pipeline is not None:
    t5 = (ctx.pipeline.t5_cfg, ctx.pipeline.t5_params)
    tokens = data_lib.pipeline_tokens(
        ctx.pipeline, data_lib.load_prompts(tc.data.prompts), tc.data.txt_len)
  state, history = text_encoder.train_text_encoder(
      tc, ctx.rung_dir, teacher_t5=t5, tokens=tokens, mesh=ctx.mesh,
      denoiser=student if opts['denoiser'] == 'student' else ctx.teacher)
  done, fields = _trained(ctx.rung_dir, state, history, tc.num_steps)
  return RungResult(done, fields, text_encoder=os.path.join(
      ctx.rung_dir, text_encoder.STUDENT_DIR))


register_rung('text_encoder', dict(teacher_t5='', denoiser='student'),
              check=_check_text_encoder, run=_distill_text_encoder)(unchanged)


_QUANT_NAMES = {'none': 'fp32'}


def _check_export(c, opts, where):
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


def _export(ctx: Context, student: Student, opts) -> RungResult:
  """The current pipeline (student DiT + student T5) as a FluxPipeline
  folder, workdir/pipeline, and as .tflite files in
  workdir/tflite/{fp32,int8,...}, one folder per quantization."""
  # The folder carries the settings the student was distilled for
  # (call_defaults.json): pipe(prompts) then needs no more arguments.
  # The exporters address blocks one by one: a scanned student is unrolled.
  pipe = ctx.pipeline_for(layout.unrolled(student, ctx.mesh),
                          ctx.text_encoder).with_call_defaults(
      height=ctx.resolution, width=ctx.resolution,
      num_steps=len(ctx.schedule) - 1,
      max_sequence_length=ctx.config.distill.data.txt_len)
  pipe.save(os.path.join(ctx.workdir, 'pipeline'))
  out = {}
  for q in opts['quantize']:
    path = os.path.join(ctx.workdir, 'tflite', _QUANT_NAMES.get(q, q))
    m = bundle.export_pipeline(
        pipe, path, ctx.resolution, ctx.resolution,
        num_steps=len(ctx.schedule) - 1,
        max_sequence_length=ctx.config.distill.data.txt_len, quantize=q)
    out[_QUANT_NAMES.get(q, q)] = dict(
        dir=os.path.relpath(path, ctx.workdir),
        mb=m['sizes']['total_bytes'] / 1e6, export_s=m['export']['seconds'])
  return RungResult(True, dict(exports=out, pipeline='pipeline'))


register_rung('export', dict(quantize=('none', 'int8')), check=_check_export,
              run=_export)(unchanged)


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

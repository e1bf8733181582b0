"""The NanoFLUX compression ladder: compress, then distil, rung by rung.

`run_ladder(config, workdir)` walks `config.rungs` in order. Each rung is a
dict with a `kind` from `RUNG_KINDS` (prune, depth, static_modulation,
downsample, text_encoder; extend with `register_rung`), that kind's options
and `distill`: overrides of `config.distill` (a `trainer.default_config()`)
for the distillation that follows the compression. The student of rung i is
distilled from the ORIGINAL teacher in workdir/rung_{i}_{kind} and becomes
the input of rung i + 1.

Layout of workdir:
  teacher.json                 the teacher's report row (computed once)
  rung_{i}_{kind}/
    student_config.json        the compressed config (written before training)
    checkpoints/               the trainer's orbax CheckpointManager
    student/                   final student (nanoflux_jax.checkpoint)
    done.json                  marker: the rung's options and report row
  samples/{teacher,rung_i_kind}.png   latent previews, same prompts and noise
  report.json, report.md       one row per finished rung plus the teacher

Resume: a rung with done.json is loaded from its student/ and skipped; an
unfinished rung restarts its compression only if the trainer had not saved a
checkpoint yet, and otherwise resumes inside `trainer.train` at the saved step.
The whole config is validated before the teacher is even loaded.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from nanoflux_jax import checkpoint
from nanoflux_jax import compress
from nanoflux_jax import images
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import ladder_eval
from nanoflux_jax.distill import text_encoder
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import flux as flux_lib

Student = tuple[FluxConfig, Any]  # (config, unboxed params)


# ---------------------------------------------------------------------------
# Rung registry.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RungKind:
  """compress: (ctx, student, opts) -> student. defaults: every option the
  kind takes besides 'kind' and 'distill'. check: (config, opts, where),
  raises on bad options before any work. distill: replaces trainer.train,
  (ctx, student, opts, rung_dir) -> _finished(...)."""
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
      return FluxPipeline.from_pretrained(t.pipeline)
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

  @property
  def resolution(self) -> int:
    """Image side in pixels (pipelines only; square grids)."""
    return self.grid[0] * self.pipeline.latent_factor


def _img_grid(cfg: FluxConfig, grid):
  return tuple(grid) if cfg.downsample_start is not None else None


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
      img_grid=_img_grid(cfg, ctx.grid), **dict(opts['criterion_kw']))
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
                                  img_grid=_img_grid(cfg, ctx.grid))
    mask = compress.select(cfg, scores, keep_blocks=opts['keep_blocks'])
    keep = np.concatenate([np.asarray(mask.double_blocks),
                           np.asarray(mask.single_blocks)]) > 0.5
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


def _text_encoder_config(c, rung, where) -> ml_collections.ConfigDict:
  tc = text_encoder.default_config()
  _override(tc, rung['distill'], f'{where}.distill')
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
    t5 = load_t5_encoder(rung['teacher_t5'])
  elif ctx.pipeline is not None:
    t5 = (ctx.pipeline.t5_cfg, ctx.pipeline.t5_params)
    tokens = text_encoder.pipeline_tokens(
        ctx.pipeline, data_lib.load_prompts(tc.data.prompts), tc.data.txt_len)
  state, history = text_encoder.train_text_encoder(
      tc, rung_dir, teacher_t5=t5, tokens=tokens, mesh=ctx.mesh,
      denoiser=student if rung['denoiser'] == 'student' else ctx.teacher)
  return _finished(state, history, tc)


register_rung('text_encoder', dict(teacher_t5='', denoiser='student',
                                   ablation=False),
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
  """The current pipeline (student DiT + student T5) as .tflite files in
  workdir/tflite/{fp32,int8,...}, one folder per quantization."""
  del rung_dir
  # pylint: disable-next=g-import-not-at-top
  from nanoflux_jax.export import bundle
  pipe = ctx.pipeline_for(student, ctx.text_encoder)
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
  return True, dict(exports=out)


register_rung('export', dict(quantize=('none', 'int8')), check=_check_export,
              distill=_export)(lambda ctx, student, opts: student)


# ---------------------------------------------------------------------------
# Config checking (before any work).
# ---------------------------------------------------------------------------
def _override(base: ml_collections.ConfigDict, over: Mapping[str, Any],
              where: str) -> None:
  """base[k] = over[k] recursively; unknown keys raise."""
  for k, v in dict(over).items():
    if k not in base:
      raise ValueError(f'{where}: unknown distill option {k!r}; known: '
                       f'{sorted(base.keys())}')
    if isinstance(v, Mapping) and isinstance(base.get(k),
                                             ml_collections.ConfigDict):
      _override(base[k], v, f'{where}.{k}')
    else:
      base[k] = v


def check_config(config: ml_collections.ConfigDict) -> list[dict]:
  """Validates every rung; returns them as dicts with defaults filled in.

  Raises:
    ValueError / FileNotFoundError / NotImplementedError naming the rung
    index and the offending kind, option or path.
  """
  raw = list(config.get('rungs') or ())
  if not raw:
    raise ValueError('ladder: config.rungs is empty')
  for key in ('path', 'pipeline'):
    path = config.teacher.get(key)
    if path and not os.path.exists(path):
      raise FileNotFoundError(f'ladder: teacher.{key} {path!r} does not exist')
  if not any(config.teacher.get(k) for k in ('path', 'preset', 'shapes',
                                             'pipeline')):
    raise ValueError('ladder: set config.teacher.path, .preset, .shapes or '
                     '.pipeline')
  data_lib.load_prompts(config.distill.data.prompts)
  data_lib.load_prompts(config.samples.prompts)
  rungs = []
  for i, r in enumerate(raw):
    r = dict(r.to_dict() if isinstance(r, ml_collections.ConfigDict) else r)
    kind = r.get('kind')
    where = f'ladder rung {i} ({kind!r})'
    if kind not in RUNG_KINDS:
      raise ValueError(f'ladder rung {i}: unknown kind {kind!r}; known kinds: '
                       f'{sorted(RUNG_KINDS)}')
    spec = RUNG_KINDS[kind]
    extra = sorted(set(r) - set(spec.defaults) - {'kind', 'distill'})
    if extra:
      raise ValueError(f'{where}: unknown options {extra}; {kind} accepts '
                       f"{sorted(spec.defaults)} and 'distill'")
    opts = {**spec.defaults, **r, 'distill': dict(r.get('distill') or {})}
    if spec.distill is None:  # trainer.train options must exist.
      _override(ml_collections.ConfigDict(config.distill.to_dict()),
                opts['distill'], f'{where}.distill')
    if spec.check is not None:
      spec.check(config, opts, where)
    rungs.append(opts)
  return rungs


# ---------------------------------------------------------------------------
# Measuring a model: size, FLOPs, latency, samples.
# ---------------------------------------------------------------------------
def _forward_ms(ctx: Context, student: Student, repeats: int) -> float:
  """Median ms of a jitted batch-1 forward (compile + one warm-up excluded)."""
  cfg, params = student
  (h, w), t = ctx.grid, ctx.config.distill.data.txt_len
  x = dict(img=jnp.zeros((1, h * w, cfg.in_channels)),
           img_ids=sampling.image_ids(1, h, w), txt_ids=sampling.text_ids(1, t),
           txt=jnp.zeros((1, t, cfg.context_in_dim)),
           timesteps=jnp.full((1,), 0.5), y=jnp.zeros((1, cfg.vec_in_dim)))
  fwd = jax.jit(functools.partial(flux_lib.Flux(cfg).apply,
                                  img_grid=_img_grid(cfg, ctx.grid)))
  times = []
  for _ in range(max(1, repeats) + 1):
    t0 = time.perf_counter()
    fwd({'params': params}, **x).block_until_ready()
    times.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(times[1:])


def _sample(ctx: Context, student: Student) -> np.ndarray:
  """Final latents [N, L, C] for the fixed sample prompts and noise."""
  cfg, params = student
  s = ctx.config.samples
  prompts = data_lib.load_prompts(s.prompts)[:s.num]
  emb = ctx.embed(prompts)
  h, w = ctx.grid
  n = len(prompts)
  noise = np.random.default_rng(s.seed).standard_normal(
      (n, h * w, cfg.in_channels), np.float32)
  out = sampling.denoise(
      cfg, params, jnp.asarray(noise), sampling.image_ids(n, h, w),
      jnp.asarray(emb['txt']), sampling.text_ids(n, emb['txt'].shape[1]),
      jnp.asarray(emb['y']), jnp.asarray(ctx.schedule, jnp.float32),
      img_grid=_img_grid(cfg, ctx.grid))
  return np.asarray(out)


def latent_preview(latents: np.ndarray, grid, scale: int = 8) -> np.ndarray:
  """Packed latents [N, L, C] -> uint8 [N, H, W, 3] from latent channels 0-2.

  A fixed value range (+-2.5) rather than per-image normalisation keeps the
  rungs' grids comparable. Real runs can decode with a VAE instead.
  """
  gh, gw = grid
  x = np.asarray(sampling.unpack(jnp.asarray(latents), 2 * gh, 2 * gw))
  x = x[:, :3].transpose(0, 2, 3, 1)
  if x.shape[-1] < 3:
    x = np.concatenate([x] + [x[..., :1]] * (3 - x.shape[-1]), -1)
  x = np.clip((x + 2.5) / 5.0 * 255.0, 0, 255).astype(np.uint8)
  return x.repeat(scale, 1).repeat(scale, 2)


def _measure(ctx: Context, student: Student, name: str, workdir: str,
             reference: np.ndarray | None) -> tuple[dict, np.ndarray]:
  """(report row, sample latents); writes samples/{name}.png."""
  cfg, _ = student
  h, w = ctx.grid
  t = ctx.config.distill.data.txt_len
  latents = _sample(ctx, student)
  png = os.path.join('samples', f'{name}.png')
  if jax.process_index() == 0:
    if ctx.pipeline is None:
      grid_images = latent_preview(latents, ctx.grid, ctx.config.samples.scale)
    else:
      grid_images = np.asarray(ctx.pipeline.decode_latents(
          jnp.asarray(latents), ctx.resolution, ctx.resolution))
    images.save_grid(grid_images, os.path.join(workdir, png))
  mse = 0.0 if reference is None else np.mean(np.square(latents - reference))
  return dict(name=name, params=int(compress.count_params(cfg)),
              gflops=compress.count_flops(cfg, h * w, t) / 1e9,
              ms=_forward_ms(ctx, student, ctx.config.timing.repeats),
              device=jax.devices()[0].device_kind, sample_mse=float(mse),
              samples=png), latents


# ---------------------------------------------------------------------------
# Report files (atomic).
# ---------------------------------------------------------------------------
def _write_atomic(path: str, text: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _read_json(path: str):
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)


def _fmt(v, spec: str) -> str:
  return '-' if v is None else format(v, spec)


def report_markdown(report: dict) -> str:
  """The markdown table: the teacher row, then one row per finished rung."""
  c = report['setup']
  lines = [
      '# NanoFLUX compression ladder', '',
      f"Forward: batch 1, {c['img_len']} image + {c['txt_len']} text tokens "
      f"on {c['device']}; ms = median of {c['repeats']} jitted calls. Sample "
      'MSE: final latents vs the teacher\'s (same prompts and noise).', '',
      '| rung | kind | params | GFLOPs | ms / fwd | steps | loss | '
      'output_kd | sample MSE | samples |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in [report['teacher']] + report['rungs']:
    loss = r.get('losses') or {}
    ms = f"{r['ms']:.2f}"
    if r.get('device', c['device']) != c['device']:  # Trained elsewhere.
      ms += f" ({r['device']})"
    lines.append(
        f"| {r['name']} | {r.get('kind', '-')} | {r['params']:,} | "
        f"{r['gflops']:.4g} | {ms} | {r.get('steps', '-')} | "
        f"{_fmt(loss.get('loss'), '.4g')} | "
        f"{_fmt(loss.get('output_kd'), '.4g')} | {r['sample_mse']:.4g} | "
        f"[png]({r['samples']}) |")
  if report.get('evaluation'):
    lines += ['', ladder_eval.markdown(report)]
  return '\n'.join(lines) + '\n'


def _write_report(workdir: str, report: dict) -> None:
  _write_atomic(os.path.join(workdir, 'report.json'),
                json.dumps(report, indent=2, sort_keys=True))
  _write_atomic(os.path.join(workdir, 'report.md'), report_markdown(report))


# ---------------------------------------------------------------------------
# The ladder.
# ---------------------------------------------------------------------------
def _marker_key(rung: dict) -> dict:
  """The rung options that define its result (stop_after does not)."""
  d = dict(rung, distill={k: v for k, v in rung['distill'].items()
                          if k != 'stop_after'})
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def _has_checkpoint(rung_dir: str) -> bool:
  path = os.path.abspath(os.path.join(rung_dir, 'checkpoints'))
  return os.path.isdir(path) and (
      ocp.CheckpointManager(path).latest_step() is not None)


def _distill_denoiser(ctx: Context, student: Student, rung: dict,
                      rung_dir: str):
  """trainer.train from the original teacher; resumes its own checkpoints."""
  tc = ml_collections.ConfigDict(ctx.config.distill.to_dict())
  _override(tc, rung['distill'], 'distill')
  if tc.data.get('cache_dir'):  # Relative: one cache inside the workdir.
    tc.data.cache_dir = os.path.join(ctx.workdir, tc.data.cache_dir)
  state, history = trainer.train(
      tc, rung_dir, teacher=ctx.teacher, student=student, mesh=ctx.mesh,
      embed_fn=None if ctx.pipeline is None else ctx.embed)
  return _finished(state, history, tc)


def _finished(state, history, tc) -> tuple[bool, dict]:
  """(reached num_steps, report fields: last logged losses, the step this
  call started at (> 0: resumed), num_steps)."""
  step = int(jax.device_get(state.step))
  losses = {k: v for k, v in (history[-1] if history else {}).items()
            if k not in ('step', 'steps_per_s', 'tokens_per_s')}
  start = int(history[0]['step']) - 1 if history else step
  return step >= tc.num_steps, dict(losses=losses, start_step=start,
                                    steps=tc.num_steps)


def _compressed(ctx: Context, kind: RungKind, rung: dict, rung_dir: str,
                student: Callable[[], Student]) -> Student:
  """The rung's compressed student, or only its config when resuming."""
  cfg_file = os.path.join(rung_dir, 'student_config.json')
  if (kind.distill is None and os.path.isfile(cfg_file) and
      _has_checkpoint(rung_dir)):
    # trainer.train restores the values and needs only the config; this
    # also skips re-running the sensitivity analysis.
    logging.info('ladder: %s resumes from its trainer checkpoint', rung_dir)
    with open(cfg_file) as f:
      return FluxConfig.from_json(f.read()), None
  logging.info('ladder: %s: compressing (%s)', rung_dir, kind.name)
  out = kind.compress(ctx, student(), rung)
  _write_atomic(cfg_file, out[0].to_json())
  return out


def run_ladder(config: ml_collections.ConfigDict, workdir: str, *,
               mesh=None) -> dict:
  """Runs (or resumes) the ladder in `workdir`; see the module docstring.

  Args:
    config: see experiments/configs/ladder_tiny.py (teacher, mesh, distill,
      samples, timing, rungs) and experiments/configs/shapes.py (plus
      evaluate: the toy-world evaluation of every rung).
    workdir: all outputs; an existing ladder there is resumed.
    mesh: default parallel.create_mesh(config.mesh).
  Returns:
    The report dict (also report.json); 'complete' is False when a rung's
    trainer stopped early (distill.stop_after).
  """
  rungs = check_config(config)  # Every config error before any work.
  mesh = mesh or parallel.create_mesh(dict(config.mesh))
  os.makedirs(workdir, exist_ok=True)
  dc = config.distill
  grid = tuple(dc.data.grid)
  ctx = Context(config, mesh, grid, tuple(sampling.get_schedule(
      dc.num_sampling_steps, grid[0] * grid[1], shift=False)), workdir)
  report = dict(setup=dict(img_len=grid[0] * grid[1], txt_len=dc.data.txt_len,
                           device=jax.devices()[0].device_kind,
                           repeats=config.timing.repeats),
                teacher=_read_json(os.path.join(workdir, 'teacher.json')),
                rungs=[], complete=False)
  ref_file = os.path.join(workdir, 'samples', 'teacher_latents.npy')
  if report['teacher'] is None or not os.path.isfile(ref_file):
    row, ref = _measure(ctx, ctx.teacher, 'teacher', workdir, None)
    report['teacher'] = dict(row, kind='-')
    if jax.process_index() == 0:
      tmp = f'{ref_file}.tmp-{os.getpid()}.npy'
      np.save(tmp, ref)
      os.replace(tmp, ref_file)
    _write_atomic(os.path.join(workdir, 'teacher.json'),
                  json.dumps(report['teacher'], indent=2))

  # Students are loaded lazily: a finished rung is only read back when the
  # next rung needs its student, so a finished ladder reruns in seconds.
  load = lambda path: checkpoint.load(
      path, shardings=parallel.loading_shardings(mesh))
  student = lambda: ctx.teacher
  # What each report row measures: its DiT, its T5 and, for exports, files.
  stages = [dict(row=report['teacher'], dit=student, text_encoder=None,
                 dir=os.path.join(workdir, 'teacher'))]
  for i, rung in enumerate(rungs):
    kind = RUNG_KINDS[rung['kind']]
    name = f'rung_{i}_{kind.name}'
    rung_dir = os.path.join(workdir, name)
    out_dir = os.path.join(rung_dir, 'student')
    done = _read_json(os.path.join(rung_dir, 'done.json'))
    if done is not None:
      if done['rung'] != _marker_key(rung):
        raise ValueError(
            f'ladder: {rung_dir} was finished with options {done["rung"]} '
            f'but the config now says {_marker_key(rung)}; use a new workdir '
            'or delete that rung folder and the ones after it')
      logging.info('ladder: %s already done; skipping', name)
      row = done['row']
      if kind.distill is None:  # text_encoder leaves the denoiser as it is.
        student = functools.partial(load, out_dir)
    else:
      compressed = _compressed(ctx, kind, rung, rung_dir, student)
      finished, fields = (kind.distill or _distill_denoiser)(
          ctx, compressed, rung, rung_dir)
      if not finished:
        logging.info('ladder: %s stopped early (distill.stop_after); rerun '
                     'to resume', name)
        _write_report(workdir, report)
        return report
      if kind.distill is None:
        current = load(out_dir)
        student = lambda current=current: current
      row, _ = _measure(ctx, student(), name, workdir, np.load(ref_file))
      row.update(fields, kind=kind.name, ablation=bool(rung.get('ablation')))
      _write_atomic(os.path.join(rung_dir, 'done.json'), json.dumps(
          dict(rung=_marker_key(rung), row=row), indent=2))
      logging.info('ladder: %s done: %s', name, row)
    report['rungs'].append(row)
    _write_report(workdir, report)
    te = ctx.text_encoder
    if kind.name == 'text_encoder':
      te = os.path.join(rung_dir, text_encoder.STUDENT_DIR)
      if not rung['ablation']:
        ctx.text_encoder = te
    stages.append(dict(row=row, dit=student, text_encoder=te, dir=rung_dir,
                       exports=row.get('exports')))
  if config.get('evaluate') and ctx.pipeline is not None:
    report['evaluation'] = ladder_eval.evaluate_stages(ctx, stages)
  report['complete'] = True
  _write_report(workdir, report)
  return report

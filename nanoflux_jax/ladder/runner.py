"""The NanoFLUX compression ladder: compress, then distil, rung by rung.

`run_ladder(config, workdir)` walks `config.rungs` in order. Each rung is a
dict with a `kind` from `RUNG_KINDS` (see rungs.py: prune, depth,
static_modulation, downsample, finetune, text_encoder, export; extend with
`rungs.register_rung`; kinds.py lists the built-in ones), that kind's options, `distill`: overrides of
`config.distill` (a `trainer.default_config()`) for the distillation that
follows the compression, and `ablation` (default False). The student of
rung i is distilled from the ORIGINAL teacher in workdir/rung_{i}_{kind}, and
the stage it ends with (stage.py: its DiT, lineage, text encoder and
sampling steps) is the input of rung i + 1, unless rung i is an ablation:
then it is only reported, against the main rung it stands in for.

Layout of workdir:
  teacher.json                 the teacher's report row (computed once)
  rung_{i}_{kind}/
    compressed.json            the stage right after compressing (written
                               before training) and its sample PSNR then
    checkpoints/               the trainer's orbax CheckpointManager
    metrics.jsonl              one line per logged training step
    student/                   final student (nanoflux_jax.checkpoint)
    settings.json              the effective settings it trains with
                               (provenance.py), written before any work
    stage.json                 the stage the rung ends with
    done.json                  marker: the rung's options and report row
  samples/{teacher,rung_i_kind}.png   same prompts and noise (decoded with
                               the teacher pipeline's VAE, else latent
                               previews)
  report.json, report.md       one row per finished rung plus the teacher,
                               and each rung's settings that differ from
                               the defaults
  config.json                  the whole config of the latest run
  workdir.lock                 held while a run writes here (one at a time)
With a teacher pipeline (config.teacher.shapes: the shapes-world teacher,
trained once into workdir/teacher; or config.teacher.pipeline: a FLUX
folder) prompts get the pipeline's real embeddings, text-encoder rungs
distil its T5, the export rung writes the final pipeline (workdir/pipeline)
and its .tflite files (workdir/tflite/{fp32,int8}), and
config.evaluate scores every rung after the last one (ladder_eval.py:
{rung dir}/eval.json, samples/eval_*.png, report sections).

Resume: a rung with done.json is skipped and its stage.json restored; an
unfinished rung restarts its compression only if the trainer had not saved a
checkpoint yet, and otherwise resumes inside `trainer.train` at the saved step
from compressed.json.
Either way its settings.json must match what the config now gives (options,
effective distillation config, the teacher's identity), else the run stops
naming each difference; config.accept_changed_settings=True goes on and
records the change (provenance.reconcile).
The whole config is validated before the teacher is even loaded.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import checkpoint
from nanoflux_jax import compress
from nanoflux_jax.compress import layout
from nanoflux_jax import images
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.ladder import clip_eval
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.shapes import evaluation as ladder_eval
from nanoflux_jax.distill import loop
from nanoflux_jax.ladder import provenance
from nanoflux_jax.ladder import rungs as rungs_lib
from nanoflux_jax.ladder import stage as stage_lib
from nanoflux_jax.distill import workdir_lock
from nanoflux_jax.ladder.rungs import Context, RUNG_KINDS, RungKind, Student
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.evaluate import metrics
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models import sharding


# ---------------------------------------------------------------------------
# Config checking (before any work).
# ---------------------------------------------------------------------------
# Options every rung takes besides its kind's own.
_COMMON_OPTIONS = ('kind', 'distill', 'ablation')
CONFIG_FILE = 'config.json'

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
  clip_eval.check_config(config)  # config.clip_eval (off when empty).
  rungs = []
  for i, r in enumerate(raw):
    r = dict(r.to_dict() if isinstance(r, ml_collections.ConfigDict) else r)
    kind = r.get('kind')
    where = f'ladder rung {i} ({kind!r})'
    if kind not in RUNG_KINDS:
      raise ValueError(f'ladder rung {i}: unknown kind {kind!r}; known kinds: '
                       f'{sorted(RUNG_KINDS)}')
    spec = RUNG_KINDS[kind]
    extra = sorted(set(r) - set(spec.defaults) - set(_COMMON_OPTIONS))
    if extra:
      raise ValueError(f'{where}: unknown options {extra}; {kind} accepts '
                       f'{sorted(spec.defaults)} and {list(_COMMON_OPTIONS)}')
    if not isinstance(r.get('ablation', False), bool):
      raise ValueError(f"{where}: ablation must be True or False, got "
                       f"{r['ablation']!r}")
    opts = {**spec.defaults, 'ablation': False, **r,
            'distill': dict(r.get('distill') or {})}
    base = spec.base_distill(config)
    if base is not None:  # The overrides must name existing options.
      rungs_lib.override(base, opts['distill'], f'{where}.distill')
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
                                  img_grid=rungs_lib.img_grid(cfg, ctx.grid)))
  times = []
  for _ in range(max(1, repeats) + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd({'params': params}, **x))
    times.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(times[1:])


def _sample(ctx: Context, stage: Stage, student: Student) -> np.ndarray:
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
      jnp.asarray(emb['y']), jnp.asarray(stage.schedule, jnp.float32),
      img_grid=rungs_lib.img_grid(cfg, ctx.grid))
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


def _sample_images(ctx: Context, latents: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3]: decoded by the teacher pipeline's VAE, else latent
  previews."""
  if ctx.pipeline is None:
    return latent_preview(latents, ctx.grid, ctx.config.samples.scale)
  return np.asarray(ctx.pipeline.decode_latents(
      jnp.asarray(latents), ctx.resolution, ctx.resolution))


def _sample_psnr(ctx: Context, latents: np.ndarray) -> float | None:
  """PSNR (dB) of the sample images against the teacher's (same noise);
  None without a teacher pipeline."""
  if ctx.pipeline is None:
    return None
  reference = np.load(_teacher_latents_file(ctx.workdir))
  return float(metrics.psnr(_sample_images(ctx, latents),
                            _sample_images(ctx, reference)))


def _teacher_latents_file(workdir: str) -> str:
  return os.path.join(workdir, 'samples', 'teacher_latents.npy')


def _measure(ctx: Context, stage: Stage, student: Student, name: str,
             workdir: str, reference: np.ndarray | None
             ) -> tuple[dict, np.ndarray]:
  """(report row, sample latents); writes samples/{name}.png."""
  cfg, _ = student
  h, w = ctx.grid
  t = ctx.config.distill.data.txt_len
  latents = _sample(ctx, stage, student)
  png = os.path.join('samples', f'{name}.png')
  if jax.process_index() == 0:
    images.save_grid(_sample_images(ctx, latents), os.path.join(workdir, png))
  mse = 0.0 if reference is None else np.mean(np.square(latents - reference))
  return dict(name=name, params=int(compress.count_params(cfg)),
              gflops=compress.count_flops(cfg, h * w, t) / 1e9,
              ms=_forward_ms(ctx, student, ctx.config.timing.repeats),
              device=jax.devices()[0].device_kind, sample_mse=float(mse),
              sample_psnr=None if reference is None else _sample_psnr(
                  ctx, latents),
              samples=png), latents


# ---------------------------------------------------------------------------
# Report files (atomic).
# ---------------------------------------------------------------------------
def _write_atomic(path: str, text: str) -> None:
  if jax.process_index() == 0:
    atomic.write_file(path, lambda f: f.write(text))


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
      'MSE: final latents vs the teacher\'s (same prompts and noise); '
      'sample PSNR: their images against the teacher\'s, right after the '
      'compression (step 0) and after the distillation. Trained on: the '
      'device that distilled the rung (and timed its ms / fwd).', '',
      '| rung | kind | params | GFLOPs | ms / fwd | trained on | steps | '
      'loss | output_kd | sample MSE | sample PSNR step 0 -> end (dB) | '
      'samples |',
      '|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|']
  for r in [report['teacher']] + report['rungs']:
    loss = r.get('losses') or {}
    name = r['name'] + (' (ablation)' if r.get('ablation') else '')
    lines.append(
        f"| {name} | {r.get('kind', '-')} | {r['params']:,} | "
        f"{r['gflops']:.4g} | {r['ms']:.2f} | {r.get('device', '-')} | "
        f"{r.get('steps', '-')} | "
        f"{_fmt(loss.get('loss'), '.4g')} | "
        f"{_fmt(loss.get('output_kd'), '.4g')} | {r['sample_mse']:.4g} | "
        f"{_fmt(r.get('sample_psnr_init'), '.2f')} -> "
        f"{_fmt(r.get('sample_psnr'), '.2f')} | [png]({r['samples']}) |")
  if any(r.get('settings') for r in report['rungs']):
    lines += ['', provenance.markdown(report['rungs'])]
  if report.get('evaluation'):
    lines += ['', ladder_eval.markdown(report)]
  if report.get('clip_eval'):
    lines += ['', clip_eval.markdown(report)]
  return '\n'.join(lines) + '\n'


def _write_report(workdir: str, report: dict) -> None:
  _write_atomic(os.path.join(workdir, 'report.json'),
                json.dumps(report, indent=2, sort_keys=True))
  _write_atomic(os.path.join(workdir, 'report.md'), report_markdown(report))


# ---------------------------------------------------------------------------
# The ladder.
# ---------------------------------------------------------------------------
def _compressed(ctx: Context, kind: RungKind, rung: dict, stage: Stage,
                student: Callable[[], Student]) -> tuple[Student, Stage]:
  """The rung's compressed student and stage; only the config when resuming.

  Also writes rung_dir/compressed.json: the stage (with the teacher block
  each student block descends from) and the PSNR of the new student's
  samples before any distillation (how much the compression alone lost).
  """
  rung_dir = ctx.rung_dir
  path = os.path.join(rung_dir, stage_lib.COMPRESSED_FILE)
  saved = stage_lib.load(path, ctx.workdir)
  if (kind.trains_denoiser and saved is not None and
      loop.latest_step(rung_dir) is not None):
    # trainer.train restores the values and needs only the config; this
    # also skips re-running the sensitivity analysis.
    logging.info('ladder: %s resumes from its trainer checkpoint', rung_dir)
    return (saved[0].dit_config, None), saved[0]
  logging.info('ladder: %s: compressing (%s)', rung_dir, kind.name)
  stages = []

  def transform(s: Student) -> Student:
    out, new = kind.compress(ctx, stage, s, rung)
    stages.append(new)
    return out
  # Transforms see unrolled blocks; a scanned student is re-scanned after.
  out = layout.compress_unrolled(transform, student(), ctx.mesh)
  new = dataclasses.replace(stages[0], dit_config=out[0])
  psnr = None
  if kind.trains_denoiser:  # Its values will be trained into rung_dir/student.
    new = dataclasses.replace(new, dit=os.path.join(rung_dir, 'student'))
    psnr = _sample_psnr(ctx, _sample(ctx, new, out))
  if jax.process_index() == 0:
    stage_lib.save(path, new, ctx.workdir, sample_psnr_init=psnr)
  return out, new


def _rung_dir(workdir: str, i: int, rung: dict) -> str:
  return os.path.join(workdir, f"rung_{i}_{rung['kind']}")


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
  Raises:
    provenance.SettingsChanged: a rung trained under other settings.
    workdir_lock.WorkdirLocked: another run is writing to workdir.
  """
  rungs = check_config(config)  # Every config error before any work.
  with workdir_lock.hold(workdir, 'ladder'):  # One writer at a time.
    return _run_ladder(config, workdir, rungs, mesh)


def _run_ladder(config: ml_collections.ConfigDict, workdir: str,
                rungs: list[dict], mesh) -> dict:
  """run_ladder's body, inside the workdir lock."""
  mesh = mesh or parallel.create_mesh(dict(config.mesh))
  os.makedirs(workdir, exist_ok=True)
  # Every started rung's record is checked before any work or write.
  teacher_id = provenance.teacher_identity(config, workdir)
  for i, rung in enumerate(rungs):
    rung_dir = _rung_dir(workdir, i, rung)
    provenance.check_rung(config, workdir, rung_dir, rung, teacher_id,
                          _read_json(os.path.join(rung_dir, 'done.json')),
                          write=False)
  _write_atomic(os.path.join(workdir, CONFIG_FILE),
                config.to_json_best_effort(indent=2, sort_keys=True))
  dc = config.distill
  grid = tuple(dc.data.grid)
  ctx = Context(config, mesh, grid, workdir)
  report = dict(setup=dict(img_len=grid[0] * grid[1], txt_len=dc.data.txt_len,
                           device=jax.devices()[0].device_kind,
                           repeats=config.timing.repeats),
                teacher=_read_json(os.path.join(workdir, 'teacher.json')),
                rungs=[], complete=False)
  ref_file = _teacher_latents_file(workdir)
  if report['teacher'] is None or not os.path.isfile(ref_file):
    row, ref = _measure(ctx, ctx.teacher_stage, ctx.teacher, 'teacher',
                        workdir, None)
    report['teacher'] = dict(row, kind='-')
    if jax.process_index() == 0:
      atomic.write_file(ref_file, lambda f: np.save(f, ref), 'wb')
    _write_atomic(os.path.join(workdir, 'teacher.json'),
                  json.dumps(report['teacher'], indent=2))

  # A stage's DiT is loaded lazily and kept while it is the newest one: a
  # finished rung is only read back when the next rung needs its student,
  # so a finished ladder reruns in seconds.
  loaded = {}

  def dit(st: Stage) -> Student:
    if st.dit is None:
      return ctx.teacher
    if st.dit not in loaded:
      loaded.clear()
      loaded[st.dit] = checkpoint.load(
          st.dit, shardings=sharding.loading_shardings(mesh))
    return loaded[st.dit]

  current = None  # The main line's stage; None: the teacher's (built on
  # first use: a resumed ladder may never need to load the teacher).
  # What each report row measures: its stage and, for exports, files.
  stages = [dict(row=report['teacher'], dit=lambda: ctx.teacher,
                 text_encoder=None, stage=None,
                 dir=os.path.join(workdir, 'teacher'))]
  for i, rung in enumerate(rungs):
    kind = RUNG_KINDS[rung['kind']]
    ctx.rung_dir = rung_dir = _rung_dir(workdir, i, rung)
    name = os.path.basename(rung_dir)
    done = _read_json(os.path.join(rung_dir, 'done.json'))
    settings = provenance.check_rung(config, workdir, rung_dir, rung,
                                     teacher_id, done, write=True)
    stage_file = os.path.join(rung_dir, stage_lib.STAGE_FILE)
    if done is not None:
      logging.info('ladder: %s already done; skipping', name)
      row = done['row']
      saved = stage_lib.load(stage_file, workdir)
      if saved is None:
        raise FileNotFoundError(f'{rung_dir}: done.json without '
                                f'{stage_lib.STAGE_FILE}; rerun this rung '
                                '(remove its done.json)')
      new = saved[0]
    else:
      before = current or ctx.teacher_stage
      student, compressed = _compressed(
          ctx, kind, rung, before, functools.partial(dit, before))
      result = kind.run(ctx, compressed, student, rung)
      if not result.finished:
        logging.info('ladder: %s stopped early (distill.stop_after); rerun '
                     'to resume', name)
        _write_report(workdir, report)
        return report
      new = result.stage or compressed
      if result.student is not None:
        loaded.clear()
        loaded[new.dit] = result.student
      initial = stage_lib.load(os.path.join(
          rung_dir, stage_lib.COMPRESSED_FILE), workdir)
      row, _ = _measure(ctx, new, dit(new), name, workdir, np.load(ref_file))
      row.update(result.fields, kind=kind.name, ablation=rung['ablation'],
                 sample_psnr_init=(initial or (None, {}))[1].get(
                     'sample_psnr_init'))
      if jax.process_index() == 0:
        stage_lib.save(stage_file, new, workdir)
      _write_atomic(os.path.join(rung_dir, 'done.json'), json.dumps(
          dict(rung=provenance.marker_key(rung), row=row), indent=2))
      logging.info('ladder: %s done: %s', name, row)
    row = dict(row, settings=provenance.summary(settings, config))
    report['rungs'].append(row)
    _write_report(workdir, report)
    if not rung['ablation']:
      current = new
    stages.append(dict(row=row, dit=functools.partial(dit, new),
                       text_encoder=new.text_encoder, stage=new,
                       dir=rung_dir, exports=row.get('exports')))
    if clip_eval.score_stages(ctx, stages, report):  # The teacher, then each.
      _write_report(workdir, report)
  if config.get('evaluate') and ctx.pipeline is not None:
    report['evaluation'] = ladder_eval.evaluate_stages(ctx, stages)
  report['complete'] = True
  _write_report(workdir, report)
  return report

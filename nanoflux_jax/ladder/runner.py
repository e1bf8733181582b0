"""The NanoFLUX compression ladder: compress, then distil, rung by rung.

`run_ladder(config, workdir)` walks `config.rungs` in order. Each rung is a
dict with a `kind` from `RUNG_KINDS` (kinds.py lists the built-in ones:
prune, depth, static_modulation, downsample, finetune, step_distill,
text_encoder, export; add one with `rungs.register_rung`), that kind's
options, `distill`: overrides of `config.distill` (a
`trainer.default_config()`) for the distillation that follows the
compression, and `ablation` (default False). The student of
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
config.evaluate names the evaluators run after every rung (evaluators.py:
{type, every, ...options}; {stage dir}/eval_{type}.json, report sections).

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
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import checkpoint
from nanoflux_jax.compress import layout
from nanoflux_jax import parallel
from nanoflux_jax.ladder import evaluators
from nanoflux_jax.ladder import measure as measure_lib
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import loop
from nanoflux_jax.ladder import provenance
from nanoflux_jax.ladder import report as report_lib
from nanoflux_jax.ladder import rungs as rungs_lib
from nanoflux_jax.ladder import stage as stage_lib
from nanoflux_jax.distill import workdir_lock
from nanoflux_jax.ladder.rungs import Context, RUNG_KINDS, RungKind, Student
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.models import sharding
from nanoflux_jax.pipeline import is_pipeline


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
  start = config.get('student')
  if start and not checkpoint.is_checkpoint(_start_dit(start)):
    raise FileNotFoundError(f'ladder: student {start!r} is neither a '
                            'pipeline folder nor a nanoflux checkpoint')
  data_lib.load_prompts(config.distill.data.prompts)
  data_lib.load_prompts(config.samples.prompts)
  evaluators.check_config(config)  # config.evaluate: [{type, every, ...}].
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
    psnr = measure_lib.sample_psnr(ctx, measure_lib.sample(ctx, new, out))
  if jax.process_index() == 0:
    stage_lib.save(path, new, ctx.workdir, sample_psnr_init=psnr)
  return out, new


def _start_dit(path: str) -> str:
  """The DiT checkpoint of config.student: a pipeline folder's
  transformer/, or the path itself."""
  return os.path.join(path, 'transformer') if is_pipeline(path) else path


def _start_stage(ctx: Context) -> Stage:
  """The stage the first rung compresses: the teacher's, or with
  config.student (a finished ladder's pipeline folder or student
  checkpoint) that student, sampling as config.distill does."""
  path = ctx.config.get('student')
  if not path:
    return ctx.teacher_stage
  dit = _start_dit(path)
  return Stage(checkpoint.load_config(dit),
               ctx.config.distill.num_sampling_steps, ctx.grid, dit=dit)


def _rung_dir(workdir: str, i: int, rung: dict) -> str:
  return os.path.join(workdir, f"rung_{i}_{rung['kind']}")


def run_ladder(config: ml_collections.ConfigDict, workdir: str, *,
               mesh=None) -> dict:
  """Runs (or resumes) the ladder in `workdir`; see the module docstring.

  Args:
    config: see experiments/configs/ladder_tiny.py (teacher, mesh, distill,
      samples, timing, rungs) and experiments/configs/shapes.py (plus
      evaluate: the evaluators). Optional config.student: a finished
      ladder's pipeline folder or student checkpoint to start from instead
      of the teacher (the rungs still distil from the teacher).
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
    done = report_lib.read_json(os.path.join(rung_dir, 'done.json'))
    provenance.check_rung(config, workdir, rung_dir, rung, teacher_id, done,
                          write=False)
  report_lib.write_atomic(os.path.join(workdir, CONFIG_FILE),
                config.to_json_best_effort(indent=2, sort_keys=True))
  dc = config.distill
  grid = tuple(dc.data.grid)
  ctx = Context(config, mesh, grid, workdir)
  report = dict(setup=dict(img_len=grid[0] * grid[1], txt_len=dc.data.txt_len,
                           device=jax.devices()[0].device_kind,
                           repeats=config.timing.repeats,
                           start=config.get('student') or None),
                teacher=report_lib.read_json(
                    os.path.join(workdir, 'teacher.json')),
                rungs=[], complete=False)
  ref_file = measure_lib.teacher_latents_file(workdir)
  if report['teacher'] is None or not os.path.isfile(ref_file):
    row, ref = measure_lib.measure(ctx, ctx.teacher_stage, ctx.teacher,
                                   'teacher', workdir, None)
    report['teacher'] = dict(row, kind='-')
    if jax.process_index() == 0:
      atomic.write_file(ref_file, lambda f: np.save(f, ref), 'wb')
    report_lib.write_atomic(os.path.join(workdir, 'teacher.json'),
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
    rung_dir = _rung_dir(workdir, i, rung)
    rung_ctx = ctx.at(rung_dir)
    name = os.path.basename(rung_dir)
    done = report_lib.read_json(os.path.join(rung_dir, 'done.json'))
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
      before = current or _start_stage(ctx)
      student, compressed = _compressed(
          rung_ctx, kind, rung, before, functools.partial(dit, before))
      result = kind.run(rung_ctx, compressed, student, rung)
      if not result.finished:
        logging.info('ladder: %s stopped early (distill.stop_after); rerun '
                     'to resume', name)
        report_lib.write_report(workdir, report)
        return report
      new = result.stage or compressed
      if result.student is not None:
        loaded.clear()
        loaded[new.dit] = result.student
      initial = stage_lib.load(os.path.join(
          rung_dir, stage_lib.COMPRESSED_FILE), workdir)
      row, _ = measure_lib.measure(ctx, new, dit(new), name, workdir,
                                   np.load(ref_file))
      row.update(result.fields, kind=kind.name, ablation=rung['ablation'],
                 sample_psnr_init=(initial or (None, {}))[1].get(
                     'sample_psnr_init'))
      if jax.process_index() == 0:
        stage_lib.save(stage_file, new, workdir)
      report_lib.write_atomic(os.path.join(rung_dir, 'done.json'), json.dumps(
          dict(rung=provenance.marker_key(rung), row=row), indent=2))
      logging.info('ladder: %s done: %s', name, row)
    row = dict(row, settings=provenance.summary(settings, config))
    report['rungs'].append(row)
    report_lib.write_report(workdir, report)
    if not rung['ablation']:
      current = new
    stages.append(dict(row=row, dit=functools.partial(dit, new),
                       text_encoder=new.text_encoder, stage=new,
                       dir=rung_dir, exports=row.get('exports')))
    if evaluators.run(ctx, stages, report):  # The teacher, then each due.
      report_lib.write_report(workdir, report)
  report['complete'] = True
  report_lib.write_report(workdir, report)
  return report

"""The 'shapes' evaluator: every ladder stage on the shapes world.

  config.evaluate = [dict(type='shapes', every=1, num_prompts=512, ...)]
(DEFAULTS lists the options.) Each evaluated stage (the teacher, the rungs,
an export rung's .tflite folders) runs on the same held-out prompts and
noise with its own DiT, text encoder and sampling steps: toy-GenEval,
toy-FID, PSNR against the teacher's images, JAX ms per image and LiteRT ms
per image. ladder/evaluators.py runs it per rung and caches each result in
{stage dir}/eval_shapes.json; this module also keeps the images in {stage
dir}/eval_shapes_images.npy (the teacher's are the PSNR reference). Delete
those files to re-measure (e.g. on a quieter machine). toy-GenEval is
judged by the classifier shipped with the package (or the geometric judge)
and carries a 95% Wilson interval.

The ladder side registers it (ladder/evaluator_list.py: the shapes package
sits below the ladder); the report section is evaluation_report.py.
`results(report)` reads a report's figures back, also from a report
written before evaluators were a registry.
"""
from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import images
from nanoflux_jax.shapes import classifier as clf_lib
from nanoflux_jax.shapes import evaluation_report
from nanoflux_jax.shapes import scoring as toy
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.export import bundle
from nanoflux_jax.export import runner

IMAGES_FILE = 'eval_shapes_images.npy'
# Options: the held-out world and noise, the judge ('' = the shipped
# classifier, classic world only; 'geometry' = shapes/geometry.py, any world;
# or a Classifier folder), timing (repeats, the JAX batch, LiteRT of every
# stage: an fp32 export per stage; an export rung's files are always timed),
# and the report's targets (evaluation_report.TARGETS).
DEFAULTS = dict(world='shapes', world_seed=1000, num_prompts=512,
                noise_seed=0, num_reference=512, classifier='', repeats=5,
                timing_batch=8, litert=False, num_threads=2, grid_images=16,
                targets={})
_INTS = {'world_seed': 0, 'num_prompts': 1, 'noise_seed': 0,
         'num_reference': 2, 'repeats': 1, 'timing_batch': 1,
         'num_threads': 1, 'grid_images': 1}   # key: minimum.


def check(config, e: dict, where: str) -> None:
  """Raises naming `where` (config.evaluate[i]) and the option."""
  if not (config.teacher.get('pipeline') or config.teacher.get('shapes')):
    raise ValueError(f'{where}: the shapes evaluator needs a teacher '
                     'pipeline (teacher.pipeline or teacher.shapes)')
  for k, low in _INTS.items():
    v = e[k]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f'{where}: {k}={v!r} must be an integer >= {low}')
  if e['world'] not in shapes.WORLDS:
    raise ValueError(f"{where}: world={e['world']!r}; known: "
                     f'{sorted(shapes.WORLDS)}')
  if e['classifier'] not in ('', 'geometry') and not os.path.isdir(
      e['classifier']):
    raise FileNotFoundError(f"{where}: classifier={e['classifier']!r} is "
                            "neither '', 'geometry' nor a classifier folder")
  if e['world'] != 'shapes' and e['classifier'] != 'geometry':
    raise ValueError(f"{where}: world={e['world']!r} needs "
                     "classifier='geometry' (a trained classifier judges "
                     "the classic 'shapes' world only)")
  if not isinstance(e['litert'], bool):
    raise ValueError(f"{where}: litert={e['litert']!r} must be True/False")
  unknown = sorted(set(e['targets'] or {}) - set(evaluation_report.TARGETS))
  if unknown:
    raise ValueError(f'{where}: unknown targets {unknown}; known: '
                     f'{sorted(evaluation_report.TARGETS)}')


_SETS = {}  # One (eval set, judge) per settings, built once per process.


def _eval_set(ctx, e: dict):
  """(toy.EvalSet, judge) of options `e` at the teacher's resolution."""
  cfg = ctx.pipeline.flux_cfg
  key = json.dumps(dict(e, targets=None, r=ctx.resolution, g=ctx.grid,
                        c=cfg.in_channels), sort_keys=True)
  if key not in _SETS:
    _SETS.clear()
    s = toy.eval_set(e['world_seed'], e['num_prompts'], ctx.resolution,
                     (ctx.grid[0] * ctx.grid[1], cfg.in_channels),
                     e['noise_seed'], e['num_reference'], e['world'])
    _SETS[key] = s, clf_lib.load_judge(e['classifier'], e['world'],
                                       ctx.resolution)
  return _SETS[key]


def _eval_pipeline(ctx, sub, s, clf, teacher_images, e, teacher=None
                   ) -> tuple[dict, np.ndarray]:
  """A JAX stage: images, scores, JAX ms and (optionally) LiteRT ms.

  teacher: the teacher's Subject (None: this is the teacher), timed again
  interleaved with the stage (teacher_jax_ms, teacher_denoise_ms), so that
  the stage's speed-up compares two times taken under the same load.
  """
  steps, txt_len = sub.num_steps, ctx.config.distill.data.txt_len
  pipe = ctx.pipeline_for(sub.load(), sub.text_encoder)
  imgs = toy.generate(pipe, s, steps, txt_len)
  ev = toy.scores(clf, imgs, s, teacher_images)
  timed = {'stage': (pipe, steps)}
  if teacher is not None:  # Its speed-up is timed, not taken from its row.
    timed['teacher'] = (ctx.pipeline_for(teacher.load(), teacher.text_encoder),
                        teacher.num_steps)
  ms = toy.jax_ms_interleaved(timed, s, txt_len, e['repeats'],
                              e['timing_batch'])
  ev['jax_ms'], ev['denoise_ms'] = ms['stage']['total'], ms['stage']['denoise']
  if teacher is not None:
    ev['teacher_jax_ms'] = ms['teacher']['total']
    ev['teacher_denoise_ms'] = ms['teacher']['denoise']
  ev['litert_ms'] = None
  if e['litert']:  # fp32 export of this stage, timed, then thrown away.
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'tflite')
      bundle.export_pipeline(pipe, out, ctx.resolution, ctx.resolution,
                             num_steps=steps, max_sequence_length=txt_len)
      ev['litert_ms'] = toy.litert_ms_per_image(
          runner.TFLitePipeline(out, e['num_threads']), s, e['repeats'])
  return ev, imgs


def _eval_exports(ctx, sub, s, clf, teacher_images, e
                  ) -> tuple[dict, np.ndarray]:
  """An export stage: every quantization through LiteRT; the row shows the
  last one (the smallest, int8, in the default config)."""
  per_q, imgs = {}, None
  for name, info in sub.exports.items():
    tp = runner.TFLitePipeline(os.path.join(ctx.workdir, info['dir']),
                               e['num_threads'])
    imgs = toy.generate_litert(tp, s)
    per_q[name] = dict(toy.scores(clf, imgs, s, teacher_images),
                       litert_ms=toy.litert_ms_per_image(tp, s, e['repeats']),
                       mb=info['mb'], dir=info['dir'])
  return dict(per_q[name], jax_ms=None, denoise_ms=None, shown=name,
              exports=per_q), imgs


def evaluate(ctx, sub, e: dict, done: list) -> dict:
  """The metrics of one stage (ladder/evaluators.py's protocol).

  Args:
    ctx: the ladder Context (pipeline, workdir, grid, config).
    sub: the stage (evaluators.Subject); an export stage (role 'export')
      is scored through its .tflite folders.
    e: the options (DEFAULTS).
    done: the stages scored before it, the teacher first (its images are
      the PSNR reference).
  Returns:
    toy.scores' figures plus jax_ms, denoise_ms, litert_ms (None: not
    timed), num_steps and grid (samples/eval_{name}.png); a rung timed in
    JAX adds teacher_jax_ms and teacher_denoise_ms (the teacher timed
    interleaved with it); an export stage adds shown (the quantization in
    the row) and exports (each one's).
  """
  s, clf = _eval_set(ctx, e)
  reference = None
  if sub.index:
    file = os.path.join(done[0][0].dir, IMAGES_FILE)
    if not os.path.isfile(file):
      raise FileNotFoundError(
          f'{file}: the teacher\'s evaluation images are missing; delete '
          f'{os.path.join(done[0][0].dir, "eval_shapes.json")} to recompute')
    reference = np.load(file)
  if sub.role == 'export':
    ev, imgs = _eval_exports(ctx, sub, s, clf, reference, e)
  else:
    ev, imgs = _eval_pipeline(ctx, sub, s, clf, reference, e,
                              teacher=done[0][0] if sub.index else None)
  png = os.path.join('samples', f'eval_{sub.name}.png')
  if jax.process_index() == 0:  # Every host computes the same.
    os.makedirs(sub.dir, exist_ok=True)
    atomic.write_file(os.path.join(sub.dir, IMAGES_FILE),
                      lambda f: np.save(f, imgs), 'wb')
    images.save_grid(imgs[:e['grid_images']], os.path.join(ctx.workdir, png))
  return dict(ev, num_steps=sub.num_steps, grid=png)


def summary(ctx, e: dict) -> dict:
  """The report's setup line (computed with the teacher's result)."""
  s, clf = _eval_set(ctx, e)
  return dict(num_prompts=len(s.prompts), world_seed=e['world_seed'],
              noise_seed=e['noise_seed'], num_reference=e['num_reference'],
              txt_len=int(ctx.config.distill.data.txt_len),
              resolution=ctx.resolution,
              device=jax.devices()[0].device_kind,
              timing_batch=e['timing_batch'], num_threads=e['num_threads'],
              classifier_accuracy=clf_lib.evaluate_on_world(clf, n=256),
              world=e['world'])


def results(report: dict) -> tuple[dict, dict[str, dict]]:
  """(setup, {stage name: metrics}) of a ladder report's shapes evaluation.

  setup: the setup line plus 'targets'. Reads report['evaluation']['shapes']
  and also a report written before evaluators were a registry (the setup
  in report['evaluation'], each row's figures in row['eval'], one
  num_steps for all: copied into each stage's metrics).

  Raises:
    ValueError: the report has no shapes evaluation.
  """
  ev = report.get('evaluation') or {}
  if 'shapes' in ev:
    sec = ev['shapes']
    setup = dict(sec.get('setup') or {}, targets=dict(
        (sec.get('options') or {}).get('targets') or {}))
    return setup, dict(sec.get('rows') or {})
  if 'num_prompts' in ev:  # The layout before evaluators.py.
    rows = [report['teacher']] + report['rungs']
    return dict(ev), {r['name']: dict(r['eval'], num_steps=r['eval'].get(
        'num_steps', ev.get('num_steps'))) for r in rows if r.get('eval')}
  raise ValueError('ladder report: no shapes evaluation (the ladder ran '
                   "without a config.evaluate entry of type 'shapes')")

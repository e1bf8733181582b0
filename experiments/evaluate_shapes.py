r"""Scores a pipeline folder and/or .tflite folders on the shapes world.

Re-checks a committed student against its ladder report, with the report's
own evaluation settings (held-out world, prompts, noise, steps):

  python experiments/evaluate_shapes.py --report=docs/shapes_full/report.json \
      --pipeline=docs/shapes_full/pipeline --tflite=docs/shapes_full/tflite/int8

Prints toy-GenEval (95% Wilson interval) and toy-FID per model, the report's
figure for the same model and the difference, and ends with one JSON line.
Without --report the settings come from the flags.
"""
import json
import os

from absl import app
from absl import flags

from nanoflux_jax import jsonfile
from nanoflux_jax.ladder.rungs import RUNG_KINDS
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.shapes import classifier as clf_lib
from nanoflux_jax.shapes import evaluation
from nanoflux_jax.shapes import scoring as toy
_PIPELINE = flags.DEFINE_string('pipeline', '', 'A FluxPipeline folder.')
_TFLITE = flags.DEFINE_multi_string('tflite', [], 'TFLite bundle folders.')
_REPORT = flags.DEFINE_string(
    'report', '', "A ladder report.json: its evaluation settings, and its "
    "final student's (and exports') toy-GenEval to compare with.")
_WORLD = flags.DEFINE_integer('world_seed', 1000, 'Held-out world.')
_NUM = flags.DEFINE_integer('num_prompts', 512, 'Prompts.')
_NOISE = flags.DEFINE_integer('noise_seed', 0, 'Noise seed.')
_NUM_REF = flags.DEFINE_integer('num_reference', 512, 'toy-FID references.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Euler steps.')
_TXT_LEN = flags.DEFINE_integer('txt_len', 24, 'T5 sequence length.')
_RES = flags.DEFINE_integer('resolution', 64, 'Image side in pixels.')
_WORLD_NAME = flags.DEFINE_enum(
    'world', 'shapes', list(shapes.WORLDS),
    "The shapes world (shapes/world.py); 'shapes9' is judged by geometry.")
_THREADS = flags.DEFINE_integer('num_threads', 2, 'LiteRT threads.')


def _settings() -> tuple[dict, dict]:
  """(evaluation settings, {model kind: the report's toy-GenEval})."""
  s = dict(world_seed=_WORLD.value, num_prompts=_NUM.value,
           noise_seed=_NOISE.value, num_reference=_NUM_REF.value,
           num_steps=_STEPS.value, txt_len=_TXT_LEN.value,
           resolution=_RES.value, world=_WORLD_NAME.value)
  if not _REPORT.value:
    return s, {}
  report = jsonfile.read_object(_REPORT.value, ValueError, 'ladder report')
  setup, results = evaluation.results(report)
  s.update({k: setup[k] for k in s if k in setup})
  # The final student: the last main rung that is not an export (by the
  # role its rung kind declares).
  role = lambda r: getattr(RUNG_KINDS.get(r.get('kind')), 'role', None)
  main = [r for r in report['rungs'] if not r.get('ablation')]
  final = [r for r in main if role(r) != 'export'][-1]
  if final['name'] not in results:
    raise ValueError(f"{_REPORT.value}: the final student {final['name']} "
                     'was not evaluated')
  s['num_steps'] = results[final['name']]['num_steps']
  expected = {'pipeline': results[final['name']]['geneval']}
  for r in main:
    for q, x in ((results.get(r['name']) or {}).get('exports') or {}).items():
      expected[q] = x['geneval']
  return s, expected


def main(argv):
  del argv
  if not (_PIPELINE.value or _TFLITE.value):
    raise app.UsageError('give --pipeline and/or --tflite')
  s, expected = _settings()
  # The shipped classifier knows the classic world only.
  clf = clf_lib.load_judge('' if s['world'] == 'shapes' else 'geometry',
                           s['world'], s['resolution'])
  results = {}
  if _PIPELINE.value:
    # pylint: disable-next=g-import-not-at-top
    from nanoflux_jax.pipeline import FluxPipeline
    pipe = FluxPipeline.from_pretrained(_PIPELINE.value)
    grid = s['resolution'] // pipe.latent_factor
    es = toy.eval_set(s['world_seed'], s['num_prompts'], s['resolution'],
                      (grid * grid, pipe.flux_cfg.in_channels),
                      s['noise_seed'], s['num_reference'], s['world'])
    images = toy.generate(pipe, es, s['num_steps'], s['txt_len'])
    results['pipeline'] = toy.scores(clf, images, es, None)
  for folder in _TFLITE.value:
    # pylint: disable-next=g-import-not-at-top
    from nanoflux_jax.export import runner
    tp = runner.TFLitePipeline(folder, _THREADS.value)
    es = toy.eval_set(s['world_seed'], s['num_prompts'], s['resolution'],
                      tp.packed_shape[1:], s['noise_seed'],
                      s['num_reference'], s['world'])
    results[os.path.basename(os.path.normpath(folder))] = toy.scores(
        clf, toy.generate_litert(tp, es), es, None)
  out = {}
  for name, r in results.items():
    lo, hi = r['geneval_ci']
    line = (f"{name}: toy-GenEval {r['geneval']:.3f} [{lo:.3f}, {hi:.3f}], "
            f"toy-FID {r['fid']:.3g}")
    out[name] = dict(geneval=r['geneval'], geneval_ci=[lo, hi], fid=r['fid'])
    if name in expected:
      diff = r['geneval'] - expected[name]
      line += f"; report {expected[name]:.3f} (difference {diff:+.3f})"
      out[name].update(report_geneval=expected[name], difference=diff)
    print(line)
  print(json.dumps(dict(settings=s, results=out)))


if __name__ == '__main__':
  app.run(main)

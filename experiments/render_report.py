r"""Re-renders a ladder workdir's report.md from its report.json.

The report's text and checks come from the current code (ladder/report.py
and the evaluators' sections); its figures are the run's own, nothing is
measured again. A report.json written before evaluators were a registry
(the shapes evaluation's setup in report['evaluation'], each row's figures
in row['eval']) is upgraded to the current layout first, and written back.

  python experiments/render_report.py --workdir=docs/shapes_full
"""
import datetime
import json
import os

from absl import app
from absl import flags

from nanoflux_jax.ladder import report as report_lib
from nanoflux_jax.shapes import evaluation

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder with report.json.',
                               required=True)
# Targets renamed since (old name -> current evaluation_report.TARGETS key).
_RENAMED_TARGETS = {'min_no_downsampler_slowdown': 'min_control_slowdown',
                    'max_no_downsampler_gain': 'max_control_gain'}


def upgrade(report: dict) -> dict:
  """report in the current layout (a new dict; unchanged if already so)."""
  if 'shapes' in (report.get('evaluation') or {}):
    return report
  setup, rows = evaluation.results(report)
  targets = {_RENAMED_TARGETS.get(k, k): v
             for k, v in setup.pop('targets', {}).items()}
  # That renderer always held text-encoder ablations to scoring lower than
  # the rung they stand in for; the current one does so where asked.
  if any(r.get('ablation') and r.get('kind') == 'text_encoder'
         for r in report['rungs']):
    targets.setdefault('ablations_lower_by_ci', ['text_encoder'])
  drop = lambda r: {k: v for k, v in r.items() if k != 'eval'}
  return dict(report, teacher=drop(report['teacher']),
              rungs=[drop(r) for r in report['rungs']],
              evaluation={'shapes': dict(
                  options=dict(type='shapes', every=1, targets=targets),
                  setup=setup, rows=rows)})


def main(argv):
  del argv
  path = os.path.join(_WORKDIR.value, 'report.json')
  with open(path) as f:
    report = upgrade(json.load(f))
  report['rendered'] = (f'{datetime.date.today()}, '
                        'experiments/render_report.py')
  report_lib.write_report(_WORKDIR.value, report)
  print(f'wrote {path} and report.md')


if __name__ == '__main__':
  app.run(main)

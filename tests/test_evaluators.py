"""config.evaluate: evaluators looked up by type, run per rung as each
finishes (respecting `every`), their results in report.json / report.md and
cached per stage; a bad entry is refused up front, naming its index and key
(ladder/evaluators.py)."""
import dataclasses
import glob
import importlib.util
import json
import os

import jax
import pytest

from nanoflux_jax import compress
from nanoflux_jax.ladder import evaluators
from nanoflux_jax.ladder import runner as ladder
from nanoflux_jax.ladder import rungs as rungs_lib
from tests.refusal import assert_refused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keep(ctx, stage, student, opts):
  """A test rung's run: trains nothing, keeps the stage it was given."""
  del ctx, stage, student, opts
  return rungs_lib.RungResult(True, {})


def _fewer_steps(ctx, stage, student, opts):
  """A test rung's compression: the DiT unchanged, sampled in opts['steps']
  steps (as a step-distillation rung would)."""
  del ctx
  return student, dataclasses.replace(stage, num_steps=opts['steps'])


@pytest.fixture
def registered(monkeypatch):
  """Test rung kinds (no training) and a test evaluator recording calls."""
  monkeypatch.setitem(rungs_lib.RUNG_KINDS, 'ev_test_keep', rungs_lib.RungKind(
      'ev_test_keep', rungs_lib.unchanged, {}, _keep, role='text_encoder'))
  monkeypatch.setitem(rungs_lib.RUNG_KINDS, 'ev_test_steps',
                      rungs_lib.RungKind('ev_test_steps', _fewer_steps,
                                         {'steps': 1}, _keep,
                                         role='text_encoder'))
  calls = []

  def count(ctx, subject, opts, done):
    """The DiT's parameter count x opts['scale'], and what it was given."""
    calls.append(subject.name)
    return dict(params=compress.count_params(subject.stage.dit_config) *
                opts['scale'], num_steps=subject.num_steps,
                schedule_len=len(subject.key.get('schedule') or ()),
                role=subject.role, done=[d.name for d, _ in done],
                # Whether the rung after this stage had finished.
                next_done=bool(glob.glob(os.path.join(
                    ctx.workdir, f'rung_{subject.index}_*', 'done.json'))))

  monkeypatch.delitem(evaluators.EVALUATORS, 'ev_test', raising=False)
  evaluators.register_evaluator('ev_test', defaults={'scale': 1})(count)
  yield calls
  evaluators.EVALUATORS.pop('ev_test')


def _config(every, **opts):
  spec = importlib.util.spec_from_file_location(
      'ladder_tiny', os.path.join(ROOT, 'experiments/configs/ladder_tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.samples.num, c.timing.repeats = 1, 1
  c.rungs = [{'kind': 'ev_test_keep'}, {'kind': 'ev_test_steps'},
             {'kind': 'ev_test_keep'}]
  c.evaluate = [dict(type='ev_test', every=every, **opts)]
  return c


def test_registered_evaluator_runs_per_rung_reports_and_caches(
    registered, tmp_path):
  calls, workdir = registered, str(tmp_path / 'wd')
  report = ladder.run_ladder(_config(every=2, scale=2), workdir)
  # every=2: the teacher, the 2nd rung and the last one.
  due = ['teacher', 'rung_1_ev_test_steps', 'rung_2_ev_test_keep']
  assert calls == due
  rows = report['evaluation']['ev_test']['rows']
  assert list(rows) == due
  teacher_params = report['teacher']['params']
  assert rows['teacher']['params'] == 2 * teacher_params
  assert rows['teacher']['role'] is None
  assert rows['rung_2_ev_test_keep']['role'] == 'text_encoder'
  assert rows['rung_2_ev_test_keep']['done'] == due[:2]
  # Each rung is evaluated as it finishes, before the next one runs (the
  # teacher with the first rung).
  assert [r['next_done'] for r in rows.values()] == [True, False, False]
  # Rung 1 samples in 1 step (its own stage); rung 2 inherits that stage.
  assert [r['num_steps'] for r in rows.values()] == [2, 1, 1]
  assert rows['rung_1_ev_test_steps']['schedule_len'] == 2
  on_disk = json.loads((tmp_path / 'wd' / 'report.json').read_text())
  assert on_disk['evaluation']['ev_test']['rows'] == rows
  assert on_disk['evaluation']['ev_test']['options']['scale'] == 2
  md = (tmp_path / 'wd' / 'report.md').read_text()
  section = md.split('## Evaluation: ev_test')[1]
  assert ('| rung | kind | params | num_steps | schedule_len | role | '
          'next_done |') in section
  assert (f'| teacher | - | {2 * teacher_params:.4g} | 2 | 0 | - | True |'
          in section)
  assert section.count('| rung_') == 2
  # Cached per stage, keyed by the options and the stage's schedule.
  cached = json.loads((tmp_path / 'wd' / 'rung_1_ev_test_steps' /
                       'eval_ev_test.json').read_text())
  assert cached['metrics'] == rows['rung_1_ev_test_steps']
  assert cached['key']['options']['scale'] == 2
  assert cached['key']['stage']['schedule'] == [1.0, 0.0]

  # A rerun reads every result back; every=1 adds only the rung not yet
  # evaluated.
  calls.clear()
  again = ladder.run_ladder(_config(every=2, scale=2), workdir)
  assert calls == [] and again['evaluation'] == report['evaluation']
  every1 = ladder.run_ladder(_config(every=1, scale=2), workdir)
  assert calls == ['rung_0_ev_test_keep']
  assert list(every1['evaluation']['ev_test']['rows']) == [
      'teacher', 'rung_0_ev_test_keep', *due[1:]]


@pytest.mark.parametrize('entry,fragments', [
    ([dict(type='nope')], ['config.evaluate[0]', "unknown type 'nope'",
                           'ev_test']),
    ([dict(type='ev_test'), dict(type='clip', bogus=1)],
     ['config.evaluate[1]', "unknown keys ['bogus']"]),
    ([dict(type='ev_test', every=0)], ['config.evaluate[0]', 'every=0']),
    ([dict(type='ev_test'), dict(type='ev_test')],
     ['config.evaluate[1]', "'ev_test' is already at index 0"]),
    ([dict(type='shapes', num_prompts=0)],
     ['config.evaluate[0]', 'num_prompts=0']),
    ([dict(type='shapes')], ['config.evaluate[0]', 'needs a teacher '
                             'pipeline']),
    ({'type': 'ev_test'}, ['config.evaluate must be a list']),
])
def test_bad_evaluate_entry_is_refused_before_any_work(registered, tmp_path,
                                                       entry, fragments):
  c = _config(every=1)
  del c.evaluate  # (A list field refuses a dict.)
  c.evaluate = entry
  if 'num_prompts=0' in fragments:
    c.teacher.pipeline = str(tmp_path)  # Past the pipeline check.
  assert_refused(lambda: ladder.run_ladder(c, str(tmp_path / 'wd')),
                 ValueError, fragments, [], folder=str(tmp_path))


def test_due_every_nth_rung_the_teacher_and_the_last():
  assert [i for i in range(6) if evaluators.due(i, 2, 5)] == [0, 2, 4, 5]
  assert [i for i in range(4) if evaluators.due(i, 1, 3)] == [0, 1, 2, 3]


def test_shapes_evaluator_scores_each_stage_with_its_own_steps(
    registered, tmp_path, monkeypatch):
  """The 'shapes' evaluator on the shipped teacher and a stage that samples
  it in half the steps: each with its own steps, PSNR against the teacher's
  images, a report section, and the cache read back."""
  from nanoflux_jax import parallel  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.ladder.stage import Stage  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'shapes_cfg', os.path.join(ROOT, 'experiments/configs/shapes.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('quick')  # The shipped teacher pipeline.
  # 2 prompts, timed as one batch of 2: one compiled shape per step count.
  c.evaluate = [dict(type='shapes', num_prompts=2, num_reference=8,
                     repeats=1, timing_batch=2, grid_images=2,
                     targets={'min_teacher_geneval': 0.5})]
  # One device: a pipeline loaded onto an 8-device mesh encodes prompts
  # onto all 8 while its host-copy DiT samples on one (the micro ladder's
  # subprocess has one device).
  mesh = parallel.create_mesh((1, 1, 1), jax.devices()[:1])
  ctx = rungs_lib.Context(c, mesh, tuple(c.distill.data.grid), str(tmp_path))
  cfg = ctx.teacher[0]
  size = dict(params=compress.count_params(cfg), gflops=1.0)
  stages = [
      dict(row=dict(name='teacher', kind='-', **size), dir=str(
          tmp_path / 'teacher'), dit=lambda: ctx.teacher, stage=None),
      dict(row=dict(name='rung_0_ev_test_steps', kind='ev_test_steps',
                    ablation=False, **size),
           dir=str(tmp_path / 'rung_0'), dit=lambda: ctx.teacher,
           stage=Stage(cfg, 4, ctx.grid))]
  report = dict(teacher=stages[0]['row'], rungs=[stages[1]['row']])
  assert evaluators.run(ctx, stages, report)
  section = report['evaluation']['shapes']
  t, r = section['rows']['teacher'], section['rows']['rung_0_ev_test_steps']
  assert (t['num_steps'], r['num_steps']) == (8, 4)
  assert t['psnr'] is None and 10 < r['psnr'] < 60  # 4 steps: not the same.
  for m in (t, r):
    assert 0 <= m['geneval'] <= 1 and 0 < m['denoise_ms'] < m['jax_ms']
    assert os.path.isfile(tmp_path / m['grid'])
  # The rung's speed-up is over the teacher timed with it, at its 8 steps.
  assert 'teacher_denoise_ms' not in t
  assert 0 < r['teacher_denoise_ms'] < r['teacher_jax_ms']
  assert section['setup']['num_prompts'] == 2
  assert set(section['setup']['classifier_accuracy']) >= {'shape', 'colour'}
  md = evaluators.markdown(report)
  assert '| rung_0_ev_test_steps | ev_test_steps | 4 |' in md
  assert 'teacher toy-GenEval' in md.split('## Targets')[1]
  # Read back from {stage dir}/eval_shapes.json: nothing is evaluated.
  monkeypatch.setitem(evaluators.EVALUATORS, 'shapes', dataclasses.replace(
      evaluators.EVALUATORS['shapes'], evaluate=None, summary=None))
  again = dict(teacher=stages[0]['row'], rungs=[stages[1]['row']])
  assert evaluators.run(ctx, stages, again)
  assert again['evaluation']['shapes'] == section

"""The shapes report's FLOP-ratio column and its 'speed-up >= 0.8 x FLOP
ratio' check per main rung (shapes/evaluation_report.py), on a hand-made
report section; and the ablations compared by role, flag and size alone."""
from nanoflux_jax.shapes import evaluation_report as shapes_report


def _row(name, gflops, denoise_ms, kind='prune', role='denoiser',
         params=100, **kw):
  return dict(name=name, kind=kind, role=role, params=params, gflops=gflops,
              **kw)


def _ev(denoise_ms, geneval=0.9, ci=None):
  return dict(denoise_ms=denoise_ms, jax_ms=None if denoise_ms is None else
              denoise_ms + 1, litert_ms=None, geneval=geneval,
              geneval_ci=ci, fid=1.0, psnr=30.0, grid='g.png', num_steps=4)


def _section(rows, ms, targets=None, **evals):
  """rows: report rows; ms: {name: denoise ms} of the evaluated ones."""
  res = {r['name']: _ev(ms[r['name']], **evals.get(r['name'], {}))
         for r in rows if r['name'] in ms}
  setup = dict(num_prompts=8, world_seed=0, resolution=64, timing_batch=8,
               num_threads=2, classifier_accuracy={})
  return dict(options=dict(type='shapes', every=1, targets=targets or {}),
              setup=setup, rows=res)


def _teacher():
  return _row('teacher', 1.0, 20.0, kind='-', role=None, params=400)


def test_flop_ratio_and_speedup():
  t, r = dict(gflops=2.0, eval=_ev(20.0)), dict(gflops=0.5, eval=_ev(8.0))
  assert shapes_report.flop_ratio(t, r) == 4.0
  # Half the Euler steps halve the FLOPs of the loop the speed-up times.
  t8 = dict(gflops=2.0, eval=dict(_ev(20.0), num_steps=8))
  r4 = dict(gflops=0.5, eval=dict(_ev(5.0), num_steps=4))
  assert shapes_report.flop_ratio(t8, r4) == 8.0
  assert shapes_report.speedup(t, r) == 2.5
  assert shapes_report.speedup(t, dict(eval=_ev(None))) is None
  # The teacher timed with the row (same load) wins over its own row.
  paired = dict(gflops=0.5, eval=dict(_ev(8.0), teacher_denoise_ms=12.0))
  assert shapes_report.speedup(t, paired) == 1.5


def test_report_column_and_met_missed_per_main_rung():
  rows = [_teacher(),
          _row('a', 0.5, 12.0),     # 1.67x for 2x: 0.83 -> met.
          _row('b', 0.25, 8.0),     # 2.5x for 4x: 0.625 -> missed.
          _row('c', 0.25, 2.0, ablation=True),   # Ablations: no check.
          _row('d', 0.25, None, kind='export', role='export')]  # No JAX.
  ms = dict(teacher=20.0, a=12.0, b=8.0, c=2.0, d=None)
  md = shapes_report.markdown(_section(rows, ms), rows)
  assert '| denoise speed-up | FLOP ratio |' in md
  table = {l.split(' | ')[0][2:]: l.split(' | ') for l in md.splitlines()
           if l.startswith('| ') and 'g.png' in l}
  assert table['a'][6:8] == ['1.67', '2.00']
  assert table['d'][6:8] == ['-', '4.00']
  assert table['a'][2] == '4'  # Each stage's own Euler steps.
  checks = [l for l in md.splitlines() if 'of the FLOP ratio' in l]
  assert checks == [
      '- met: a: denoising 1.67x faster for 2.00x fewer FLOPs, 0.83 of the '
      'FLOP ratio (target >= 0.8)',
      '- **MISSED**: b: denoising 2.50x faster for 4.00x fewer FLOPs, 0.62 '
      'of the FLOP ratio (target >= 0.8)']
  # The fraction is a target the config can set.
  md = shapes_report.markdown(
      _section(rows, ms, {'min_speedup_of_flop_ratio': 0.6}), rows)
  assert '- met: b: denoising 2.50x' in md and '(target >= 0.6)' in md
  # The final student is the last main non-export row (by role).
  assert 'Final student: b, against the teacher.' in md


def test_ablations_are_compared_by_role_flag_and_size():
  """A control (same size as its start, trained longer) is compared with
  the rung after it; a same-kind ablation with the next main rung of its
  kind; a text-encoder ablation with the last main one before it. Kind
  names are data only: renamed kinds give the same comparisons."""
  for k in (('p', 'f', 'd', 't'), ('prune', 'finetune', 'downsample',
                                   'text_encoder')):
    prune, ft, ds, te = k
    rows = [_teacher(),
            _row('r0', 0.5, 10.0, kind=prune, params=200),
            _row('r1', 0.4, 8.0, kind=prune, params=150, ablation=True,
                 loss_weights={'output_kd': 1.0}),
            _row('r2', 0.4, 8.0, kind=prune, params=150,
                 loss_weights={'output_kd': 1.0, 'rf': 1.0}),
            _row('r3', 0.4, 8.0, kind=ft, params=150, ablation=True),
            _row('r4', 0.2, 4.0, kind=ds, params=150, ablation=True),
            _row('r5', 0.4, 8.0, kind=te, role='text_encoder', params=150),
            _row('r6', 0.4, 8.0, kind=te, role='text_encoder', params=150,
                 ablation=True)]
    ms = {r['name']: r['gflops'] * 20 for r in rows}
    targets = {'min_control_slowdown': 0.5, 'max_control_gain': 0.0,
               'ablations_lower_by_ci': ['text_encoder']}
    md = shapes_report.markdown(
        _section(rows, ms, targets, r3={'geneval': 0.95},
                 r5={'geneval': 0.9, 'ci': [0.85, 0.95]},
                 r6={'geneval': 0.8}), rows)
    abl = md.split('## Ablations')[1].split('## Targets')[0]
    assert f"- (a) Without r4's compression ({ds}): r3, the student " in abl
    assert '(compared with r4): 8.0 vs 4.0 JAX denoise ms' in abl
    assert '- (b) Text-encoder ablation r6 (compared with r5)' in abl
    assert '| r2 (main) |' in abl and '| r1 | output_kd 1 |' in abl
    tgt = md.split('## Targets')[1]
    assert '- met: (a) without r4 (r3) denoising is +100% slower' in tgt
    assert '- **MISSED**: (a) without r4 (r3) toy-GenEval is +0.050' in tgt
    assert ('- met: r6 changes toy-GenEval by -0.100 against r5 (target: '
            'lower by more than the 95% interval, 0.050 below r5)') in tgt
    assert 'Final student: r5' in md


def test_unevaluated_rows_are_listed_not_scored():
  rows = [_teacher(), _row('a', 0.5, 12.0), _row('b', 0.25, 8.0)]
  md = shapes_report.markdown(_section(rows, dict(teacher=20.0, b=8.0)),
                              rows)
  assert ('Not evaluated (the evaluator runs on every 1-th rung, the teacher '
          'and the last rung): a.') in md
  assert '| a |' not in md.split('## Ablations')[0].split('Not evaluated')[0]

"""The ladder report's FLOP-ratio column and its 'speed-up >= 0.8 x FLOP
ratio' check per main rung (shapes/evaluation.py), on a hand-made report."""
from nanoflux_jax.shapes import evaluation as ladder_eval
def _row(name, gflops, denoise_ms, kind='prune', **kw):
  ev = dict(denoise_ms=denoise_ms, jax_ms=None if denoise_ms is None else
            denoise_ms + 1, litert_ms=None, geneval=0.9, geneval_ci=None,
            fid=1.0, psnr=30.0, grid='g.png')
  return dict(name=name, kind=kind, params=100, gflops=gflops, eval=ev, **kw)


def _report(rungs, targets=None):
  setup = dict(num_prompts=8, world_seed=0, num_steps=4, resolution=64,
               timing_batch=8, num_threads=2, classifier_accuracy={},
               targets=targets or {})
  return dict(teacher=_row('teacher', 1.0, 20.0, kind='-'), rungs=rungs,
              evaluation=setup)


def test_flop_ratio_and_speedup():
  t, r = _row('t', 2.0, 20.0), _row('r', 0.5, 8.0)
  assert ladder_eval.flop_ratio(t, r) == 4.0
  assert ladder_eval.denoise_speedup(t, r) == 2.5
  assert ladder_eval.denoise_speedup(t, _row('e', 0.5, None)) is None


def test_report_column_and_met_missed_per_main_rung():
  rungs = [_row('a', 0.5, 12.0),     # 1.67x for 2x: 0.83 -> met.
           _row('b', 0.25, 8.0),     # 2.5x for 4x: 0.625 -> missed.
           _row('c', 0.25, 2.0, ablation=True),   # Ablations: no check.
           _row('d', 0.25, None, kind='export')]  # Not timed in JAX.
  md = ladder_eval.markdown(_report(rungs))
  assert '| denoise speed-up | FLOP ratio |' in md
  table = {l.split(' | ')[0][2:]: l.split(' | ') for l in md.splitlines()
           if l.startswith('| ') and 'g.png' in l}
  assert table['a'][5:7] == ['1.67', '2.00']
  assert table['d'][5:7] == ['-', '4.00']
  checks = [l for l in md.splitlines() if 'of the FLOP ratio' in l]
  assert checks == [
      '- met: a: denoising 1.67x faster for 2.00x fewer FLOPs, 0.83 of the '
      'FLOP ratio (target >= 0.8)',
      '- **MISSED**: b: denoising 2.50x faster for 4.00x fewer FLOPs, 0.62 '
      'of the FLOP ratio (target >= 0.8)']
  # The fraction is a target the config can set.
  md = ladder_eval.markdown(_report(rungs, {'min_speedup_of_flop_ratio': 0.6}))
  assert '- met: b: denoising 2.50x' in md and '(target >= 0.6)' in md

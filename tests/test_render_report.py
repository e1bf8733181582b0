"""experiments/render_report.py: a report.json from before evaluators were a
registry is upgraded and re-rendered with the current checks (the FLOP-ratio
column and its per-rung target), keeping every figure."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ev(denoise_ms, geneval):
  return dict(denoise_ms=denoise_ms, jax_ms=denoise_ms + 0.5, litert_ms=None,
              geneval=geneval, geneval_ci=[geneval - 0.02, geneval + 0.01],
              fid=300.0, psnr=None if denoise_ms == 16.0 else 35.0,
              grid='samples/g.png')


def _row(name, kind, gflops, ev, ablation=False):
  return dict(name=name, kind=kind, gflops=gflops, params=1000, ms=1.0,
              device='cpu', sample_mse=0.0, samples='samples/s.png',
              ablation=ablation, eval=ev)


def test_old_report_is_upgraded_and_rerendered(tmp_path):
  old = dict(
      complete=True,
      setup=dict(device='cpu', img_len=64, txt_len=24, repeats=5),
      teacher=_row('teacher', '-', 0.2, _ev(16.0, 0.98)),
      rungs=[_row('rung_0_prune', 'prune', 0.1, _ev(9.0, 0.96)),
             _row('rung_1_prune', 'prune', 0.05, _ev(6.0, 0.95))],
      evaluation=dict(num_prompts=512, world_seed=1000, noise_seed=0,
                      num_steps=8, resolution=64, timing_batch=8,
                      num_threads=2, classifier_accuracy={'shape': 1.0},
                      targets={'max_rung_drop': 0.03,
                               'max_no_downsampler_gain': 0.02}))
  (tmp_path / 'report.json').write_text(json.dumps(old))
  subprocess.run([sys.executable, os.path.join(ROOT, 'experiments',
                                               'render_report.py'),
                  f'--workdir={tmp_path}'], check=True, capture_output=True)
  new = json.loads((tmp_path / 'report.json').read_text())
  section = new['evaluation']['shapes']
  assert section['rows']['rung_1_prune']['denoise_ms'] == 6.0
  assert section['rows']['teacher']['num_steps'] == 8
  assert section['options']['targets'] == {'max_rung_drop': 0.03,
                                           'max_control_gain': 0.02}
  assert 'eval' not in new['teacher'] and 'eval' not in new['rungs'][0]
  md = (tmp_path / 'report.md').read_text()
  assert 'Re-rendered from report.json' in md
  assert '| denoise speed-up | FLOP ratio |' in md
  # 16/9 = 1.78x for 2x FLOPs (0.89: met); 16/6 = 2.67x for 4x (0.67).
  assert ('- met: rung_0_prune: denoising 1.78x faster for 2.00x fewer '
          'FLOPs, 0.89 of the FLOP ratio') in md
  assert ('- **MISSED**: rung_1_prune: denoising 2.67x faster for 4.00x '
          'fewer FLOPs, 0.67 of the FLOP ratio') in md

"""Smoke tests of the absl binaries on a tiny pipeline folder."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, xla_flags=''):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', script), *args],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags})
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_convert_then_sample(tmp_path):
  make_tiny_flux_pipeline(tmp_path / 'pipe')
  out = _run('convert_flux.py', f'--src={tmp_path / "pipe"}',
             f'--out={tmp_path / "converted"}', '--dtype=float32')
  assert 'peak RSS' in out
  import jax  # pylint: disable=g-import-not-at-top
  import nanoflux_jax as nf
  cfg, params = nf.convert.load_flux_transformer(str(tmp_path / 'converted'))
  assert cfg.depth == 2 and cfg.in_channels == 64
  # The converted values are the source's, tensor by tensor.
  src_cfg, src = nf.convert.load_flux_transformer(str(tmp_path / 'pipe'))
  assert cfg == src_cfg
  assert jax.tree.structure(params) == jax.tree.structure(src)
  jax.tree.map(np.testing.assert_array_equal, params, src)

  grid = tmp_path / 'grid.png'
  out = _run('sample.py', f'--model={tmp_path / "pipe"}', '--prompt=a red cat',
             '--prompt=a blue dog', '--height=16', '--width=32', '--steps=2',
             f'--out={grid}')
  for stage in ('encode', 'denoise', 'decode', 'first call'):
    assert stage in out, out
  img = np.asarray(Image.open(grid))
  assert img.shape == (2 + 16 + 2, 2 + 2 * (32 + 2), 3)  # 1 row x 2 cols.


def test_shapes_ladder_micro_end_to_end(tmp_path):
  """The README's main job at its smallest: the shapes teacher is trained
  and cached, every rung runs, the final student is exported (fp32 + int8)
  and every rung is evaluated into a well-formed report."""
  import json  # pylint: disable=g-import-not-at-top
  work = tmp_path / 'shapes'
  args = ('--config=' + os.path.join(ROOT, 'experiments/configs/shapes.py') +
          ':micro', f'--workdir={work}')
  # Compiling dominates a run this small: XLA's unoptimised CPU code
  # compiles about twice as fast and is plenty for a few steps per rung.
  fast = '--xla_backend_optimization_level=0'
  out = _run('ladder.py', *args, xla_flags=fast)
  assert 'ladder complete' in out
  report = json.loads((work / 'report.json').read_text())
  assert report['complete']
  assert [(r['kind'], r['ablation']) for r in report['rungs']] == [
      ('prune', False), ('depth', False), ('static_modulation', False),
      ('prune', True), ('prune', False), ('finetune', True),
      ('downsample', True), ('prune', False), ('text_encoder', False),
      ('text_encoder', True), ('export', False)]
  rungs = {r['name']: r for r in report['rungs']}
  # The depth rung keeps 3 of the teacher's 4 blocks; feature KD pairs each
  # student block with the teacher block it descends from, and leaves out
  # the down-sampler's coarse blocks [0, 1].
  origin = json.loads((work / 'rung_1_depth' / 'stage.json').read_text())[
      'stage']['teacher_blocks']
  assert len(origin) == 3 and origin == sorted(origin) and origin[-1] <= 3
  assert rungs['rung_1_depth']['feature_pairs'] == [
      [i, t] for i, t in enumerate(origin)]
  assert rungs['rung_6_downsample']['feature_pairs'] == [[2, origin[2]]]
  assert rungs['rung_3_prune']['loss_weights'] == {'output_kd': 1.0}
  assert rungs['rung_4_prune']['loss_weights'] == {
      'output_kd': 1.0, 'feature_kd': 1.0, 'rf': 1.0}
  # The ablations fed nothing: the main prune starts from the static
  # student, so both prunes give the same architecture.
  assert rungs['rung_3_prune']['params'] == rungs['rung_4_prune']['params']
  assert rungs['rung_5_finetune']['params'] == rungs['rung_4_prune']['params']
  for r in report['rungs'][:8]:  # Every denoiser rung: PSNR before/after.
    assert np.isfinite(r['sample_psnr_init']) and np.isfinite(
        r['sample_psnr']), r['name']
  assert rungs['rung_5_finetune']['sample_psnr_init'] == pytest.approx(
      rungs['rung_4_prune']['sample_psnr'], abs=1e-3)
  # The down-sampler is an ablation: the last prune starts from rung 4.
  assert rungs['rung_6_downsample']['params'] > rungs['rung_4_prune']['params']
  assert rungs['rung_7_prune']['params'] < rungs['rung_4_prune']['params']
  rows = [report['teacher']] + report['rungs']
  # The shapes evaluator ran on every stage (every=1; report.json sorts
  # the names).
  evals = report['evaluation']['shapes']['rows']
  assert sorted(evals) == sorted(r['name'] for r in rows)
  # Every student differs from the teacher, and is not noise: its images
  # are far closer to the teacher's than uniform noise is (<= 11 dB).
  for r in report['rungs']:
    assert r['sample_mse'] > 0 and evals[r['name']]['psnr'] > 15, r['name']
  for r in rows:
    ev = evals[r['name']]
    assert ev['num_steps'] == 8  # micro: no rung changes the steps.
    assert 0.0 <= ev['geneval'] <= 1.0 and np.isfinite(ev['fid'])
    lo, hi = ev['geneval_ci']
    assert 0.0 <= lo <= ev['geneval'] <= hi <= 1.0 and hi - lo > 0.05
    by = ev['geneval_by_objects']
    assert sum(v['n'] for v in by.values()) == 8  # micro: 8 prompts.
    assert (ev['psnr'] is None) == (r is report['teacher'])
    assert (ev['jax_ms'] is None) == (r['kind'] == 'export')
    if ev['jax_ms'] is not None:
      assert 0 < ev['denoise_ms'] < ev['jax_ms']
      # A rung's speed-up: the teacher timed again, interleaved with it.
      assert (ev.get('teacher_denoise_ms') is None) == (
          r is report['teacher'])
    grid = np.asarray(Image.open(work / ev['grid']))
    assert grid.shape == (2 + 3 * 66, 2 + 3 * 66, 3)  # 8 images of 64 px.
  assert rows[-2]['params'] < rows[0]['params']
  exports = evals[report['rungs'][-1]['name']]['exports']
  assert list(exports) == ['fp32', 'int8']
  for q in exports:
    for f in ('manifest.json', 't5.tflite', 'denoiser.tflite',
              'vae_decoder.tflite'):
      assert (work / 'tflite' / q / f).is_file(), (q, f)
    assert exports[q]['litert_ms'] > 0
  assert exports['int8']['mb'] < 0.6 * exports['fp32']['mb']
  # The teacher's and the final student's folders carry the settings they
  # were trained with (call_defaults.json): 64 px, 8 steps, 24 T5 tokens.
  from nanoflux_jax import call_args  # pylint: disable=g-import-not-at-top
  for folder in (work / 'teacher' / 'pipeline', work / 'pipeline'):
    assert call_args.read_call_defaults(str(folder)) == (
        call_args.CallDefaults(64, 64, 8, 24)), folder

  md = (work / 'report.md').read_text()
  assert md.count('![') == len(rows)
  for heading in ('| rung | kind | Euler steps | DiT params | GFLOPs | JAX '
                  'denoise ms / img | denoise speed-up | FLOP ratio | JAX ms '
                  '/ img | LiteRT ms / img | toy-GenEval [95% CI] | toy-FID | '
                  'PSNR (dB) |', '## Ablations', '## Targets',
                  '### TFLite exports', '### toy-GenEval by number of '
                  'prompted objects'):
    assert heading in md, heading
  ablations = md.split('## Ablations')[1].split('## Targets')[0]
  # Compared by role, ablation flag and size: the finetune ablation (a
  # control: the student it started from, trained longer) against the
  # down-sampler rung after it; the text-encoder ablation against the main
  # text-encoder rung; the loss ablation against the next main prune.
  for text in ("(a) Without rung_6_downsample's compression (downsample): "
               'rung_5_finetune', '(b) Text-encoder ablation '
               'rung_9_text_encoder (compared with rung_8_text_encoder',
               '| rung_4_prune (main) |', '| rung_3_prune | output_kd 1 |'):
    assert text in ablations, (text, ablations)
  # micro checks the full ladder's targets: params, denoise and total
  # speed-up, retention, 2 exports, teacher, 6 main rung drops, the
  # down-sampler's latency and quality, the text-encoder ablation; and the
  # 6 main rungs timed in JAX, each speed-up against its FLOP ratio.
  targets = [l for l in md.split('## Targets')[1].split('## Grids')[0]
             .splitlines() if l.startswith('- ')]
  assert len(targets) == 22, targets
  assert sum('of the FLOP ratio' in l for l in targets) == 6, targets
  assert all(l.startswith(('- met', '- **MISSED**', '- n/a'))
             for l in targets), targets

  # A rerun reuses the cached teacher and every finished rung.
  cached = work / 'teacher' / 'pipeline' / 'nanoflux_pipeline.json'
  before = cached.stat().st_mtime_ns
  out = _run('ladder.py', *args, xla_flags=fast)
  assert 'ladder complete' in out
  assert cached.stat().st_mtime_ns == before
  assert json.loads((work / 'report.json').read_text())['rungs'] == \
      report['rungs']


def test_shapes_configs_start_from_the_shipped_teacher():
  """quick and full start from the packaged teacher; retrain and micro
  train one; every variant passes the ladder's config check."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.shapes import world as shapes  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.ladder import runner as ladder  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'shapes_cfg', os.path.join(ROOT, 'experiments/configs/shapes.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  quick = mod.get_config('quick')
  assert quick.teacher.pipeline == shapes.teacher_path()
  assert not quick.teacher.shapes
  assert [r['kind'] for r in ladder.check_config(quick)] == [
      'prune', 'static_modulation', 'export']
  assert quick.evaluate[0]['num_prompts'] >= 512
  assert quick.distill.loss.weights.rf > 0  # real renderings, too.
  for arg in ('full', 'micro', 'quick,retrain', 'full,train_only'):
    c = mod.get_config(arg)
    ladder.check_config(c)
    retrain = arg.startswith('micro') or 'retrain' in arg
    assert bool(c.teacher.shapes) == retrain and (
        c.teacher.pipeline == ('' if retrain else shapes.teacher_path()))
  assert 'evaluate' not in mod.get_config('full,train_only')
  assert mod.get_config('quick,retrain').teacher.shapes.train.num_steps == (
      mod.get_config('teacher').teacher.shapes.train.num_steps)

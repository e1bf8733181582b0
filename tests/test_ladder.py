"""The compression ladder: CLI run + resume, mid-rung resume, config errors.

One uninterrupted 2-rung ladder (prune 50% -> distil, static modulation ->
distil) runs once per module from the command line; the resume test starts
from a copy of its first rung.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from nanoflux_jax import checkpoint
from nanoflux_jax.ladder import runner as ladder
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'experiments', 'configs', 'ladder_tiny.py')
# The CLI runs compile the same programs (one device each): a persistent
# cache (test_trainer.py's) lets the later runs skip most compilation.
CACHE = os.path.join(tempfile.gettempdir(), 'nanoflux_jax_test_cache')
RUNGS = ['rung_0_prune', 'rung_1_static_modulation']


def _config():
  spec = importlib.util.spec_from_file_location('ladder_tiny', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _cli(workdir, arg=''):
  """(stdout + stderr, seconds) of experiments/ladder.py on ladder_tiny."""
  t0 = time.time()
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'ladder.py'),
       f'--config={CONFIG}' + (f':{arg}' if arg else ''),
       f'--workdir={workdir}'],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '',
           'JAX_COMPILATION_CACHE_DIR': CACHE,
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'})
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout + out.stderr, time.time() - t0


def _table_rows(md: str) -> list[list[str]]:
  rows = [line for line in md.splitlines() if line.startswith('| ')]
  return [[c.strip() for c in r.strip('|').split('|')] for r in rows[1:]]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """(workdir, log, seconds) of one uninterrupted CLI ladder."""
  workdir = tmp_path_factory.mktemp('ladder') / 'full'
  return (workdir,) + _cli(workdir)


def test_cli_writes_report_checkpoints_samples_then_resumes(finished):
  workdir, log, _ = finished
  assert 'ladder complete' in log
  # Work counters, not wall-clock: each of the 2 rungs trains steps 1..4.
  assert log.count('step 1 |') == 2 and log.count('step 4 |') == 2, log[-3000:]
  md = (workdir / 'report.md').read_text()
  rows = _table_rows(md)
  assert [r[0] for r in rows] == ['teacher'] + RUNGS
  assert [r[1] for r in rows] == ['-', 'prune', 'static_modulation']
  report = json.loads((workdir / 'report.json').read_text())
  params = [r['params'] for r in [report['teacher']] + report['rungs']]
  assert params[0] > params[1] > params[2], params
  for r in report['rungs']:
    assert r['steps'] == 4 and r['start_step'] == 0
    assert np.isfinite(r['losses']['output_kd']) and r['ms'] > 0
    assert r['gflops'] < report['teacher']['gflops']
  for name in ['teacher'] + RUNGS:
    assert (workdir / 'samples' / f'{name}.png').stat().st_size > 0, name
  for name in RUNGS:
    assert (workdir / name / 'done.json').is_file()
    assert checkpoint.is_checkpoint(str(workdir / name / 'student'))
  cfg = checkpoint.load_config(str(workdir / RUNGS[1] / 'student'))
  assert cfg.modulation == 'static' and cfg.double_heads == (2,)
  # The tables sit at the timesteps the student samples: ladder_tiny's 2
  # unshifted Euler steps from t=1 (each step's start, by hand).
  assert cfg.static_timesteps == (1.0, 0.5), cfg.static_timesteps

  # A second run resumes: nothing is compressed or trained again, and the
  # report keeps one row per rung.
  log2, _ = _cli(workdir)
  assert log2.count('already done; skipping') == 2, log2[-3000:]
  assert 'compressing' not in log2
  assert re.search(r'step \d+ \|', log2) is None, log2[-3000:]
  assert (workdir / 'report.md').read_text() == md


def test_interrupted_rung_resumes_at_its_step_to_the_same_student(
    finished, tmp_path):
  """Rung 0 is taken over finished; rung 1 stops after 2 of its 4 steps
  (stop_after, as if preempted). The rerun skips rung 0, resumes rung 1 at
  step 2 from its trainer checkpoint (no new compression), and ends with
  the uninterrupted run's final student."""
  workdir = tmp_path / 'interrupted'
  shutil.copytree(finished[0], workdir,
                  ignore=lambda d, names: [n for n in names if n == RUNGS[1]])
  log, _ = _cli(workdir, 'stop_after=2')
  assert 'rung_0_prune already done; skipping' in log
  assert 'stopped early' in log and 'ladder complete' not in log
  assert not (workdir / RUNGS[1] / 'done.json').exists()
  assert not (workdir / RUNGS[1] / 'student').exists()
  assert [r[0] for r in _table_rows((workdir / 'report.md').read_text())] == (
      ['teacher', RUNGS[0]])

  log, _ = _cli(workdir)
  assert 'resumes from its trainer checkpoint' in log
  assert 'at step 2' in log and 'compressing' not in log, log[-3000:]
  report = json.loads((workdir / 'report.json').read_text())
  assert report['complete']
  assert [r['start_step'] for r in report['rungs']] == [0, 2]
  assert [r[0] for r in _table_rows((workdir / 'report.md').read_text())] == (
      ['teacher'] + RUNGS)
  _, got = checkpoint.load(str(workdir / RUNGS[1] / 'student'))
  _, want = checkpoint.load(str(finished[0] / RUNGS[1] / 'student'))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               got, want)


@pytest.mark.parametrize('rungs, match', [
    ([{'kind': 'prune'}, {'kind': 'quantize'}],
     r"rung 1: unknown kind 'quantize'; known kinds: \['depth', "
     r"'downsample', 'export', 'finetune', 'prune', 'static_modulation', "
     r"'step_distill', 'text_encoder'\]"),
    ([{'kind': 'prune', 'keep_head': 0.5}], r"unknown options \['keep_head'\]"),
    ([{'kind': 'finetune', 'ablation': 'yes'}],
     r"rung 0 \('finetune'\): ablation must be True or False, got 'yes'"),
    ([{'kind': 'static_modulation', 'distill': {'num_step': 3}}],
     r"unknown distill option 'num_step'"),
    ([{'kind': 'depth'}], 'exactly one of keep'),
    ([{'kind': 'export'}], 'export needs a teacher pipeline'),
])
def test_bad_rungs_fail_before_any_work(tmp_path, rungs, match):
  c = _config()
  c.rungs = rungs
  with pytest.raises(ValueError, match=match):
    ladder.run_ladder(c, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()


def test_downsample_and_text_encoder_rungs_are_checked_up_front():
  c = _config()
  c.rungs = [{'kind': 'text_encoder', 'distill': {'num_steps': 2}},
             {'kind': 'downsample', 'start': 0, 'end': -1}]
  assert [r['kind'] for r in ladder.check_config(c)] == [
      'text_encoder', 'downsample']
  c.rungs = [{'kind': 'text_encoder', 'distill': {'num_step': 2}}]
  with pytest.raises(ValueError, match="unknown distill option 'num_step'"):
    ladder.check_config(c)
  c.rungs = [{'kind': 'downsample', 'start': 0, 'end': 1, 'factor': 4}]
  with pytest.raises(ValueError, match=r'grid \(2, 2\) is not divisible'):
    ladder.check_config(c)
  c.teacher.pipeline = '/no/such/flux'
  with pytest.raises(FileNotFoundError, match='/no/such/flux'):
    ladder.check_config(c)
  c.teacher.pipeline = os.path.dirname(CONFIG)  # Exists; not loaded here.
  c.rungs = [{'kind': 'export', 'quantize': ('int8', 'int3')}]
  with pytest.raises(ValueError, match=r"rung 0 \('export'\): .*'int3'"):
    ladder.check_config(c)


def test_origin_feature_pairs_follow_depth_and_skip_coarse_blocks():
  """The ladder's 'origin' pairs: each student block with the teacher block
  it descends from (after block removal), coarse down-sampled blocks out;
  the trainer itself refuses the name."""
  from nanoflux_jax.configs import FluxConfig  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.ladder import rungs  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.ladder.stage import Stage  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.distill import trainer  # pylint: disable=g-import-not-at-top
  cfg = FluxConfig.tiny(depth=1, depth_single_blocks=3)
  stage = Stage(cfg, num_steps=4, grid=(4, 4))
  assert rungs.origin_pairs(stage, cfg) == ((0, 0), (1, 1), (2, 2), (3, 3))
  stage = stage.__class__(cfg, 4, (4, 4), teacher_blocks=(0, 2, 3, 5))
  assert rungs.origin_pairs(stage, cfg) == ((0, 0), (1, 2), (2, 3), (3, 5))
  coarse = cfg.replace(downsample_start=0, downsample_end=2)
  assert rungs.origin_pairs(stage, coarse) == ((3, 5),)
  with pytest.raises(ValueError, match="feature_pairs='origin'"):
    trainer.feature_pairs('origin', cfg, cfg)


def test_teacher_cache_with_real_latents_serves_runs_without_them(tmp_path):
  """Rungs with and without the rectified-flow term share one cache; a cache
  without latents cannot serve a run that needs them."""
  from nanoflux_jax.configs import FluxConfig  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.distill import data as data_lib  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.models import flux  # pylint: disable=g-import-not-at-top
  cfg = FluxConfig.tiny()
  params = flux.init_params(cfg, jax.random.PRNGKey(0))
  prompts = ['a', 'b', 'c', 'd']
  lat = np.random.default_rng(0).standard_normal(
      (4, 8, cfg.in_channels)).astype(np.float32)
  make = lambda latents: data_lib.PromptData(
      prompts, data_lib.random_embedder(cfg, 4), cfg, (2, 4), 2,
      latents=latents)
  sched = (1.0, 0.5, 0.0)
  with_lat = data_lib.build_cache(str(tmp_path / 'a'), make(lat), cfg, params,
                                  sched, 2)
  without = data_lib.build_cache(str(tmp_path / 'a'), make(None), cfg, params,
                                 sched, 2)
  np.testing.assert_array_equal(without.batch(1)['latents'],
                                with_lat.batch(1)['latents'])
  data_lib.build_cache(str(tmp_path / 'b'), make(None), cfg, params, sched, 2)
  with pytest.raises(ValueError, match='latents differ'):
    data_lib.build_cache(str(tmp_path / 'b'), make(lat), cfg, params, sched, 2)

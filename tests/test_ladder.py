"""The compression ladder: CLI run + resume, mid-rung resume, config errors.

One uninterrupted 2-rung ladder (prune 50% -> distil, static modulation ->
distil) runs once per module from the command line; the resume test starts
from a copy of its first rung.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from nanoflux_jax import checkpoint
from nanoflux_jax.distill import ladder

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
  workdir, log, seconds = finished
  assert seconds < 180, seconds
  assert 'ladder complete' in log
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

  # A second run resumes: nothing is compressed or trained again, the report
  # keeps one row per rung, and it takes a fraction of the first run.
  log2, seconds2 = _cli(workdir)
  assert log2.count('already done; skipping') == 2, log2[-3000:]
  assert 'compressing' not in log2 and 'step 1 |' not in log2
  assert (workdir / 'report.md').read_text() == md
  assert seconds2 < seconds


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
     r"'downsample', 'export', 'prune', 'static_modulation', "
     r"'text_encoder'\]"),
    ([{'kind': 'prune', 'keep_head': 0.5}], r"unknown options \['keep_head'\]"),
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

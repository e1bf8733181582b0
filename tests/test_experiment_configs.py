"""Every experiments config loads and passes its binary's config check, and
the binaries refuse a bad config before touching devices or files."""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from nanoflux_jax.ladder import runner as ladder
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'experiments', 'configs')

# config file -> (the check its binary runs, the config args to load).
CHECKS = {
    'distill_tiny.py': (trainer.check_config, ('', 'runlocal')),
    'distill_schnell.py': (trainer.check_config, ('', 'runlocal')),
    'distill_text_encoder_tiny.py': (loop.check_loop_config,
                                     ('', 'runlocal', 'ablation')),
    'ladder_tiny.py': (ladder.check_config, ('', 'runlocal',
                                             'stop_after=2')),
    'ladder_schnell.py': (ladder.check_config, ('', 'runlocal')),
    'shapes.py': (ladder.check_config, ('quick', 'full', 'micro')),
}


def _load(name):
  spec = importlib.util.spec_from_file_location(
      name[:-3], os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_file_is_covered():
  files = sorted(os.path.basename(f)
                 for f in glob.glob(os.path.join(CONFIGS, '*.py')))
  assert files == sorted(CHECKS), 'add new configs to CHECKS'


@pytest.mark.parametrize('name,arg', [(n, a) for n, (_, args) in
                                      sorted(CHECKS.items()) for a in args])
def test_config_passes_its_check(name, arg, tmp_path):
  check, _ = CHECKS[name]
  c = _load(name).get_config(arg)
  if name == 'ladder_schnell.py':  # The user names the teacher pipeline.
    assert not (c.teacher.path or c.teacher.preset or c.teacher.pipeline)
    c.teacher.pipeline = str(tmp_path)
  check(c)
  if check is ladder.check_config:
    assert c.rungs, name
  if check is not ladder.check_config:
    # A broken field is refused by the same check.
    bad = _load(name).get_config(arg)
    bad.learning_rate = -1.0
    with pytest.raises(ValueError, match='learning_rate'):
      check(bad)


def _binary(script, *args):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', script), *args],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
  return out.returncode, out.stdout + out.stderr


def test_binaries_load_and_check_their_config(tmp_path):
  """distill.py and export_tflite.py load, parse the schnell config and
  refuse bad values by name before loading any model."""
  rc, out = _binary(
      'distill.py',
      f'--config={os.path.join(CONFIGS, "distill_schnell.py")}',
      f'--workdir={tmp_path / "d"}', '--config.learning_rate=-1')
  assert rc != 0 and 'learning_rate' in out, out[-2000:]
  assert 'Traceback' not in out, out[-2000:]
  assert not (tmp_path / 'd').exists()
  rc, out = _binary('export_tflite.py', f'--model={tmp_path / "none"}',
                    f'--out_dir={tmp_path / "e"}', '--quantize=int3')
  assert rc != 0 and "'int3'" in out, out[-2000:]
  assert 'no such pipeline folder' not in out, out[-2000:]  # Checked first.
  assert not (tmp_path / 'e').exists()


def test_parse_arg_is_the_one_config_arg_parser():
  from nanoflux_jax.config_arg import parse_arg  # pylint: disable=g-import-not-at-top
  a = parse_arg('full,train_only,stop_after=2', variants=('quick', 'full'),
                train_only=False, stop_after=None, lr=0.1)
  assert (a.variant, a.train_only, a.stop_after, a.lr) == ('full', True, 2,
                                                           0.1)
  assert parse_arg('', variants=('quick', 'full')).variant == 'quick'
  assert parse_arg('lr=0.5', lr=0.1).lr == 0.5
  for arg, match in (('nope', r"unknown option 'nope'; known: \['lr'\]"),
                     ('lr', 'lr needs a value'),
                     ('lr=fast', r"lr='fast': expected a float")):
    with pytest.raises(ValueError, match=match):
      parse_arg(arg, lr=0.1)
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    parse_arg('huge', variants=('quick', 'full'))
  with pytest.raises(ValueError, match="unknown option 'typo'"):
    _load('shapes.py').get_config('full,typo')


def test_configs_name_their_evaluators(tmp_path):
  """config.evaluate is a list of {type, every, ...}: the shapes variants
  name the 'shapes' evaluator; ladder_schnell names 'clip' when given a
  CLIP folder, and its check refuses a bad one by index and option."""
  from nanoflux_jax.ladder import evaluators  # pylint: disable=g-import-not-at-top
  shapes_cfg = _load('shapes.py')
  for arg, world, judge in (('quick', 'shapes', ''), ('full16', 'shapes9',
                                                     'geometry')):
    c = shapes_cfg.get_config(arg)
    [(ev, opts)] = evaluators.check_config(c)
    assert ev is evaluators.EVALUATORS['shapes'] and opts['every'] == 1
    assert (opts['world'], opts['classifier']) == (world, judge)
  assert 'min_control_slowdown' in shapes_cfg.get_config(
      'full').evaluate[0]['targets']
  schnell = _load('ladder_schnell.py')
  assert schnell.get_config('').evaluate == []
  c = schnell.get_config(f'clip_path={tmp_path},eval_every=2')
  assert [(e['type'], e['every'], e['clip_path']) for e in c.evaluate] == [
      ('clip', 2, str(tmp_path))]
  c.teacher.pipeline = str(tmp_path)
  with pytest.raises(FileNotFoundError,
                     match=r"config.evaluate\[0\] \('clip'\): clip_path"):
    ladder.check_config(c)

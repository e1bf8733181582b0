"""CLIP score / CLIP-FID of whole pipelines: every ladder rung (the 'clip'
evaluator of config.evaluate) on a tiny FLUX.1-schnell-shaped teacher
pipeline, and experiments/evaluate_pipeline.py, with a tiny random CLIP."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from nanoflux_jax import checkpoint
from nanoflux_jax.compress import student_t5 as te_student
from nanoflux_jax.ladder import clip_eval
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.ladder import runner as ladder
from nanoflux_jax.ladder import rungs as rungs_lib
from nanoflux_jax.evaluate import clip_fid
from nanoflux_jax.testing.tiny_clip import make_tiny_clip_model
from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline
from tests.refs import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """(tiny schnell-like FLUX pipeline folder, tiny CLIP folder, CLIP model)."""
  require('torch')
  require('diffusers')
  root = tmp_path_factory.mktemp('clip_eval')
  make_tiny_flux_pipeline(root / 'pipe')
  clip = make_tiny_clip_model(root / 'clip')
  return str(root / 'pipe'), str(root / 'clip'), clip


def _perturb(ctx, stage, student, opts):
  """A test rung's compression: the DiT's output layer scaled, so its images
  differ from the teacher's without a training run; sampled in 1 step."""
  del ctx
  cfg, params = student
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * opts['scale'] if 'final_linear' in jax.tree_util.keystr(
          p) else x, params)
  return (cfg, params), dataclasses.replace(stage, num_steps=1)


def _save_student(ctx, stage, student, opts):
  """A test rung's run: the compressed DiT saved as it is (no training)."""
  del opts
  checkpoint.save(stage.dit, *student)
  return rungs_lib.RungResult(True, {}, stage, student)


def _random_t5(ctx, stage, student, opts):
  """A test rung's run: a random 1-layer student T5 (no training), saved as
  a text_encoder rung saves its student; the DiT is kept."""
  del opts
  pipe = ctx.pipeline
  cfg = te_student.student_t5_config(pipe.t5_cfg, num_layers=1)
  out_dim = pipe.flux_cfg.context_in_dim
  path = os.path.join(ctx.rung_dir, 'student_t5')
  te_student.save_student(path, cfg, out_dim, te_student.init_student(
      cfg, out_dim, jax.random.PRNGKey(0)))
  del student
  return rungs_lib.RungResult(True, {}, dataclasses.replace(
      stage, text_encoder=path))


def _config(pipe, clip):
  spec = importlib.util.spec_from_file_location(
      'ladder_tiny', os.path.join(ROOT, 'experiments/configs/ladder_tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.teacher = {'path': '', 'preset': '', 'pipeline': pipe, 'seed': 0,
               'overrides': {}}
  c.samples.num, c.timing.repeats = 1, 1
  c.rungs = [{'kind': 'clip_test_perturb', 'scale': 0.5},
             {'kind': 'clip_test_t5'}]
  # 6 prompts in batches of 8 (one image per data shard of the 8 devices).
  c.evaluate = [dict(type='clip', every=1, clip_path=clip, prompts='builtin',
                     num=6)]
  return c


def test_ladder_reports_clip_score_and_fid_for_every_rung(
    folders, tmp_path, monkeypatch):
  pipe, clip, _ = folders
  monkeypatch.setitem(rungs_lib.RUNG_KINDS, 'clip_test_perturb',
                      rungs_lib.RungKind('clip_test_perturb', _perturb,
                                         {'scale': 1.0}, _save_student))
  monkeypatch.setitem(rungs_lib.RUNG_KINDS, 'clip_test_t5', rungs_lib.RungKind(
      'clip_test_t5', rungs_lib.unchanged, {}, _random_t5,
      role='text_encoder'))
  c, workdir = _config(pipe, clip), str(tmp_path / 'wd')
  report = ladder.run_ladder(c, workdir)
  names = ['teacher', 'rung_0_clip_test_perturb', 'rung_1_clip_test_t5']
  assert [r['name'] for r in [report['teacher']] + report['rungs']] == names
  clip = report['evaluation']['clip']
  assert list(clip['rows']) == names
  rows = [clip['rows'][n] for n in names]
  for r in rows:
    assert 0 <= r['clip_score'] <= 100 and r['clip_score_se'] > 0, r
    assert r['clip_n'] == 6 and np.isfinite(r['clip_fid'])
    assert os.path.isfile(os.path.join(workdir, r['clip_grid']))
  # Each stage samples with its own steps: the perturbed rung (and the T5
  # rung after it) in 1 step, the teacher in ladder_tiny's 2.
  assert [r['num_steps'] for r in rows] == [2, 1, 1]
  # The teacher against its own images; the students moved away from them.
  assert rows[0]['clip_fid'] == pytest.approx(0.0, abs=1e-6)
  assert rows[1]['clip_fid'] > 1e-4
  # Rung 1 keeps rung 0's DiT: its images (and score) change only because
  # the prompts went through its (random) student T5; with the teacher's
  # T5 the deterministic run would repeat rung 0's numbers exactly.
  assert abs(rows[2]['clip_score'] - rows[1]['clip_score']) > 1e-3
  assert report['rungs'][1]['sample_mse'] == report['rungs'][0]['sample_mse']
  assert rows[1]['clip_score'] != rows[0]['clip_score']
  on_disk = json.loads(open(os.path.join(workdir, 'report.json')).read())
  assert on_disk['evaluation']['clip']['rows'] == clip['rows']
  assert on_disk['evaluation']['clip']['setup']['num_prompts'] == 6
  md = open(os.path.join(workdir, 'report.md')).read()
  section = md.split('## CLIP score')[1]
  assert ('| rung | kind | steps | CLIP score | change | CLIP-FID | grid |'
          in section)
  assert section.count('| rung_') == 2 and '| teacher | - | 2 |' in section

  # A rerun reads every stage's cached result back (no CLIP is loaded).
  clip_eval._scorer.cache_clear()  # pylint: disable=protected-access
  again = ladder.run_ladder(c, workdir)
  # pylint: disable-next=protected-access
  assert clip_eval._scorer.cache_info().misses == 0
  assert again['evaluation']['clip'] == clip


def test_clip_eval_config_is_checked_up_front(folders, tmp_path):
  pipe, clip, _ = folders
  (tmp_path / 'one.txt').write_text('only one prompt\n')
  for field, value, match in (
      ('clip_path', str(tmp_path), r'config.evaluate\[0\].*not a CLIPModel'),
      ('num', -1, r'config.evaluate\[0\].*num=-1'),
      ('prompts', str(tmp_path / 'one.txt'), 'at least 2'),
      ('bogus', 1, r"config.evaluate\[0\].*unknown keys \['bogus'\]")):
    bad = _config(pipe, clip)
    bad.rungs = [{'kind': 'finetune'}]
    bad.evaluate[0][field] = value
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      ladder.check_config(bad)
  bare = _config(pipe, clip)
  bare.teacher = {'path': '', 'preset': 'tiny', 'seed': 0, 'overrides': {}}
  with pytest.raises(ValueError, match='needs a teacher pipeline'):
    ladder.check_config(bare)
  assert os.listdir(tmp_path) == ['one.txt']  # Nothing written.


def test_evaluate_pipeline_binary(folders, tmp_path):
  """The JSON line's score is what torch's CLIP gives the saved PNGs."""
  torch = require('torch')
  transformers = require('transformers')
  pipe, clip, model = folders
  out_dir, ref_dir = tmp_path / 'png', tmp_path / 'reference'
  ref_dir.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):  # Reference images of another size, for CLIP-FID.
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(
        ref_dir / f'r{i}.png')
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments/evaluate_pipeline.py'),
       f'--pipeline={pipe}', f'--clip={clip}', '--prompts=builtin', '--num=3',
       '--batch_size=2', '--height=16', '--width=16', '--steps=1',
       f'--out_dir={out_dir}', f'--reference={ref_dir}'],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result['n'] == 3 and result['resolution'] == [16, 16]
  assert result['kind'] == 'jax'
  assert '| 2 |' in run.stdout  # One table row per prompt.
  files = sorted(os.listdir(out_dir))
  assert files == ['00000.png', '00001.png', '00002.png']
  imgs = [np.asarray(Image.open(out_dir / f)) for f in files]
  assert imgs[0].shape == (16, 16, 3)
  # Re-scored by transformers from the PNGs alone.
  prompts = data_lib.load_prompts('builtin')[:3]
  proc = transformers.CLIPImageProcessor.from_pretrained(clip)
  tok = transformers.AutoTokenizer.from_pretrained(clip)
  refs = [np.asarray(Image.open(ref_dir / f'r{i}.png')) for i in range(3)]

  def embed(images):
    with torch.no_grad():
      e = model.get_image_features(pixel_values=proc(
          images=images, return_tensors='pt')['pixel_values']).pooler_output
    return torch.nn.functional.normalize(e, dim=-1)

  a = embed(imgs)
  with torch.no_grad():
    b = model.get_text_features(**tok(prompts, padding=True,
                                      return_tensors='pt')).pooler_output
  ref = 100 * torch.nn.functional.cosine_similarity(a, b).clamp(min=0)
  assert result['clip_score'] == pytest.approx(float(ref.mean()), abs=1e-4)
  assert result['clip_fid'] == pytest.approx(
      clip_fid.clip_fid(a.double().numpy(), embed(refs).double().numpy()),
      abs=1e-4)
  assert result['clip_fid'] > 0.01


def test_evaluate_pipeline_refuses_bad_flags_before_loading(tmp_path):
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments/evaluate_pipeline.py'),
       f'--pipeline={tmp_path}', f'--clip={tmp_path / "no_clip"}',
       '--prompts=builtin'],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
  out = run.stdout + run.stderr
  assert run.returncode != 0 and '--clip=' in out and 'no_clip' in out, out
  assert 'Traceback' not in out, out[-2000:]

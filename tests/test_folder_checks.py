"""Folders checked as a whole at load; non-finite input refused (issue 25).

One table row per case, as tests/test_bad_input.py: a row builds its case in
tmp_path (a copy of the tiny FLUX folder, of a saved nanoflux folder, or of
the committed int8 bundle, edited) and returns (call, exception type,
message fragment, paths the user owns). The test checks the type and the
fragment, and that every owned file is unchanged and nothing was added.
"""
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax import call_args
from nanoflux_jax import checkpoint
from nanoflux_jax import pipeline_checks
from nanoflux_jax.configs import ClipConfig, FluxConfig, T5Config, VAEConfig
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.convert.safetensors_io import save_file
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.export import runner
from nanoflux_jax.models import flux
from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline

from refusal import assert_refused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The committed :full student's int8 bundle (static modulation, 64 px,
# 8 steps, 24 T5 tokens): a real manifest to break, a real runner to call.
BUNDLE = os.path.join(ROOT, 'docs', 'shapes_full', 'tflite', 'int8')


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """{'diffusers': the tiny FLUX folder, 'saved': it saved by FluxPipeline,
  'pipe': the loaded pipeline}."""
  root = tmp_path_factory.mktemp('folders')
  make_tiny_flux_pipeline(root / 'diffusers')
  pipe = nf.FluxPipeline.from_pretrained(str(root / 'diffusers'))
  pipe.save(str(root / 'saved'))
  return {'diffusers': str(root / 'diffusers'), 'saved': str(root / 'saved'),
          'pipe': pipe}


@pytest.fixture(scope='module')
def bundle():
  return runner.TFLitePipeline(BUNDLE)


# ------------------------------------------------------------------ helpers --
def _copy(src, tmp_path, name='folder'):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _edit_json(path, edit):
  with open(path) as f:
    d = json.load(f)
  edit(d)
  with open(path, 'w') as f:
    json.dump(d, f)


def _swap(folder, a, b):
  tmp = os.path.join(folder, '_swap')
  os.rename(os.path.join(folder, a), tmp)
  os.rename(os.path.join(folder, b), os.path.join(folder, a))
  os.rename(tmp, os.path.join(folder, b))


def _replace_component(folder, name, cfg):
  """Puts a component of another width in place: its config and params of
  the shapes that config implies (zeros: only the shapes matter here)."""
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        pipeline_checks.expected_shapes(cfg))
  shutil.rmtree(os.path.join(folder, name))
  checkpoint.save(os.path.join(folder, name), cfg, params)


# ------------------------------------------------------- pipeline folders --
def _swapped_tokenizers(tmp_path, f):
  d = _copy(f['diffusers'], tmp_path)
  _swap(d, 'tokenizer', 'tokenizer_2')
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          f'{d}: the pipeline\'s parts disagree:\n  tokenizer_2/ yields ids '
          'up to 713, but text_encoder_2/ (T5) has an embedding table of 300 '
          'rows\n  tokenizer/ and tokenizer_2/ look swapped', [d])


def _swapped_tokenizers_saved(tmp_path, f):  # Variant: a nanoflux folder.
  d = _copy(f['saved'], tmp_path)
  _swap(d, 'tokenizer', 'tokenizer_2')
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          'tokenizer/ and tokenizer_2/ look swapped', [d])


def _t5_width(tmp_path, f):
  d = _copy(f['saved'], tmp_path)
  cfg = T5Config.tiny(vocab_size=300, d_model=48)
  _replace_component(d, 'text_encoder_2', cfg)
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          'text_encoder_2/ (T5) gives 48-wide embeddings, but transformer/ '
          'reads context_in_dim=32', [d])


def _t5_width_diffusers(tmp_path, f):  # Variant: an HF config.json.
  d = _copy(f['diffusers'], tmp_path)
  _edit_json(os.path.join(d, 'text_encoder_2', 'config.json'),
             lambda c: c.update(d_model=40))
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          'gives 40-wide embeddings, but transformer/ reads context_in_dim=32',
          [d])


def _clip_width(tmp_path, f):
  d = _copy(f['saved'], tmp_path)
  cfg = ClipConfig.tiny(vocab_size=714, hidden_size=48, num_heads=4)
  _replace_component(d, 'text_encoder', cfg)
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          'text_encoder/ (CLIP) pools to 48 values, but transformer/ reads '
          'vec_in_dim=32', [d])


def _vae_channels(tmp_path, f):
  d = _copy(f['diffusers'], tmp_path)
  _edit_json(os.path.join(d, 'vae', 'config.json'),
             lambda c: c.update(latent_channels=8))
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          'vae/ has 8 latent channels (packed 2x2: 32), but transformer/ has '
          'in_channels=64', [d])


def _vae_channels_saved(tmp_path, f):  # Variant: a patch codec.
  d = _copy(f['saved'], tmp_path)
  shutil.rmtree(os.path.join(d, 'vae'))
  checkpoint.save(os.path.join(d, 'vae'), VAEConfig.pixel(2), {})
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          'vae/ has 12 latent channels (packed 2x2: 48), but transformer/ has '
          'in_channels=64', [d])


def _config_vs_params(tmp_path, f):
  d = _copy(f['saved'], tmp_path)
  _edit_json(os.path.join(d, 'transformer', checkpoint.CONFIG_FILE),
             lambda c: c['config'].update(mlp_ratio=2.0, double_mlp_img=None,
                                          double_mlp_txt=None,
                                          single_mlp=None))
  where = os.path.join(d, 'transformer')
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          f'{where}: nanoflux_config.json (FluxConfig) does not match the '
          'stored params', [d])


def _config_vs_params_t5(tmp_path, f):  # Variant: the T5's d_ff.
  d = _copy(f['saved'], tmp_path)
  _edit_json(os.path.join(d, 'text_encoder_2', checkpoint.CONFIG_FILE),
             lambda c: c['config'].update(d_ff=32))
  return (lambda: nf.FluxPipeline.from_pretrained(d), CheckpointError,
          'wi_0/kernel: config gives [32, 32], stored [32, 64]', [d])


# -------------------------------------------------------- bundle manifests --
def _manifest_row(tmp_path, edit, fragment):
  d = _copy(BUNDLE, tmp_path)
  _edit_json(os.path.join(d, 'manifest.json'), edit)
  return (lambda: runner.TFLitePipeline(d), runner.ManifestError,
          f'{os.path.join(d, "manifest.json")}: {fragment}', [d])


def _schedule_reversed(tmp_path, f):
  def edit(m):
    m['schedule']['timesteps'] = m['schedule']['timesteps'][::-1]
  return _manifest_row(tmp_path, edit, 'schedule.timesteps must decrease '
                       '(noise at 1 to image at 0), but [0]=0.0 is followed '
                       'by [1]=0.125')


def _schedule_one_entry(tmp_path, f):
  return _manifest_row(tmp_path, lambda m: m['schedule'].update(
      timesteps=[1.0]), 'schedule.timesteps=[1.0] has 1 entries')


def _schedule_empty(tmp_path, f):
  return _manifest_row(tmp_path, lambda m: m['schedule'].update(
      timesteps=[]), 'schedule.timesteps=[] has 0 entries')


def _schedule_nan(tmp_path, f):
  def edit(m):
    m['schedule']['timesteps'][4] = float('nan')
  return _manifest_row(tmp_path, edit, 'schedule.timesteps[4]=nan must be a '
                       'finite number in [0, 1]')


def _schedule_too_short(tmp_path, f):  # Variant: num_steps disagrees.
  def edit(m):
    m['schedule']['timesteps'] = m['schedule']['timesteps'][::2]
  return _manifest_row(tmp_path, edit, 'schedule.timesteps has 5 entries, '
                       'but schedule.num_steps=8 needs 9')


def _step_index_negative(tmp_path, f):
  def edit(m):
    m['schedule']['step_indices'][2] = -5
  return _manifest_row(tmp_path, edit, 'schedule.step_indices[2]=-5 must be '
                       'an integer in [0, 7]')


def _step_index_past_table(tmp_path, f):  # Variant.
  def edit(m):
    m['schedule']['step_indices'][7] = 8
  return _manifest_row(tmp_path, edit, 'schedule.step_indices[7]=8')


def _schedule_string(tmp_path, f):
  def edit(m):
    m['schedule']['timesteps'][3] = 'f'
  return _manifest_row(tmp_path, edit, "schedule.timesteps[3]='f' must be a "
                       'finite number')


def _height_string(tmp_path, f):  # Variant: a scalar.
  return _manifest_row(tmp_path, lambda m: m.update(height='64'),
                       "height='64' must be an integer >= 1")


# ------------------------------------------------------ non-finite inputs --
def _latents_nan(tmp_path, f):
  pipe = f['pipe']
  x = np.zeros((1, 16, 64), np.float32)
  x[0, 3, 5] = np.nan
  return (lambda: pipe(['a'], height=16, width=16, latents=x), ValueError,
          'FluxPipeline: latents holds 1 non-finite value(s) (first: nan at '
          'index (0, 3, 5))', [])


def _latents_inf_jax(tmp_path, f):  # Variant: inf, a jax array.
  pipe = f['pipe']
  x = jax.numpy.zeros((1, 16, 64)).at[0, 0, 0].set(-jax.numpy.inf)
  return (lambda: pipe(['a'], height=16, width=16, latents=x), ValueError,
          'latents holds 1 non-finite value(s) (first: -inf', [])


def _guidance_nan(tmp_path, f):
  return (lambda: f['pipe'](['a'], height=16, width=16,
                            guidance=float('nan')),
          ValueError, 'FluxPipeline: guidance=nan must be a finite number', [])


def _tflite_latents_nan(tmp_path, f):
  pipe = runner.TFLitePipeline(BUNDLE)
  x = np.zeros((1,) + tuple(pipe.packed_shape[1:]), np.float32)
  x[0, 1, 2] = np.nan
  return (lambda: pipe(['a red circle'], latents=x), ValueError,
          'TFLitePipeline: latents holds 1 non-finite value(s) (first: nan '
          'at index (0, 1, 2))', [BUNDLE])


def _tflite_latents_inf(tmp_path, f):  # Variant.
  pipe = runner.TFLitePipeline(BUNDLE)
  x = np.full((1,) + tuple(pipe.packed_shape[1:]), np.inf, np.float32)
  return (lambda: pipe(['a red circle'], latents=x), ValueError,
          'latents holds 3072 non-finite value(s)', [BUNDLE])


def _tflite_guidance_nan(tmp_path, f):
  pipe = runner.TFLitePipeline(BUNDLE)
  return (lambda: pipe(['a red circle'], guidance=float('nan')), ValueError,
          'TFLitePipeline: guidance=nan must be a finite number', [BUNDLE])


# ---------------------------------------------------------------- binaries --
def _convert_nonfinite(tmp_path, f):
  cfg = FluxConfig.tiny(depth=1, depth_single_blocks=1)
  sd = convert_flux.to_bfl_state_dict(
      cfg, flux.init_params(cfg, jax.random.key(0)))
  sd['txt_in.weight'] = sd['txt_in.weight'].copy()
  sd['txt_in.weight'][1, 2] = np.inf
  src = str(tmp_path / 'flux.safetensors')
  save_file(sd, src, {convert_flux.CONFIG_METADATA_KEY: cfg.to_json()})
  out = str(tmp_path / 'out')

  def call():
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'experiments', 'convert_flux.py'),
         f'--src={src}', f'--out={out}', '--dtype=float32'],
        capture_output=True, text=True, check=False,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert r.returncode != 0, r.stdout
    assert 'Traceback' not in r.stderr, r.stderr
    assert not os.path.exists(out)  # Nothing written.
    raise CheckpointError(r.stderr[-2000:])
  return (call, CheckpointError, "txt_in/kernel <- ['txt_in.weight']",
          [src])


CASES = {
    # A pipeline folder whose parts disagree.
    'swapped_tokenizers': _swapped_tokenizers,
    'swapped_tokenizers_saved': _swapped_tokenizers_saved,
    't5_width': _t5_width,
    't5_width_diffusers': _t5_width_diffusers,
    'clip_width': _clip_width,
    'vae_channels': _vae_channels,
    'vae_channels_saved': _vae_channels_saved,
    'config_vs_params': _config_vs_params,
    'config_vs_params_t5': _config_vs_params_t5,
    # A bundle's manifest.
    'schedule_reversed': _schedule_reversed,
    'schedule_one_entry': _schedule_one_entry,
    'schedule_empty': _schedule_empty,
    'schedule_nan': _schedule_nan,
    'schedule_too_short': _schedule_too_short,
    'step_index_negative': _step_index_negative,
    'step_index_past_table': _step_index_past_table,
    'schedule_string': _schedule_string,
    'height_string': _height_string,
    # Non-finite input.
    'latents_nan': _latents_nan,
    'latents_inf_jax': _latents_inf_jax,
    'guidance_nan': _guidance_nan,
    'tflite_latents_nan': _tflite_latents_nan,
    'tflite_latents_inf': _tflite_latents_inf,
    'tflite_guidance_nan': _tflite_guidance_nan,
    'convert_nonfinite': _convert_nonfinite,
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_folder_or_input(case, tmp_path, folders):
  assert_refused(*CASES[case](tmp_path, folders), folder=tmp_path)


# ------------------------------------------------- behaviour beyond errors --
def test_intact_folders_and_bundle_load(folders, tmp_path, monkeypatch):
  """The checks pass what is right: both folder kinds, a pipeline with a
  student T5 (its out_dim, not its d_model, meets context_in_dim), the
  unedited bundle, and a folder named by a relative path."""
  for name in ('diffusers', 'saved'):
    nf.FluxPipeline.from_pretrained(folders[name])
  runner.TFLitePipeline(BUNDLE)
  student = os.path.join(ROOT, 'docs', 'shapes_full', 'pipeline')
  nf.FluxPipeline.from_pretrained(student)
  monkeypatch.chdir(os.path.dirname(folders['saved']))
  nf.FluxPipeline.from_pretrained(os.path.basename(folders['saved']))


def test_tflite_truncation_warns_as_flux_pipeline(bundle, caplog):
  """One helper (call_args.token_ids) warns for both pipelines: the same
  message for the same prompt and length."""
  import transformers  # pylint: disable=g-import-not-at-top
  prompt = ' '.join(['a small red star on the left'] * 5)
  shell = nf.FluxPipeline(
      (FluxConfig.tiny(), None), (ClipConfig.tiny(), None),
      (T5Config.tiny(), None), (VAEConfig.tiny(), None),
      transformers.AutoTokenizer.from_pretrained(
          os.path.join(ROOT, 'docs', 'shapes_full', 'pipeline', 'tokenizer')),
      bundle.tokenizer_2)
  records = []
  with caplog.at_level(logging.WARNING):
    caplog.clear()
    ids = bundle.tokenize(prompt)[0]
    records.append([r.getMessage() for r in caplog.records])
    caplog.clear()
    want = shell.tokenize([prompt], bundle.max_sequence_length)[0]
    records.append([r.getMessage() for r in caplog.records if 'T5' in
                    r.getMessage()])
  np.testing.assert_array_equal(ids, want)
  assert len(records[0]) == 1 and records[0] == records[1], records
  assert records[0][0].startswith('T5: prompt truncated to 24 tokens (it has ')
  assert call_args.token_ids(bundle.tokenizer_2, ['a red star'], 24,
                             'T5').shape == (1, 24)

"""Bad input: a clear error from our code, no user file touched, no debris.

One table row per kind of bad input (issue 13), each with a new variant next
to the original reproduction. A row builds its case in tmp_path and returns
(call, exception type, message fragment, paths the user owns); the test
checks the type and fragment, and that every owned file is unchanged.
"""
import json
import os
import signal
import struct
import sys
import tempfile

import jax
import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax import atomic
from nanoflux_jax import checkpoint
from nanoflux_jax import images
from nanoflux_jax import parallel
from nanoflux_jax.configs import ClipConfig, FluxConfig, T5Config, VAEConfig
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.convert import text_encoders
from nanoflux_jax.convert.safetensors_io import CheckpointError, save_file
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import teacher as teacher_lib
from nanoflux_jax.distill import trainer
from nanoflux_jax.export import bundle
from nanoflux_jax.export import runner
from nanoflux_jax.export import tflite
from nanoflux_jax.models import flux

from refusal import assert_refused

jax.config.update('jax_compilation_cache_dir', os.path.join(
    tempfile.gettempdir(), 'nanoflux_jax_test_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

CFG = FluxConfig.tiny()
TINY = {'depth': 1, 'depth_single_blocks': 1, 'attention_impl': 'xla'}


@pytest.fixture(scope='module')
def params():
  return flux.init_params(CFG, jax.random.key(0))


# ------------------------------------------------------------------ helpers --
def _bfl(tmp_path, params, edit=None, name='flux.safetensors', cfg=CFG):
  sd = convert_flux.to_bfl_state_dict(cfg, params)
  if edit:
    edit(sd)
  path = str(tmp_path / name)
  save_file(sd, path, {convert_flux.CONFIG_METADATA_KEY: cfg.to_json()})
  return path


def _raw_safetensors(path, header, data=b''):
  blob = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob + data)
  return str(path)


def _user_folder(tmp_path, name='d'):
  d = tmp_path / name
  d.mkdir()
  (d / 'notes.txt').write_text('my notes')
  return str(d)


class _Pipe(nf.FluxPipeline):
  """A FluxPipeline whose arguments are checked before any model runs: no
  params are needed for the validation rows."""

  def __init__(self):
    super().__init__((CFG, None), (ClipConfig.tiny(), None),
                     (T5Config.tiny(), None), (VAEConfig.tiny(), None), None,
                     None)

  def encode_prompt(self, *a, **k):
    raise AssertionError('validation should have failed before encoding')


def _train_config(**kw):
  c = trainer.default_config()
  c.teacher.overrides = dict(TINY)
  c.student.overrides = dict(TINY)
  c.compute_dtype = 'float32'
  c.num_steps, c.batch_size, c.num_sampling_steps = 6, 4, 2
  c.log_every, c.checkpoint_every = 1, 100
  c.data.grid, c.data.txt_len = (2, 2), 4
  c.async_checkpoint = False
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _mesh():
  return parallel.create_mesh((1, 1, 1), jax.devices()[:1])


# ---------------------------------------------------------- loaded silently --
def _int8_tensor(tmp_path, params):
  def edit(sd):
    sd['double_blocks.0.img_mlp.2.weight'] = (
        sd['double_blocks.0.img_mlp.2.weight'] * 10).astype(np.int8)
  path = _bfl(tmp_path, params, edit)
  return (lambda: convert_flux.load_flux_transformer(path), CheckpointError,
          'double_blocks.0.img_mlp.2.weight (int8)', [path])


def _bool_tensor(tmp_path, params):  # Variant: bool, in a bias.
  def edit(sd):
    sd['txt_in.bias'] = sd['txt_in.bias'] > 0
  path = _bfl(tmp_path, params, edit)
  return (lambda: convert_flux.load_flux_transformer(path), CheckpointError,
          'txt_in.bias (bool)', [path])


def _missing_trailing_blocks(tmp_path, params):
  def edit(sd):
    for k in [k for k in sd if k.startswith('double_blocks.1.')]:
      del sd[k]
  path = _bfl(tmp_path, params, edit)
  return (lambda: convert_flux.load_flux_transformer(path), CheckpointError,
          'depth: stored 2, tensors give 1', [path])


def _missing_single_blocks(tmp_path, params):  # Variant: the single stack.
  def edit(sd):
    for k in [k for k in sd if k.startswith('single_blocks.1.')]:
      del sd[k]
  path = _bfl(tmp_path, params, edit)
  return (lambda: convert_flux.load_flux_transformer(path), CheckpointError,
          'depth_single_blocks: stored 2, tensors give 1', [path])


def _diffusers_config_disagrees(tmp_path, params):
  sys.path.insert(0, os.path.dirname(__file__))
  import flux_utils  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path / 'transformer')
  flux_utils.make_diffusers_flux(layers=2, single_layers=1).save_pretrained(
      folder, safe_serialization=True)
  cfg_file = os.path.join(folder, 'config.json')
  with open(cfg_file) as f:
    c = json.load(f)
  c['num_layers'] = 3
  with open(cfg_file, 'w') as f:
    json.dump(c, f)
  return (lambda: convert_flux.load_flux_transformer(folder), CheckpointError,
          'config.json: the stored config does not match', [folder])


def _overlapping_offsets(tmp_path, params):
  path = _raw_safetensors(tmp_path / 'o.safetensors', {
      'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
      'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}},
                          b'\0' * 12)
  return (lambda: nf.convert.open_tensors(path), CheckpointError,
          "'a' and 'b' overlap", [path])


def _same_offsets(tmp_path, params):  # Variant: two tensors, same bytes.
  path = _raw_safetensors(tmp_path / 's.safetensors', {
      'x': {'dtype': 'F16', 'shape': [4], 'data_offsets': [0, 8]},
      'y': {'dtype': 'F16', 'shape': [2, 2], 'data_offsets': [0, 8]}},
                          b'\0' * 8)
  return (lambda: nf.convert.open_tensors(path), CheckpointError,
          'overlap', [path])


def _nonfinite_strict(tmp_path, params):
  def edit(sd):
    sd['img_in.weight'] = sd['img_in.weight'].copy()
    sd['img_in.weight'][0, 0] = np.nan
  path = _bfl(tmp_path, params, edit)
  return (lambda: convert_flux.load_flux_transformer(path, nonfinite='error'),
          CheckpointError, "img_in/kernel <- ['img_in.weight']", [path])


def _nonfinite_bad_option(tmp_path, params):
  path = _bfl(tmp_path, params)
  return (lambda: convert_flux.load_flux_transformer(path, nonfinite='no'),
          ValueError, 'nonfinite=', [path])


def _params_folder_gone(tmp_path, params):
  ck = str(tmp_path / 'ck')
  checkpoint.save(ck, CFG, params)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(ck, 'params'))
  return (lambda: checkpoint.load(ck), CheckpointError,
          os.path.join(ck, 'params') + ': missing', [ck])


def _pipeline_component_params_gone(tmp_path, params):  # Variant.
  ck = str(tmp_path / 'vae')
  checkpoint.save(ck, VAEConfig.tiny(), {'w': np.zeros(2, np.float32)})
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(ck, 'params'))
  return (lambda: checkpoint.load(ck), CheckpointError, 'VAEConfig but no '
          'params', [ck])


def _negative_num_steps(tmp_path, params):
  c = _train_config(num_steps=-5)
  return (lambda: trainer.train(c, str(tmp_path / 'wd')), ValueError,
          'config.num_steps=-5', [])


def _negative_hidden_size_stored(tmp_path, params):
  ck = str(tmp_path / 'ck')
  checkpoint.save(ck, CFG, params)
  file = os.path.join(ck, checkpoint.CONFIG_FILE)
  with open(file) as f:
    d = json.load(f)
  d['config']['hidden_size'] = -5
  with open(file, 'w') as f:
    json.dump(d, f)
  return (lambda: checkpoint.load(ck), CheckpointError, 'hidden_size=-5',
          [ck])


def _zero_heads_t5_config(tmp_path, params):  # Variant: an HF config.json.
  folder = tmp_path / 't5'
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps(
      {'feed_forward_proj': 'gated-gelu', 'num_heads': 0}))
  return (lambda: text_encoders.t5_config_from_hf(str(folder)),
          CheckpointError, 'num_heads=0', [str(folder)])


# ------------------------------------------------------- user data deleted --
def _save_over_user_folder(tmp_path, params):
  d = _user_folder(tmp_path)
  return (lambda: checkpoint.save(d, CFG, params), atomic.OverwriteError,
          f'{d}: exists and is not a nanoflux checkpoint', [d])


def _pipeline_save_over_checkpoint(tmp_path, params):  # Variant: wrong kind.
  d = str(tmp_path / 'ck')
  checkpoint.save(d, CFG, params)
  return (lambda: _Pipe().save(d), atomic.OverwriteError,
          'not a saved FluxPipeline', [d])


def _export_over_user_folder(tmp_path, params):
  d = _user_folder(tmp_path)
  return (lambda: bundle.export_pipeline(_Pipe(), d, 32, 32),
          atomic.OverwriteError, f'{d}: exists and is not a TFLite export',
          [d])


def _save_over_user_file(tmp_path, params):  # Variant: a file, not a folder.
  f = tmp_path / 'model'
  f.write_text('not a checkpoint')
  return (lambda: checkpoint.save(str(f), CFG, params), atomic.OverwriteError,
          'is a file', [str(f)])


def _train_student_over_user_folder(tmp_path, params):  # Variant.
  wd = tmp_path / 'wd'
  wd.mkdir()
  d = _user_folder(wd, 'student')
  c = _train_config()
  return (lambda: trainer.train(c, str(wd)), atomic.OverwriteError,
          f'{d}: exists and is not a nanoflux checkpoint', [d])


def _convert_binary_out(tmp_path, params):
  src = _bfl(tmp_path, params)
  d = _user_folder(tmp_path)

  def call():
    import subprocess  # pylint: disable=g-import-not-at-top
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, 'experiments', 'convert_flux.py'),
         f'--src={src}', f'--out={d}'], capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)
    assert out.returncode != 0
    raise atomic.OverwriteError(out.stderr[-2000:])
  return call, atomic.OverwriteError, 'exists and is not a nanoflux', [d, src]


# ------------------------------------------- accidental errors, now checked --
def _batch_size_zero(tmp_path, params):
  c = _train_config(batch_size=0)
  return (lambda: trainer.train(c, str(tmp_path / 'wd')), ValueError,
          'config.batch_size=0', [])


def _grad_accum_not_dividing(tmp_path, params):  # Variant.
  c = _train_config(batch_size=4, grad_accum=3)
  return (lambda: trainer.train(c, str(tmp_path / 'wd')), ValueError,
          'config.grad_accum=3', [])


def _float_height(tmp_path, params):
  return (lambda: _Pipe()(['a'], height=8.0), ValueError, 'height=8.0', [])


def _huge_seed(tmp_path, params):
  return (lambda: _Pipe()(['a'], height=32, width=32, seed=2**70),
          ValueError, 'seed=1180591620717411303424', [])


def _fractional_steps(tmp_path, params):
  return (lambda: _Pipe()(['a'], height=32, width=32, num_steps=2.5),
          ValueError, 'num_steps=2.5', [])


def _none_steps(tmp_path, params):  # Variant (None: the call default).
  return (lambda: _Pipe()(['a'], height=32, width=32, num_steps='4'),
          ValueError, "num_steps='4'", [])


def _none_prompt(tmp_path, params):
  return (lambda: _Pipe()(['a', None], height=32, width=32), ValueError,
          'prompts[1]=None', [])


def _header_is_list(tmp_path, params):
  path = _raw_safetensors(tmp_path / 'l.safetensors', [1, 2])
  return (lambda: convert_flux.load_flux_transformer(path), CheckpointError,
          'a JSON list, expected an object', [path])


def _index_is_list(tmp_path, params):  # Variant: the shard index.
  folder = tmp_path / 'sharded'
  folder.mkdir()
  (folder / 'model.safetensors.index.json').write_text('[]')
  return (lambda: nf.convert.open_tensors(str(folder)), CheckpointError,
          'model.safetensors.index.json: corrupt index', [str(folder)])


def _negative_dims(tmp_path, params):
  path = _raw_safetensors(tmp_path / 'n.safetensors', {
      'img_in.weight': {'dtype': 'F32', 'shape': [-1, -4],
                        'data_offsets': [0, 16]}}, b'\0' * 16)
  return (lambda: convert_flux.load_flux_transformer(path), CheckpointError,
          "'img_in.weight': shape [-1, -4]", [path])


def _unknown_preset(tmp_path, params):
  c = _train_config()
  c.student.preset = 'huge'
  return (lambda: trainer.train(c, str(tmp_path / 'wd')), ValueError,
          "config.student.preset='huge'", [])


def _no_config(tmp_path, params):  # The library side of distill.py.
  return (lambda: trainer.train(None, str(tmp_path / 'wd')), ValueError,
          '--config', [])


def _unknown_override(tmp_path, params):
  c = _train_config()
  c.student.overrides = {'no_such_field': 1}
  return (lambda: trainer.train(c, str(tmp_path / 'wd')), ValueError,
          'config.student.overrides', [])


# ------------------------------------------- errors that name the file now --
def _corrupt_manifest(tmp_path, params):
  d = tmp_path / 'export'
  d.mkdir()
  (d / 'manifest.json').write_text('{"height": 6')
  return (lambda: runner.TFLitePipeline(str(d)), runner.ManifestError,
          f'{d / "manifest.json"}: corrupt manifest', [str(d)])


def _bad_tflite(tmp_path, params):
  d = tmp_path / 'export'
  d.mkdir()
  (d / 'm.tflite').write_bytes(b'not a flatbuffer at all')
  entry = {'file': 'm.tflite', 'inputs': {}, 'outputs': {}}
  return (lambda: runner.TFLiteModel(str(d), entry), runner.ManifestError,
          'm.tflite: not a valid .tflite file', [str(d)])


def _bad_tflite_ops(tmp_path, params):  # Variant: the export-side reader.
  f = tmp_path / 'x.tflite'
  f.write_bytes(b'\0' * 64)
  return (lambda: tflite.tflite_ops(str(f)), tflite.ExportError,
          'x.tflite: not a valid .tflite file', [str(f)])


def _t5_given_file(tmp_path, params):
  path = _bfl(tmp_path, params)
  return (lambda: nf.convert.load_t5_encoder(path), CheckpointError,
          'flux.safetensors: is a file; load_t5_encoder loads an HF model '
          'folder', [path])


def _clip_given_file(tmp_path, params):  # Variant.
  path = _bfl(tmp_path, params)
  return (lambda: nf.convert.load_clip_text(path), CheckpointError,
          'is a file; load_clip_text', [path])


def _prompts_none(tmp_path, params):
  return (lambda: _Pipe()(None), ValueError, 'prompts=None; expected a '
          'string or a list', [])


def _prompts_dict(tmp_path, params):  # Variant.
  return (lambda: _Pipe()({'a': 1}), ValueError, 'prompts={', [])


# ----------------------------------------------------------- checked early --
def _zero_steps_before_encoding(tmp_path, params):
  return (lambda: _Pipe()(['a'], height=32, width=32, num_steps=0),
          ValueError, 'num_steps=0', [])


def _zero_steps_before_export(tmp_path, params):
  return (lambda: bundle.export_pipeline(_Pipe(), str(tmp_path / 'e'), 32, 32,
                                         num_steps=0),
          ValueError, 'export_pipeline: num_steps=0', [])


def _unwritable_out(tmp_path, params):
  blocker = tmp_path / 'file.txt'
  blocker.write_text('x')
  return (lambda: images.check_writable(str(blocker / 'grid.png')),
          ValueError, 'file.txt is a file, not a folder', [str(blocker)])


def _out_is_folder(tmp_path, params):  # Variant.
  d = _user_folder(tmp_path)
  return (lambda: images.check_writable(d), ValueError, 'is a folder', [d])


# ------------------------------------------------------ resume and debris --
def _no_readable_checkpoint(tmp_path, params):
  wd = tmp_path / 'wd'
  step = wd / 'checkpoints' / '3'
  step.mkdir(parents=True)
  (step / '_CHECKPOINT_METADATA').write_text('{broken')
  c = _train_config(num_steps=4)
  return (lambda: trainer.train(c, str(wd), mesh=_mesh()), CheckpointError,
          'no readable checkpoint', [])


def _export_over_file(tmp_path, params):  # Variant of debris: out is a file.
  f = tmp_path / 'out'
  f.write_text('mine')
  return (lambda: bundle.check_export_args(str(f), 32, 32),
          atomic.OverwriteError, 'is a file', [str(f)])


CASES = {
    # Loaded silently.
    'int8_tensor': _int8_tensor,
    'bool_tensor': _bool_tensor,
    'missing_trailing_blocks': _missing_trailing_blocks,
    'missing_single_blocks': _missing_single_blocks,
    'diffusers_config_disagrees': _diffusers_config_disagrees,
    'overlapping_offsets': _overlapping_offsets,
    'same_offsets': _same_offsets,
    'nonfinite_strict': _nonfinite_strict,
    'nonfinite_bad_option': _nonfinite_bad_option,
    'params_folder_gone': _params_folder_gone,
    'component_params_gone': _pipeline_component_params_gone,
    'negative_num_steps': _negative_num_steps,
    'negative_hidden_size_stored': _negative_hidden_size_stored,
    'zero_heads_t5_config': _zero_heads_t5_config,
    # User data deleted.
    'save_over_user_folder': _save_over_user_folder,
    'pipeline_save_over_checkpoint': _pipeline_save_over_checkpoint,
    'export_over_user_folder': _export_over_user_folder,
    'save_over_user_file': _save_over_user_file,
    'convert_binary_out': _convert_binary_out,
    'train_student_over_user_folder': _train_student_over_user_folder,
    # Accidental errors instead of validation.
    'batch_size_zero': _batch_size_zero,
    'grad_accum_not_dividing': _grad_accum_not_dividing,
    'float_height': _float_height,
    'huge_seed': _huge_seed,
    'fractional_steps': _fractional_steps,
    'none_steps': _none_steps,
    'none_prompt': _none_prompt,
    'header_is_list': _header_is_list,
    'index_is_list': _index_is_list,
    'negative_dims': _negative_dims,
    'unknown_preset': _unknown_preset,
    'no_config': _no_config,
    'unknown_override': _unknown_override,
    # Errors that did not name the file.
    'corrupt_manifest': _corrupt_manifest,
    'bad_tflite': _bad_tflite,
    'bad_tflite_ops': _bad_tflite_ops,
    't5_given_file': _t5_given_file,
    'clip_given_file': _clip_given_file,
    'prompts_none': _prompts_none,
    'prompts_dict': _prompts_dict,
    # Checked too late.
    'zero_steps_before_encoding': _zero_steps_before_encoding,
    'zero_steps_before_export': _zero_steps_before_export,
    'unwritable_out': _unwritable_out,
    'out_is_folder': _out_is_folder,
    # Resume and debris.
    'no_readable_checkpoint': _no_readable_checkpoint,
    'export_over_file': _export_over_file,
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input(case, tmp_path, params):
  assert_refused(*CASES[case](tmp_path, params), folder=tmp_path)


# ------------------------------------------------- behaviour beyond errors --
def test_binaries_report_config_errors_as_usage_errors(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  binary = os.path.join(root, 'experiments', 'distill.py')
  config = os.path.join(root, 'experiments', 'configs', 'distill_tiny.py')
  for args, fragment in (
      ([], 'Flag --config must have a value'),
      ([f'--config={config}', '--config.no_such_field=1'],
       "has no field 'no_such_field'"),
      ([f'--config={config}', '--config.student.preset=huge'],
       "config.student.preset='huge'")):
    out = subprocess.run([sys.executable, binary, f'--workdir={tmp_path}',
                          *args], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS='cpu'),
                         check=False)
    assert out.returncode == 1 and fragment in out.stderr, out.stderr
    assert 'Traceback' not in out.stderr
  assert not os.listdir(tmp_path)


def test_replacing_same_kind_is_allowed_and_stale_temps_are_removed(
    tmp_path, params):
  ck = str(tmp_path / 'ck')
  checkpoint.save(ck, CFG, params)
  # Debris of an interrupted save by a process that no longer runs, and of
  # an older writer (no pid; old enough), next to a live process's folder.
  dead = tmp_path / f'.ck.tmp-{atomic._host()}-999999999-0123abcd'
  dead.mkdir()
  (dead / 'big').write_bytes(b'\0' * 1024)
  legacy = tmp_path / '.ck.tmp-89abcdef'
  legacy.mkdir()
  os.utime(legacy, (0, 0))
  live = tmp_path / f'.ck.tmp-{atomic._host()}-{os.getpid()}-fedcba98'
  live.mkdir()
  mine = tmp_path / 'ck.tmp-notes'  # A user's look-alike, however old.
  mine.write_text('keep')
  os.utime(mine, (0, 0))
  checkpoint.save(ck, CFG.replace(remat=True), params)  # Same kind: allowed.
  assert checkpoint.load(ck)[0].remat
  assert not dead.exists() and not legacy.exists()
  assert live.exists() and mine.read_text() == 'keep'
  # An empty folder may be written into; a parameter-free config loads.
  empty = tmp_path / 'empty'
  empty.mkdir()
  checkpoint.save(str(empty), VAEConfig.pixel(2), {})
  assert checkpoint.load(str(empty)) == (VAEConfig.pixel(2), {})


def test_nonfinite_params_are_named_in_a_warning(tmp_path, params, caplog):
  def edit(sd):
    sd['txt_in.bias'] = sd['txt_in.bias'].copy()
    sd['txt_in.bias'][1] = np.inf
  path = _bfl(tmp_path, params, edit)
  with caplog.at_level('WARNING'):
    convert_flux.load_flux_transformer(path)
  assert "txt_in/bias <- ['txt_in.bias']" in caplog.text


class _SignalAt:
  """PromptData that sends SIGINT to this process while loading `step`."""

  def __init__(self, inner, step):
    self.inner, self.step = inner, step

  def batch(self, step, *a):
    if step == self.step:
      os.kill(os.getpid(), signal.SIGINT)
    return self.inner.batch(step, *a)


def test_sigint_saves_and_a_corrupt_checkpoint_falls_back(tmp_path, caplog):
  c = _train_config(num_steps=6)
  cfg = teacher_lib.flux_config(c.teacher, 'teacher')
  data = data_lib.PromptData(data_lib.load_prompts('builtin')[:4],
                             data_lib.random_embedder(cfg, 4), cfg, (2, 2), 4)
  wd = str(tmp_path / 'wd')
  # What was installed before (SIG_IGN when pytest runs as a background job).
  before = signal.getsignal(signal.SIGINT)
  # SIGINT while step 1 runs: it finishes, step 2 is saved (the config
  # would only have saved at step 6), then TrainingInterrupted.
  with pytest.raises(loop.TrainingInterrupted, match='SIGINT at step 2'):
    trainer.train(c, wd, data=_SignalAt(data, 1), mesh=_mesh())
  ckdir = os.path.join(wd, 'checkpoints')
  assert sorted(os.listdir(ckdir)) == ['2']
  assert signal.getsignal(signal.SIGINT) is before  # Restored.
  # Two more checkpoints, then the newest is corrupted.
  state, _ = trainer.train(_train_config(num_steps=6, checkpoint_every=1,
                                         stop_after=4), wd, data=data,
                           mesh=_mesh())
  assert int(state.step) == 4
  for root, _, files in os.walk(os.path.join(ckdir, '4')):
    for f in files:
      if f.endswith('METADATA'):
        with open(os.path.join(root, f), 'w') as fh:
          fh.write('{not json')
  with caplog.at_level('WARNING'):
    state, _ = trainer.train(_train_config(num_steps=6, checkpoint_every=1,
                                           stop_after=5), wd, data=data,
                             mesh=_mesh())
  assert int(state.step) == 5
  assert 'step 4 is unreadable' in caplog.text
  assert os.listdir(os.path.join(wd, 'unreadable_checkpoints'))  # Kept.


def test_distils_a_guidance_embedded_teacher(tmp_path):
  c = _train_config(num_steps=8, learning_rate=3e-3, warmup_steps=1)
  c.teacher.overrides = dict(TINY, guidance_embed=True)
  c.student.overrides = dict(TINY, guidance_embed=True)
  c.guidance = 4.0
  state, hist = trainer.train(c, str(tmp_path / 'wd'), mesh=_mesh())
  assert int(state.step) == 8
  assert 'guidance_in' in state.params['student']
  losses = [h['loss'] for h in hist]
  assert np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  # The guidance reaches the teacher: another scale, another trajectory.
  cfg = teacher_lib.flux_config(c.teacher, 'teacher')
  p = flux.init_params(cfg, jax.random.key(0))
  x = np.zeros((1, 4, cfg.in_channels), np.float32)
  txt = np.ones((1, 4, cfg.context_in_dim), np.float32)
  y = np.ones((1, cfg.vec_in_dim), np.float32)
  a = data_lib.teacher_trajectory(cfg, p, x, txt, y, (1.0, 0.0), (2, 2), 1.0)
  b = data_lib.teacher_trajectory(cfg, p, x, txt, y, (1.0, 0.0), (2, 2), 4.0)
  assert not np.allclose(a[1], b[1])


def test_write_file_is_atomic_and_leaves_no_debris(tmp_path):
  """Reports and eval results: a failed write keeps the old file and leaves
  no temporary sibling; a stale sibling of a dead process is removed."""
  path = tmp_path / 'eval.json'
  atomic.write_file(str(path), lambda f: f.write('old'))

  def fail(f):
    f.write('half')
    raise RuntimeError('interrupted')
  with pytest.raises(RuntimeError, match='interrupted'):
    atomic.write_file(str(path), fail)
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['eval.json']
  # pylint: disable-next=protected-access
  stale = tmp_path / f'.eval.json.tmp-{atomic._host()}-999999999-0123abcd'
  stale.write_text('debris')  # pid 999999999: no such process.
  atomic.write_file(str(path), lambda f: f.write('new'))
  assert path.read_text() == 'new'
  assert os.listdir(tmp_path) == ['eval.json']

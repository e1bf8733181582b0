"""Strictness and format handling of the FLUX checkpoint import."""
import json
import os

import jax
import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax import checkpoint
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.convert.safetensors_io import CheckpointError, save_file
from nanoflux_jax.models import flux


@pytest.fixture(scope='module')
def tiny():
  cfg = nf.FluxConfig.tiny(guidance_embed=True)
  return cfg, flux.init_params(cfg, jax.random.key(0))


def _bfl(tmp_path, cfg, params, edit=None):
  sd = convert_flux.to_bfl_state_dict(cfg, params)
  if edit:
    edit(sd)
  path = str(tmp_path / 'flux.safetensors')
  save_file(sd, path, {convert_flux.CONFIG_METADATA_KEY: cfg.to_json()})
  return path


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path, tiny):
  cfg, params = tiny

  def edit(sd):
    del sd['double_blocks.1.txt_mlp.0.bias']
    sd['some.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError) as e:
    convert_flux.load_flux_transformer(_bfl(tmp_path, cfg, params, edit))
  msg = str(e.value)
  assert 'double_blocks.1.txt_mlp.0.bias' in msg and 'some.extra.weight' in msg
  assert 'flux.safetensors' in msg

  def misshape(sd):
    sd['txt_in.bias'] = np.zeros(7, np.float32)
    sd['double_blocks.0.img_attn.norm.key_norm.scale'] = np.ones(3, np.float32)
  with pytest.raises(CheckpointError) as e:
    convert_flux.load_flux_transformer(_bfl(tmp_path, cfg, params, misshape))
  assert 'txt_in.bias' in str(e.value) and 'key_norm' in str(e.value)


def test_truncated_and_corrupt_files_name_the_file(tmp_path, tiny):
  cfg, params = tiny
  path = _bfl(tmp_path, cfg, params)
  data = open(path, 'rb').read()
  trunc = tmp_path / 'trunc.safetensors'
  trunc.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match='trunc.safetensors.*truncated'):
    convert_flux.load_flux_transformer(str(trunc))
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(data[:8] + b'{not json' + data[17:])
  with pytest.raises(CheckpointError, match='bad.safetensors.*corrupt'):
    convert_flux.load_flux_transformer(str(bad))
  with pytest.raises(CheckpointError, match='no such file'):
    convert_flux.load_flux_transformer(str(tmp_path / 'nope'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(CheckpointError, match='no .safetensors'):
    convert_flux.load_flux_transformer(str(empty))


def test_not_a_flux_checkpoint_and_block_gaps(tmp_path, tiny):
  cfg, params = tiny
  other = tmp_path / 'other.safetensors'
  save_file({'foo.weight': np.zeros(2, np.float32)}, str(other))
  with pytest.raises(CheckpointError, match='not a FLUX transformer'):
    convert_flux.load_flux_transformer(str(other))

  def gap(sd):
    for k in [k for k in sd if k.startswith('double_blocks.0.')]:
      del sd[k]
  with pytest.raises(CheckpointError, match='not contiguous'):
    convert_flux.load_flux_transformer(_bfl(tmp_path, cfg, params, gap))


def test_unknown_rope_split_needs_axes_dim(tmp_path, tiny):
  cfg, params = tiny
  path = str(tmp_path / 'plain.safetensors')
  save_file(convert_flux.to_bfl_state_dict(cfg, params), path)  # no metadata
  with pytest.raises(CheckpointError, match='axes_dim'):
    convert_flux.load_flux_transformer(path)
  got, _ = convert_flux.load_flux_transformer(path, axes_dim=cfg.axes_dim)
  assert got == cfg


def test_pruned_widths_are_inferred(tmp_path):
  cfg = nf.FluxConfig.tiny(double_heads=(2, 3), double_mlp_img=(8, 16),
                           double_mlp_txt=(24, 4), single_heads=(1, 4),
                           single_mlp=(12, 128))
  params = flux.init_params(cfg, jax.random.key(1))
  path = str(tmp_path / 'pruned.safetensors')
  save_file(convert_flux.to_bfl_state_dict(cfg, params), path)
  got, loaded = convert_flux.load_flux_transformer(path, axes_dim=cfg.axes_dim)
  for f in ('double_heads', 'double_mlp_img', 'double_mlp_txt',
            'single_heads', 'single_mlp'):
    assert getattr(got, f) == getattr(cfg, f), f
  x = flux.dummy_inputs(cfg, img_len=6, txt_len=3)
  x['img'] = x['img'] + 1.0
  np.testing.assert_array_equal(
      flux.Flux(cfg).apply({'params': params}, **x).velocity,
      flux.Flux(got).apply({'params': loaded}, **x).velocity)


def test_dtype_and_sharding_on_load(tmp_path, tiny):
  cfg, params = tiny
  path = _bfl(tmp_path, cfg, params)
  assert jax.device_count() == 8  # Sharding over 1 device would be trivial.
  mesh = jax.make_mesh((len(jax.devices()),), ('fsdp',))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))

  def shardings(cfg_, shapes):  # shard every kernel's first dim if it divides.
    return jax.tree.map(
        lambda s: row if s.shape and s.shape[0] % len(jax.devices()) == 0
        else spec, shapes)
  got_cfg, got = convert_flux.load_flux_transformer(
      path, dtype=jax.numpy.bfloat16, shardings=shardings)
  assert got_cfg.param_dtype == 'bfloat16'
  k = got['double_blocks_0']['img_attn']['qkv']['kernel']
  assert k.dtype == jax.numpy.bfloat16 and k.sharding == row
  assert len(k.addressable_shards) == len(jax.devices())


def test_checkpoint_roundtrip_and_atomic_replace(tmp_path, tiny):
  cfg, params = tiny
  target = str(tmp_path / 'ck')
  checkpoint.save(target, cfg, params)
  cfg2, params2 = convert_flux.load_flux_transformer(target)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  # A save that fails half-way leaves the previous checkpoint in place.
  with pytest.raises(Exception):
    checkpoint.save(target, cfg, {'bad': object()})
  cfg3, _ = checkpoint.load(target)
  assert cfg3 == cfg
  assert not [d for d in os.listdir(tmp_path) if 'tmp' in d]
  with open(os.path.join(target, checkpoint.CONFIG_FILE), 'w') as f:
    f.write('{broken')
  with pytest.raises(CheckpointError, match='corrupt config'):
    checkpoint.load(target)


def test_diffusers_pipeline_folder_and_sharded_transformer(tmp_path):
  from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline
  make_tiny_flux_pipeline(tmp_path / 'pipe')
  index = tmp_path / 'pipe' / 'transformer' / (
      'diffusion_pytorch_model.safetensors.index.json')
  assert len(set(json.loads(index.read_text())['weight_map'].values())) > 1
  a_cfg, a = convert_flux.load_flux_transformer(str(tmp_path / 'pipe'))
  b_cfg, b = convert_flux.load_flux_transformer(
      str(tmp_path / 'pipe' / 'transformer'))
  assert a_cfg == b_cfg and a_cfg.axes_dim == (4, 6, 6)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # A shard the index names but that is missing on disk.
  shard = sorted((tmp_path / 'pipe' / 'transformer').glob('*-of-*'))[0]
  shard.unlink()
  with pytest.raises(CheckpointError, match=shard.name):
    convert_flux.load_flux_transformer(str(tmp_path / 'pipe'))

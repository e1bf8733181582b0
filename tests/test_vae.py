"""Parity of the Flax AutoencoderKL with diffusers, and its loader's errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflux_jax.configs import VAEConfig
from nanoflux_jax.convert import safetensors_io
from nanoflux_jax.convert.safetensors_io import CheckpointError
from nanoflux_jax.convert.vae import load_vae
from nanoflux_jax.convert.vae import vae_param_shapes
from nanoflux_jax.models import vae as vae_lib
from tests.refs import max_rel_err
from tests.refs import require
from tests.refs import to_numpy

# fp32 on CPU: errors are summation-order noise (~1e-7 relative).
TOL = 1e-5

_TINY = dict(in_channels=3, out_channels=3, latent_channels=16,
             layers_per_block=1, norm_num_groups=8, use_quant_conv=False,
             use_post_quant_conv=False, scaling_factor=0.3611,
             shift_factor=0.1159)


def _torch_vae(block_out_channels, seed=0):
  """A random diffusers AutoencoderKL in fp32 eval mode."""
  torch = require('torch')
  diffusers = require('diffusers')
  torch.manual_seed(seed)
  n = len(block_out_channels)
  vae = diffusers.AutoencoderKL(
      block_out_channels=tuple(block_out_channels),
      down_block_types=('DownEncoderBlock2D',) * n,
      up_block_types=('UpDecoderBlock2D',) * n, **_TINY).float().eval()
  with torch.no_grad():
    for p in vae.parameters():
      # Norm weights start at 1 and biases at 0: perturb them so that a
      # swapped scale/bias or a dropped tensor changes the output.
      if torch.all(p == 0) or torch.all(p == 1):
        p.add_(0.1 * torch.randn_like(p))
  return vae


def _save(vae, tmp_path):
  folder = os.path.join(tmp_path, 'vae')
  vae.save_pretrained(folder, safe_serialization=True)
  return folder


def _check_parity(block_out_channels, tmp_path, hw=(32, 48)):
  torch = require('torch')
  ref = _torch_vae(block_out_channels)
  cfg, params = load_vae(_save(ref, tmp_path))
  assert cfg.block_out_channels == tuple(block_out_channels)
  assert cfg.downsample_factor == 2 ** (len(block_out_channels) - 1)
  model = vae_lib.AutoencoderKL(cfg)
  variables = {'params': params}

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
  mean, logvar = jax.jit(
      lambda v, x: model.apply(v, x, method=model.encode))(variables, x)
  s = cfg.downsample_factor
  assert mean.shape == (2, hw[0] // s, hw[1] // s, 16)
  errs = {'mean': max_rel_err(mean, to_numpy(dist.mean).transpose(0, 2, 3, 1)),
          'logvar': max_rel_err(
              logvar, to_numpy(dist.logvar).transpose(0, 2, 3, 1))}

  z = rng.standard_normal((2, hw[0] // s, hw[1] // s, 16)).astype(np.float32)
  with torch.no_grad():
    img = ref.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
  ours = jax.jit(
      lambda v, z: model.apply(v, z, method=model.decode))(variables, z)
  assert ours.shape == (2, *hw, 3)
  errs['decode'] = max_rel_err(ours, to_numpy(img).transpose(0, 2, 3, 1))
  print(block_out_channels, errs)
  for name, err in errs.items():
    assert err <= TOL, (name, err)


def test_parity_two_blocks(tmp_path):
  _check_parity((32, 64), tmp_path)


def test_parity_three_blocks_factor_4(tmp_path):
  _check_parity((16, 32, 32), tmp_path, hw=(16, 24))


def test_call_samples_posterior():
  cfg = VAEConfig.tiny()
  model = vae_lib.AutoencoderKL(cfg)
  # Random params from the shapes: jitting `init` (a PRNG per param) takes
  # far longer to compile on CPU than the model itself.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
      vae_param_shapes(cfg))
  x = jnp.asarray(rng.uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)

  @jax.jit
  def run(params, x):
    v = {'params': params}
    mode = model.apply(v, x)
    sampled = model.apply(v, x, sample_posterior=True,
                          rng=jax.random.PRNGKey(1))
    from_stream = model.apply(v, x, sample_posterior=True,
                              rngs={'sample': jax.random.PRNGKey(1)})
    return mode, sampled, from_stream

  mode, sampled, from_stream = run(params, x)
  assert mode.shape == sampled.shape == from_stream.shape == (1, 8, 8, 3)
  assert not np.allclose(mode, sampled)
  assert not np.allclose(mode, from_stream)


def test_latent_scaling_round_trip():
  cfg = VAEConfig.flux()
  z = jnp.linspace(-3, 3, 16)
  x = vae_lib.latents_to_model(z, cfg)
  np.testing.assert_allclose(x, (z - 0.1159) * 0.3611, rtol=1e-6)
  np.testing.assert_allclose(vae_lib.model_to_latents(x, cfg), z, atol=1e-6)


def test_missing_config(tmp_path):
  folder = _save(_torch_vae((32, 64)), tmp_path)
  os.remove(os.path.join(folder, 'config.json'))
  with pytest.raises(CheckpointError, match='config.json'):
    load_vae(folder)


def test_corrupt_config(tmp_path):
  folder = _save(_torch_vae((32, 64)), tmp_path)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    f.write('{not json')
  with pytest.raises(CheckpointError, match='config.json'):
    load_vae(folder)


@pytest.mark.parametrize('key,value', [
    ('use_quant_conv', True),
    ('down_block_types', ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D']),
])
def test_unsupported_setting(tmp_path, key, value):
  folder = _save(_torch_vae((32, 64)), tmp_path)
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    raw = json.load(f)
  raw[key] = value
  with open(path, 'w') as f:
    json.dump(raw, f)
  with pytest.raises(CheckpointError, match=key):
    load_vae(folder)


def test_deleted_tensor_names_key(tmp_path):
  folder = _save(_torch_vae((32, 64)), tmp_path)
  path = os.path.join(folder, 'diffusion_pytorch_model.safetensors')
  src = safetensors_io.open_tensors(path)
  tensors = {k: np.array(src[k]) for k in src}
  src.close()
  key = 'encoder.mid_block.attentions.0.to_k.bias'
  del tensors[key]
  safetensors_io.save_file(tensors, path)
  with pytest.raises(CheckpointError, match=key.replace('.', r'\.')):
    load_vae(folder)


def test_misshaped_tensor_raises(tmp_path):
  folder = _save(_torch_vae((32, 64)), tmp_path)
  path = os.path.join(folder, 'diffusion_pytorch_model.safetensors')
  src = safetensors_io.open_tensors(path)
  tensors = {k: np.array(src[k]) for k in src}
  src.close()
  key = 'decoder.conv_out.weight'
  tensors[key] = tensors[key][:, :-1]
  safetensors_io.save_file(tensors, path)
  with pytest.raises(CheckpointError, match=r'decoder\.conv_out\.weight'):
    load_vae(folder)


def test_flux_param_count_matches_diffusers():
  torch = require('torch')
  diffusers = require('diffusers')
  cfg = VAEConfig.flux()
  with torch.device('meta'):
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        block_out_channels=cfg.block_out_channels,
        down_block_types=('DownEncoderBlock2D',) * 4,
        up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=2,
        norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
  want = sum(p.numel() for p in ref.parameters())
  shapes = vae_param_shapes(cfg)
  got = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  assert got == want, (got, want)


def test_params_carry_logical_axes():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  cfg = VAEConfig.tiny()
  x = jax.ShapeDtypeStruct((1, 2, 2, 3), jnp.float32)
  boxed = jax.eval_shape(
      lambda x: vae_lib.AutoencoderKL(cfg).init(jax.random.PRNGKey(0), x), x)
  flat = traverse_util.flatten_dict(boxed['params'], sep='/')
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim, (path, leaf.names)
  assert flat['encoder/conv_in/kernel'].names == (
      None, None, 'conv_in', 'conv_out')
  assert flat['decoder/mid_block/attentions_0/to_q/kernel'].names == (
      'embed', 'kv')
  assert flat['encoder/norm_out/scale'].names == ('conv_out',)


def test_pixel_codec_is_exact_space_to_depth(tmp_path):
  """VAEConfig.pixel: latents are f x f pixel blocks as channels (dy, dx, c),
  decode inverts encode exactly, and the parameter-free codec round-trips
  through a checkpoint."""
  from nanoflux_jax import checkpoint
  vae_module = vae_lib.vae_module
  cfg = VAEConfig.pixel(4)
  assert (cfg.downsample_factor, cfg.latent_channels) == (4, 48)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
  codec = vae_module(cfg)
  z, _ = codec.apply({'params': {}}, jnp.asarray(x), method='encode')
  assert z.shape == (2, 2, 3, 48)
  # Block (1, 2), pixel (dy=3, dx=1), channel 2 by hand.
  assert float(z[1, 1, 2, (3 * 4 + 1) * 3 + 2]) == x[1, 4 + 3, 8 + 1, 2]
  np.testing.assert_array_equal(
      codec.apply({'params': {}}, z, method='decode'), x)
  checkpoint.save(tmp_path / 'vae', cfg, {})
  assert checkpoint.load(tmp_path / 'vae') == (cfg, {})
  # kind='linear': Dense layers on those patches; an orthonormal full basis
  # round-trips exactly, and its latents are the patches times the basis.
  lin = VAEConfig.linear(4, channels=48)
  q = np.linalg.qr(np.random.default_rng(1).standard_normal((48, 48)))[0]
  params = {'encoder': {'kernel': q, 'bias': np.zeros(48)},
            'decoder': {'kernel': q.T, 'bias': np.zeros(48)}}
  zl, _ = vae_module(lin).apply({'params': params}, jnp.asarray(x),
                                method='encode')
  np.testing.assert_allclose(zl, np.asarray(z) @ q, atol=1e-5)
  np.testing.assert_allclose(
      vae_module(lin).apply({'params': params}, zl, method='decode'), x,
      atol=1e-5)
  with pytest.raises(ValueError, match='latent_channels'):
    VAEConfig(kind='pixel', pixel_factor=2, latent_channels=16)

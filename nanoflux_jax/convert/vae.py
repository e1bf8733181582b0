"""Imports a diffusers `vae/` folder (FLUX.1's AutoencoderKL) into our params.

The folder holds config.json and diffusion_pytorch_model.safetensors. We read
the config into a `VAEConfig` (refusing settings our model does not
implement), write down where each of our params comes from as a plan of
`Entry`s, and let `load_strict` check and stream the tensors.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanoflux_jax.configs import VAEConfig
from nanoflux_jax.convert import loading
from nanoflux_jax.convert.loading import Entry, conv, linear, load_strict, same
from nanoflux_jax.convert.safetensors_io import open_tensors
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.models.vae import AutoencoderKL

# diffusers AutoencoderKL.__init__ defaults, used when config.json omits a key
# (diffusers itself would fall back to them).
_DIFFUSERS_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',),
    up_block_types=('UpDecoderBlock2D',), block_out_channels=(64,),
    layers_per_block=1, act_fn='silu', latent_channels=4, norm_num_groups=32,
    scaling_factor=0.18215, shift_factor=None, latents_mean=None,
    latents_std=None, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True)
# Keys that do not change the network or its latents.
_IGNORED = {'sample_size', 'force_upcast'}


def vae_config_from_diffusers(path: str) -> VAEConfig:
  """Reads a diffusers AutoencoderKL config.json into a VAEConfig.

  Args:
    path: the config.json file, or the folder holding it.
  Raises:
    CheckpointError naming the file when it is missing, corrupt, or asks for
    something we do not implement (quant convs, other block types, ...).
  """
  path, raw = loading.read_config_json(path)
  cls = raw.get('_class_name', 'AutoencoderKL')
  if cls != 'AutoencoderKL':
    raise CheckpointError(f'{path}: _class_name {cls!r}, expected '
                          "'AutoencoderKL'")
  unknown = sorted(k for k in raw if not k.startswith('_') and
                   k not in _DIFFUSERS_DEFAULTS and k not in _IGNORED)
  if unknown:
    raise CheckpointError(f'{path}: unsupported AutoencoderKL settings '
                          f'{unknown}')
  c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in raw.items()
                                  if k in _DIFFUSERS_DEFAULTS}}

  def refuse(key, why):
    raise CheckpointError(f'{path}: {key}={c[key]!r} is not supported ({why})')

  for key in ('use_quant_conv', 'use_post_quant_conv'):
    if c[key]:
      refuse(key, 'FLUX.1 has no quant convs')
  for key in ('latents_mean', 'latents_std'):
    if c[key] is not None:
      refuse(key, 'per-channel latent statistics are not implemented')
  if c['act_fn'] != 'silu':
    refuse('act_fn', 'only silu is implemented')
  n = len(c['block_out_channels'])
  for key, kind in (('down_block_types', 'DownEncoderBlock2D'),
                    ('up_block_types', 'UpDecoderBlock2D')):
    if list(c[key]) != [kind] * n:
      refuse(key, f'expected {n} x {kind!r}, one per block_out_channels')
  if any(ch % c['norm_num_groups'] for ch in c['block_out_channels']):
    refuse('norm_num_groups', 'must divide every block_out_channels entry')
  try:
    return _vae_config(c)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: {e}') from e


def _vae_config(c: dict[str, Any]) -> VAEConfig:
  return VAEConfig(
      in_channels=int(c['in_channels']), out_channels=int(c['out_channels']),
      latent_channels=int(c['latent_channels']),
      block_out_channels=tuple(int(x) for x in c['block_out_channels']),
      layers_per_block=int(c['layers_per_block']),
      norm_num_groups=int(c['norm_num_groups']),
      scaling_factor=float(c['scaling_factor']),
      shift_factor=float(c['shift_factor'] or 0.0),
      mid_block_add_attention=bool(c['mid_block_add_attention']))


def vae_plan(cfg: VAEConfig) -> dict[str, Entry]:
  """Our '/'-joined param path -> Entry over diffusers AutoencoderKL keys."""
  plan: dict[str, Entry] = {}

  def conv_(ours, theirs):
    plan[f'{ours}/kernel'] = conv(f'{theirs}.weight')
    plan[f'{ours}/bias'] = same(f'{theirs}.bias')

  def norm_(ours, theirs):
    plan[f'{ours}/scale'] = same(f'{theirs}.weight')
    plan[f'{ours}/bias'] = same(f'{theirs}.bias')

  def dense_(ours, theirs):
    plan[f'{ours}/kernel'] = linear(f'{theirs}.weight')
    plan[f'{ours}/bias'] = same(f'{theirs}.bias')

  def resnet_(ours, theirs, cin, cout):
    for name in ('norm1', 'norm2'):
      norm_(f'{ours}/{name}', f'{theirs}.{name}')
    for name in ('conv1', 'conv2') + (('conv_shortcut',) if cin != cout
                                      else ()):
      conv_(f'{ours}/{name}', f'{theirs}.{name}')

  def mid_(ours, theirs, c):
    resnet_(f'{ours}/resnets_0', f'{theirs}.resnets.0', c, c)
    resnet_(f'{ours}/resnets_1', f'{theirs}.resnets.1', c, c)
    if cfg.mid_block_add_attention:
      a, t = f'{ours}/attentions_0', f'{theirs}.attentions.0'
      norm_(f'{a}/group_norm', f'{t}.group_norm')
      for name in ('to_q', 'to_k', 'to_v'):
        dense_(f'{a}/{name}', f'{t}.{name}')
      dense_(f'{a}/to_out', f'{t}.to_out.0')

  chans = cfg.block_out_channels
  last = len(chans) - 1
  # Encoder.
  conv_('encoder/conv_in', 'encoder.conv_in')
  cin = chans[0]
  for i, c in enumerate(chans):
    for j in range(cfg.layers_per_block):
      resnet_(f'encoder/down_blocks_{i}_resnets_{j}',
              f'encoder.down_blocks.{i}.resnets.{j}', cin if j == 0 else c, c)
    if i < last:
      conv_(f'encoder/down_blocks_{i}_downsample',
            f'encoder.down_blocks.{i}.downsamplers.0.conv')
    cin = c
  mid_('encoder/mid_block', 'encoder.mid_block', chans[-1])
  norm_('encoder/norm_out', 'encoder.conv_norm_out')
  conv_('encoder/conv_out', 'encoder.conv_out')
  # Decoder: channels in reverse.
  conv_('decoder/conv_in', 'decoder.conv_in')
  mid_('decoder/mid_block', 'decoder.mid_block', chans[-1])
  cin = chans[-1]
  for i, c in enumerate(reversed(chans)):
    for j in range(cfg.layers_per_block + 1):
      resnet_(f'decoder/up_blocks_{i}_resnets_{j}',
              f'decoder.up_blocks.{i}.resnets.{j}', cin if j == 0 else c, c)
    if i < last:
      conv_(f'decoder/up_blocks_{i}_upsample',
            f'decoder.up_blocks.{i}.upsamplers.0.conv')
    cin = c
  norm_('decoder/norm_out', 'decoder.conv_norm_out')
  conv_('decoder/conv_out', 'decoder.conv_out')
  return plan


def vae_param_shapes(cfg: VAEConfig) -> dict:
  """Our param tree as jax.ShapeDtypeStruct (no memory), logical boxes removed."""
  s = cfg.downsample_factor
  x = jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32)
  variables = jax.eval_shape(
      lambda x: AutoencoderKL(cfg).init(jax.random.PRNGKey(0), x), x)
  return nn.meta.unbox(variables)['params']


def load_vae(path: str, dtype: Optional[Any] = None,
             shardings: Optional[Any] = None, *,
             nonfinite: str = 'warn') -> tuple[VAEConfig, dict]:
  """Loads a diffusers `vae/` folder into (VAEConfig, params).

  Args:
    path: folder with config.json and diffusion_pytorch_model.safetensors
      (or a sharded set with an index json).
    dtype: cast params to this dtype (also recorded as the config's
      param_dtype); None keeps fp32.
    shardings: optional nested dict of jax.sharding.Sharding matching params;
      each param is placed as soon as it is converted.
    nonfinite: 'warn', 'error' or 'ignore' for NaN / inf params (see
      loading.load_strict).
  Returns:
    (config, params) for `AutoencoderKL(config).apply({'params': params}, ...)`.
  Raises:
    CheckpointError naming the file or key for a missing/corrupt config,
    unsupported settings, or missing / unexpected / mis-shaped tensors.
  """
  path = os.fspath(path)
  loading.check_nonfinite_option(nonfinite)
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: not a folder (expected a diffusers vae/ '
                          'folder with config.json and safetensors)')
  cfg = vae_config_from_diffusers(path)
  if dtype is not None:
    cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
  target = vae_param_shapes(cfg)
  # Prefer the canonical file, so a variant beside it (e.g. *.fp16.*) is not
  # read as a second shard.
  single = os.path.join(path, 'diffusion_pytorch_model.safetensors')
  source = open_tensors(single if os.path.isfile(single) else path)
  try:
    params = load_strict(source, vae_plan(cfg), target, dtype=dtype,
                         shardings=shardings, origin=path,
                         nonfinite=nonfinite)
  finally:
    source.close()
  return cfg, params

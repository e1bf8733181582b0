"""FLUX.1's AutoencoderKL in Flax linen (NHWC), matching diffusers in fp32.

The structure and parameter names follow diffusers' `AutoencoderKL` with
FLUX's settings (no quant convs, 16 latent channels), so the key map in
`convert/vae.py` stays a short list of renames:

  encoder: conv_in -> down_blocks_i (resnets_j, downsample) -> mid_block
           (resnets_0, attentions_0, resnets_1) -> norm_out -> SiLU -> conv_out
  decoder: conv_in -> mid_block -> up_blocks_i (resnets_j, upsample)
           -> norm_out -> SiLU -> conv_out

Images are [B, H, W, C] in [-1, 1]; latents are [B, H/s, W/s, latent_channels]
with s = `config.downsample_factor`. GroupNorm statistics are always computed
in fp32 (bf16 sums over H*W*C/G values lose too many digits).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanoflux_jax.configs import VAEConfig

_EPS = 1e-6  # diffusers uses eps 1e-6 for every VAE GroupNorm.


def latents_to_model(z: jax.Array, cfg: VAEConfig) -> jax.Array:
  """VAE latents -> the denoiser's latent space: (z - shift) * scaling.

  Args:
    z: [..., latent_channels] latents from `AutoencoderKL.encode`.
    cfg: the VAE config (scaling_factor, shift_factor).
  Returns:
    Latents with the same shape, normalised for the DiT.
  """
  return (z - cfg.shift_factor) * cfg.scaling_factor


def model_to_latents(x: jax.Array, cfg: VAEConfig) -> jax.Array:
  """The denoiser's latent space -> VAE latents: x / scaling + shift.

  The inverse of `latents_to_model`; apply it before `AutoencoderKL.decode`.
  """
  return x / cfg.scaling_factor + cfg.shift_factor


def _conv(features: int, cfg: VAEConfig, *, kernel: int = 3, stride: int = 1,
          padding: Any = 1, name: Optional[str] = None) -> nn.Conv:
  """A Conv2d with torch's symmetric padding and logically named params."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None, 'conv_in', 'conv_out')),
      bias_init=nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ('conv_out',)),
      name=name)


def _dense(features: int, cfg: VAEConfig, axes: tuple[str, str],
           name: str) -> nn.Dense:
  """A Linear with bias whose kernel carries the logical `axes`."""
  return nn.Dense(
      features, dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (axes[1],)),
      name=name)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over the last axis, computed in fp32.

  Attributes:
    config: the VAE config (groups, dtypes).
    axis_name: logical axis name of the channel params.
  """
  config: VAEConfig
  axis_name: str = 'conv_out'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, ..., C] -> [B, ..., C] in config.dtype."""
    cfg, c = self.config, x.shape[-1]
    g = cfg.norm_num_groups
    if c % g:
      raise ValueError(f'GroupNorm: {c} channels not divisible by {g} groups')
    init = lambda f: nn.with_logical_partitioning(f, (self.axis_name,))
    pdt = jnp.dtype(cfg.param_dtype)
    scale = self.param('scale', init(nn.initializers.ones_init()), (c,), pdt)
    bias = self.param('bias', init(nn.initializers.zeros_init()), (c,), pdt)
    h = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
    axes = tuple(range(1, h.ndim - 2)) + (h.ndim - 1,)  # all but batch, group.
    mean = h.mean(axes, keepdims=True)
    var = jnp.square(h - mean).mean(axes, keepdims=True)  # biased, as torch.
    h = ((h - mean) * jax.lax.rsqrt(var + _EPS)).reshape(x.shape)
    h = h * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return h.astype(jnp.dtype(cfg.dtype))


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without a time embedding.

  out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))); the shortcut
  is a 1x1 conv only when the channel count changes.
  """
  config: VAEConfig
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H, W, features]."""
    cfg = self.config
    h = nn.silu(GroupNorm(cfg, name='norm1')(x))
    h = _conv(self.features, cfg, name='conv1')(h)
    h = nn.silu(GroupNorm(cfg, name='norm2')(h))
    h = _conv(self.features, cfg, name='conv2')(h)  # dropout 0 at inference.
    if x.shape[-1] != self.features:
      x = _conv(self.features, cfg, kernel=1, padding=0,
                name='conv_shortcut')(x)
    return x + h


class Attention(nn.Module):
  """The mid-block self-attention: one head of width C over H*W tokens.

  Pre-GroupNorm, to_q/to_k/to_v/to_out linears with bias, a residual, softmax
  in fp32 (diffusers' upcast_softmax).
  """
  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    cfg = self.config
    b, hgt, wid, c = x.shape
    h = GroupNorm(cfg, axis_name='embed', name='group_norm')(x)
    h = h.reshape(b, hgt * wid, c)
    q = _dense(c, cfg, ('embed', 'kv'), 'to_q')(h)
    k = _dense(c, cfg, ('embed', 'kv'), 'to_k')(h)
    v = _dense(c, cfg, ('embed', 'kv'), 'to_v')(h)
    logits = jnp.einsum('bqc,bkc->bqk', q, k) / jnp.sqrt(c).astype(q.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum('bqk,bkc->bqc', probs.astype(v.dtype), v)
    out = _dense(c, cfg, ('kv', 'embed'), 'to_out')(out)
    return x + out.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """resnet -> attention (if config.mid_block_add_attention) -> resnet."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    x = ResnetBlock(self.config, c, name='resnets_0')(x)
    if self.config.mid_block_add_attention:
      x = Attention(self.config, name='attentions_0')(x)
    return ResnetBlock(self.config, c, name='resnets_1')(x)


class Encoder(nn.Module):
  """Image -> Gaussian moments [B, H/s, W/s, 2 * latent_channels]."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] -> [B, H/s, W/s, 2 * latent_channels]."""
    cfg = self.config
    chans = cfg.block_out_channels
    x = _conv(chans[0], cfg, name='conv_in')(x)
    for i, c in enumerate(chans):
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(cfg, c, name=f'down_blocks_{i}_resnets_{j}')(x)
      if i < len(chans) - 1:
        # diffusers pads only bottom/right by one, then a valid stride-2 conv.
        x = _conv(c, cfg, stride=2, padding=((0, 1), (0, 1)),
                  name=f'down_blocks_{i}_downsample')(x)
    x = MidBlock(cfg, name='mid_block')(x)
    x = nn.silu(GroupNorm(cfg, name='norm_out')(x))
    return _conv(2 * cfg.latent_channels, cfg, name='conv_out')(x)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] -> image [B, h*s, w*s, out_channels]."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, latent_channels] -> [B, h*s, w*s, out_channels]."""
    cfg = self.config
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], cfg, name='conv_in')(z)
    x = MidBlock(cfg, name='mid_block')(x)
    for i, c in enumerate(chans):
      # One resnet more than the encoder: the decoder has no skip inputs,
      # diffusers gives it layers_per_block + 1.
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(cfg, c, name=f'up_blocks_{i}_resnets_{j}')(x)
      if i < len(chans) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest 2x.
        x = _conv(c, cfg, name=f'up_blocks_{i}_upsample')(x)
    x = nn.silu(GroupNorm(cfg, name='norm_out')(x))
    return _conv(cfg.out_channels, cfg, name='conv_out')(x)


class AutoencoderKL(nn.Module):
  """FLUX.1's VAE. Images [B, H, W, 3] in [-1, 1]; H, W multiples of s."""
  config: VAEConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes images into the posterior's parameters.

    Args:
      x: [B, H, W, in_channels] in [-1, 1]; H and W multiples of s.
    Returns:
      (mean, logvar), each [B, H/s, W/s, latent_channels]; logvar clipped to
      [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    """
    s = self.config.downsample_factor
    if x.shape[1] % s or x.shape[2] % s:
      raise ValueError(f'AutoencoderKL.encode: image size {x.shape[1:3]} is '
                       f'not a multiple of the downsample factor {s}')
    moments = self.encoder(x)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, latent_channels] (VAE space) -> [B, h*s, w*s, 3]."""
    return self.decoder(z)

  def __call__(self, x: jax.Array, sample_posterior: bool = False,
               rng: Optional[jax.Array] = None) -> jax.Array:
    """Encodes then decodes (used for init and reconstruction checks).

    Args:
      x: [B, H, W, in_channels] images in [-1, 1].
      sample_posterior: decode mean + std * noise instead of the mean.
      rng: noise key; if None while sampling, the 'sample' rng stream is used.
    Returns:
      [B, H, W, out_channels] reconstructions.
    """
    mean, logvar = self.encode(x)
    z = mean
    if sample_posterior:
      rng = self.make_rng('sample') if rng is None else rng
      noise = jax.random.normal(rng, mean.shape, jnp.float32)
      z = mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype)
    return self.decode(z)



def space_to_depth(x: jax.Array, f: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/f, W/f, f*f*C], channels ordered (dy, dx, c)."""
  b, h, w, c = x.shape
  if h % f or w % f:
    raise ValueError(f'space_to_depth: image size {(h, w)} is not a multiple '
                     f'of the pixel factor {f}')
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(z: jax.Array, f: int) -> jax.Array:
  """The inverse of `space_to_depth`: [B, h, w, f*f*C] -> [B, h*f, w*f, C]."""
  b, h, w, fc = z.shape
  x = z.reshape(b, h, w, f, f, fc // (f * f)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, fc // (f * f))


class PatchCodec(nn.Module):
  """Small latent spaces for toy worlds, on f x f pixel patches:

  kind='pixel': no parameters; latents are the patches' pixels stacked as
    channels (space-to-depth), 3 f^2 of them.
  kind='linear': a linear autoencoder on the patches, encoder/{kernel
    [3f^2, k], bias [k]} and decoder/{kernel [k, 3f^2], bias [3f^2]} (fitted
    by PCA, see distill.shapes_teacher.fit_linear_codec): k latent channels,
    so that a DiT narrower than 3 f^2 can still model all of their noise.

  Same interface as AutoencoderKL: encode -> (mean, logvar) with a point-mass
  posterior (logvar at its -30 floor), decode -> images in [-1, 1].
  """
  config: VAEConfig

  def setup(self):
    cfg = self.config
    if cfg.kind == 'linear':
      self.encoder = nn.Dense(cfg.latent_channels, name='encoder')
      self.decoder = nn.Dense(cfg.in_channels * cfg.pixel_factor ** 2,
                              name='decoder')

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, 3] in [-1, 1] -> ([B, H/f, W/f, k], same-shape logvar)."""
    z = space_to_depth(x, self.config.pixel_factor)
    if self.config.kind == 'linear':
      z = self.encoder(z)
    return z, jnp.full_like(z, -30.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """[B, h, w, k] -> [B, h*f, w*f, 3]."""
    if self.config.kind == 'linear':
      z = self.decoder(z)
    return depth_to_space(z, self.config.pixel_factor)

  def __call__(self, x: jax.Array, sample_posterior: bool = False,
               rng: Optional[jax.Array] = None) -> jax.Array:
    del sample_posterior, rng  # The posterior is a point mass.
    return self.decode(self.encode(x)[0])


def vae_module(cfg: VAEConfig) -> nn.Module:
  """The autoencoder module `cfg` describes (AutoencoderKL or a patch codec)."""
  return AutoencoderKL(cfg) if cfg.kind == 'kl' else PatchCodec(cfg)

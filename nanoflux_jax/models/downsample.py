"""ResNet token down/up-sampler (NanoFLUX): middle blocks on a coarser grid.

The first blocks run on the full image-token grid; before block
`downsample_start` the image tokens [B, h*w, D] are folded into a grid
[B, h, w, D], down-sampled by `factor` f (pixel-unshuffle + a 1x1 projection,
then a 3x3-conv ResNet block), and the blocks up to `downsample_end` run on
the [B, (h/f)*(w/f), D] coarse tokens. After `downsample_end` the *residual*
the coarse blocks added (coarse_out - coarse_in) goes through a second ResNet
block, is nearest-upsampled, and is merged with the pre-down tokens (the skip)
by a 1x1 conv over concat[skip, up]:

  out = merge(concat[skip, nearest(res_up(coarse_out - coarse_in))])

Initialisation makes the detour start on the skip path: the down projection
is the f x f mean, both ResNet blocks end in a zero-initialised conv (identity)
and `merge` is [I; I], so out = skip + nearest(coarse_out - avgpool(skip)). If
the coarse blocks do nothing the whole detour is exactly the identity, and
otherwise the coarse blocks' update is added to the full-resolution tokens
(a Laplacian-pyramid merge), which keeps a teacher's behaviour as well as a
coarse grid can. Text tokens never pass through here.

Parameter tree (under `downsample/`):
  down_proj/{kernel [f*f*D, D], bias [D]}
  down_res/{norm1, conv1 [3,3,D,C], norm2, conv2 [3,3,C,D]}
  up_res/{...same...}
  merge/{kernel [2D, D], bias [D]}
with C = config.downsample_channels or hidden_size // 4.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import layers

Array = jax.Array


def channels(cfg: FluxConfig) -> int:
  """ResNet bottleneck width C."""
  return cfg.downsample_channels or max(cfg.hidden_size // 4, 1)


def num_groups(*widths: int) -> int:
  """Largest GroupNorm group count (<= 32) dividing every width."""
  g = 0
  for w in widths:
    g = math.gcd(g, w)
  return max(d for d in (32, 16, 8, 4, 2, 1) if g % d == 0)


def check_grid(cfg: FluxConfig, img_len: int, img_grid) -> tuple[int, int]:
  """Validates the static image grid (h, w) of `img_len` tokens."""
  if img_grid is None:
    raise ValueError(
        f'Flux: this model down-samples image tokens over blocks '
        f'[{cfg.downsample_start}, {cfg.downsample_end}]; pass the static '
        f'img_grid=(h, w) of its {img_len} image tokens')
  try:
    h, w = (int(v) for v in img_grid)
  except (TypeError, ValueError) as e:
    raise ValueError(f'Flux: img_grid={img_grid!r} is not a pair (h, w)') from e
  if h * w != img_len:
    raise ValueError(f'Flux: img_grid={(h, w)} has {h * w} cells but img has '
                     f'{img_len} tokens')
  f = cfg.downsample_factor
  if h % f or w % f:
    raise ValueError(f'Flux: img_grid={(h, w)} is not divisible by the '
                     f'downsample_factor {f} (an odd grid cannot be halved)')
  return h, w


def space_to_depth(x: Array, grid: tuple[int, int], f: int) -> Array:
  """[B, h*w, C] -> [B, (h/f)*(w/f), f*f*C], cell-major (dy, dx, c)."""
  b, _, c = x.shape
  h, w = grid
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // f) * (w // f), f * f * c)


def coarse_ids(img_ids: Array, grid: tuple[int, int], f: int) -> Array:
  """[B, h*w, 3] ids -> [B, (h/f)*(w/f), 3], the mean id of each f x f cell.

  The mean (e.g. row 2r + 0.5 for f=2) keeps coarse tokens in the teacher's
  position units, so RoPE distances between them stay true distances.
  """
  n = img_ids.shape[-1]
  cells = space_to_depth(img_ids.astype(jnp.float32), grid, f)
  return cells.reshape(*cells.shape[:2], f * f, n).mean(axis=2)


def nearest_upsample(x: Array, grid: tuple[int, int], f: int) -> Array:
  """[B, (h/f)*(w/f), C] -> [B, h*w, C], each coarse token copied f x f."""
  b, _, c = x.shape
  h, w = grid
  x = x.reshape(b, h // f, 1, w // f, 1, c)
  x = jnp.broadcast_to(x, (b, h // f, f, w // f, f, c))
  return x.reshape(b, h * w, c)


def _tiled_eye_init(scale: float):
  """Kernel init [k*D, D] of k stacked scaled identities ([I; I], the mean)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    n, d = shape
    if n % d:
      raise ValueError(f'tiled identity init: {shape} is not [k*D, D]')
    return jnp.tile(jnp.eye(d, dtype=dtype), (n // d, 1)) * scale
  return init


class ResBlock(nn.Module):
  """x + conv3x3(SiLU(GN(conv3x3(SiLU(GN(x)))))) on [B, h, w, D].

  The second conv is zero-initialised, so the block starts as the identity.
  """
  config: FluxConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, param_dtype = layers.dtypes(cfg)
    d, c = cfg.hidden_size, channels(cfg)
    g = num_groups(d, c)

    def norm(name):
      # GroupNorm statistics in float32, like every norm in this package.
      return nn.GroupNorm(
          num_groups=g, epsilon=1e-6, dtype=jnp.float32,
          param_dtype=param_dtype, name=name,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones,
                                                  ('conv_in',)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 ('conv_in',)))

    def conv(features, name, init=nn.initializers.lecun_normal()):
      return nn.Conv(
          features, (3, 3), padding='SAME', dtype=dtype,
          param_dtype=param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(
              init, (None, None, 'conv_in', 'conv_out')),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 ('conv_out',)))

    h = nn.silu(norm('norm1')(x)).astype(dtype)
    h = conv(c, 'conv1')(h)
    h = nn.silu(norm('norm2')(h)).astype(dtype)
    h = conv(d, 'conv2', nn.initializers.zeros)(h)
    return x + h


class TokenDownsampler(nn.Module):
  """The down (`down`) and up (`up`) halves of the detour, one param scope.

  down: img [B, h*w, D] -> coarse [B, (h/f)*(w/f), D]
  up:   (coarse_out, coarse_in [B, (h/f)*(w/f), D], skip [B, h*w, D])
        -> [B, h*w, D]
  """
  config: FluxConfig

  def setup(self):
    cfg = self.config
    dtype, param_dtype = layers.dtypes(cfg)
    f, d = cfg.downsample_factor, cfg.hidden_size
    self.down_proj = layers.dense(
        d, ('conv_in', 'embed'), name='down_proj', dtype=dtype,
        param_dtype=param_dtype, kernel_init=_tiled_eye_init(1.0 / (f * f)))
    self.down_res = ResBlock(cfg, name='down_res')
    self.up_res = ResBlock(cfg, name='up_res')
    self.merge = layers.dense(
        d, ('conv_in', 'embed'), name='merge', dtype=dtype,
        param_dtype=param_dtype, kernel_init=_tiled_eye_init(1.0))

  def _grid(self, x: Array, grid) -> Array:
    f = self.config.downsample_factor
    return x.reshape(x.shape[0], grid[0] // f, grid[1] // f, x.shape[-1])

  def down(self, img: Array, grid: tuple[int, int]) -> Array:
    f = self.config.downsample_factor
    x = self.down_proj(space_to_depth(img, grid, f))
    x = self.down_res(self._grid(x, grid))
    return x.reshape(img.shape[0], -1, img.shape[-1])

  def up(self, coarse_out: Array, coarse_in: Array, skip: Array,
         grid: tuple[int, int]) -> Array:
    f = self.config.downsample_factor
    # Only the update the coarse blocks made is upsampled, so the skip keeps
    # its full-resolution detail.
    delta = self.up_res(self._grid(coarse_out - coarse_in, grid))
    delta = nearest_upsample(delta.reshape(coarse_out.shape), grid, f)
    return self.merge(jnp.concatenate([skip, delta], axis=-1))

  def __call__(self, img: Array, grid: tuple[int, int]) -> Array:
    """down then up with no blocks between (used by init)."""
    coarse = self.down(img, grid)
    return self.up(coarse, coarse, img, grid)


def num_params(cfg: FluxConfig) -> int:
  """Parameter count of the down-sampler (0 when it is disabled)."""
  if cfg.downsample_start is None:
    return 0
  d, c, f = cfg.hidden_size, channels(cfg), cfg.downsample_factor
  res = 2 * d + (9 * d * c + c) + 2 * c + (9 * c * d + d)
  return (f * f * d * d + d) + 2 * res + (2 * d * d + d)


def num_flops(cfg: FluxConfig, img_len: int, batch: int = 1) -> int:
  """Matmul/conv FLOPs (2 * MACs) of one pass through down and up."""
  if cfg.downsample_start is None:
    return 0
  d, c, f = cfg.hidden_size, channels(cfg), cfg.downsample_factor
  coarse = img_len // (f * f)
  macs = coarse * f * f * d * d          # down_proj
  macs += 2 * coarse * 9 * 2 * d * c     # two ResNet blocks, two convs each
  macs += img_len * 2 * d * d            # merge
  return 2 * batch * macs


def init_params(cfg: FluxConfig, rng: Array) -> dict:
  """Freshly initialised (unboxed) `downsample` params for `cfg`."""
  f = cfg.downsample_factor
  grid = (f, f)
  img = jnp.zeros((1, grid[0] * grid[1], cfg.hidden_size),
                  np.dtype(cfg.dtype))
  return nn.meta.unbox(TokenDownsampler(cfg).init(rng, img, grid)['params'])

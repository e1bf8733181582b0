"""Adding the ResNet token down-sampler to an existing model."""
from __future__ import annotations

import jax

from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import downsample
from nanoflux_jax.models import sharding


def add_downsampler(cfg: FluxConfig, params: dict, start: int, end: int,
                    rng: jax.Array, factor: int = 2, channels: int = 0
                    ) -> tuple[FluxConfig, dict]:
  """Returns (cfg, params) with a freshly initialised down-sampler over global
  blocks [start, end] (double blocks first). At init the detour adds the
  coarse blocks' update to the full-resolution tokens (see
  models/downsample.py), and is exactly the identity if those blocks are."""
  if cfg.downsample_start is not None:
    raise ValueError(f'add_downsampler: the model already down-samples blocks '
                     f'[{cfg.downsample_start}, {cfg.downsample_end}]')
  new_cfg = cfg.replace(downsample_start=int(start), downsample_end=int(end),
                        downsample_factor=int(factor),
                        downsample_channels=int(channels))
  if factor < 2:
    raise ValueError(f'add_downsampler: factor={factor} must be >= 2')
  # Sharded params: the new (small) down-sampler joins them on their mesh.
  return new_cfg, sharding.place_flux(
      new_cfg, {**params, 'downsample': downsample.init_params(new_cfg, rng)},
      parallel.mesh_of(params))


def widen_downsampler(cfg: FluxConfig, params: dict, start: int, end: int,
                      factor: int = 2) -> tuple[FluxConfig, dict]:
  """Progressive token down-sampling: puts global blocks [start, end] on the
  coarse grid of a model that already down-samples a range inside it.

  The trained down-sampler (its ResNets and merge) is kept: its parameters
  do not depend on which blocks run between down and up, so the blocks newly
  moved to the coarse grid join a detour that already works, and the student
  starts near its parent (NanoFLUX brings the coarse range in progressively,
  distilling in between). Returns (cfg, the same params).

  Raises:
    ValueError: the model does not down-sample, the new range does not
      contain the current one, or the factor differs (names both).
  """
  if cfg.downsample_start is None:
    raise ValueError('widen_downsampler: the model has no down-sampler; add '
                     'one first (add_downsampler)')
  old = (cfg.downsample_start, cfg.downsample_end)
  if not start <= old[0] <= old[1] <= end:
    raise ValueError(f'widen_downsampler: blocks [{start}, {end}] do not '
                     f'contain the coarse range {list(old)} it has')
  if int(factor) != cfg.downsample_factor:
    raise ValueError(f'widen_downsampler: factor {factor} differs from the '
                     f"model's {cfg.downsample_factor}")
  return cfg.replace(downsample_start=int(start), downsample_end=int(end)
                     ), params

"""A NanoFLUX-size student built from shapes: no teacher is ever materialised.

`compressed_shapes(cfg, recipe)` runs the library's own compress calls
(head / MLP pruning, block removal, static modulation, the token
down-sampler) under `jax.eval_shape`, so FLUX.1-schnell's 12B parameters
exist only as `ShapeDtypeStruct`s and the result is the student's config and
its param shapes. `RandomSource` (export/streaming.py) then fills any subtree
of those shapes with seeded random weights, one tensor at a time.

  cfg, shapes = nanoflux_student()              # ~2.4B DiT params
  nf.compress.count_params(cfg)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import compress
from nanoflux_jax import sampling
from nanoflux_jax.call_args import DEFAULT_GUIDANCE
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import flux as flux_lib


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The NanoFLUX ladder as shape transformations (see DESIGN.md).

  keep_heads / keep_mlp: fractions kept in every block (which units are
  kept does not matter for shapes: the first ones). keep_double /
  keep_single: blocks kept (the first ones of each kind). downsample:
  (start, end) global block indices of the down-sampled range, negative
  end counted from the last block. num_steps: static-modulation rows, the
  sampling schedule's for `image_seq_len` packed tokens (1024: 512 x 512
  px; it matters only for a guidance-distilled base, whose schedule is
  shifted by resolution).
  """
  keep_heads: float = 0.5
  keep_mlp: float = 0.3125
  keep_double: int = 13
  keep_single: int = 27
  downsample: tuple[int, int] | None = (4, -5)
  num_steps: int = 4
  image_seq_len: int = 1024


NANOFLUX = Recipe()
# Half the student's blocks: a ~1.2B model with the same widths, for checking
# that the export's peak memory is set by the chunk, not by the model.
NANOFLUX_HALF = dataclasses.replace(NANOFLUX, keep_double=6, keep_single=13)


def _first(n: int, frac: float) -> np.ndarray:
  keep = np.zeros(n, np.float32)
  keep[:max(1, int(round(n * frac)))] = 1
  return keep


def compressed_shapes(cfg: FluxConfig, recipe: Recipe
                      ) -> tuple[FluxConfig, dict]:
  """(student config, student param shapes) from `cfg` by `recipe`.

  Every step is a `compress` call on abstract params, so nothing of `cfg`'s
  size is allocated.
  """
  shapes = flux_lib.param_shapes(cfg)
  box = {}

  def run(fn, params):
    def body(p):
      box['cfg'], out = fn(p)
      return out
    out = jax.eval_shape(body, params)
    return box['cfg'], out

  # Head / MLP pruning and block removal in one `prune` (remove_blocks is
  # prune with block flags only; its mask is built with jnp, which cannot
  # run inside the shape trace).
  blocks = lambda n, k: (np.arange(n) < k).astype(np.float32)
  mask = compress.PruneMask(
      double_heads=tuple(_first(n, recipe.keep_heads)
                         for n in cfg.double_heads),
      double_mlp_img=tuple(_first(n, recipe.keep_mlp)
                           for n in cfg.double_mlp_img),
      double_mlp_txt=tuple(_first(n, recipe.keep_mlp)
                           for n in cfg.double_mlp_txt),
      single_heads=tuple(_first(n, recipe.keep_heads)
                         for n in cfg.single_heads),
      single_mlp=tuple(_first(n, recipe.keep_mlp) for n in cfg.single_mlp),
      double_blocks=blocks(cfg.depth, recipe.keep_double),
      single_blocks=blocks(cfg.depth_single_blocks, recipe.keep_single))
  cfg, shapes = run(lambda p: compress.prune(cfg, p, mask), shapes)
  if cfg.modulation == 'adaln':
    ts = tuple(sampling.schedule_for(cfg, recipe.num_steps,
                                     recipe.image_seq_len)[:-1])
    pooled = jax.ShapeDtypeStruct((2, cfg.vec_in_dim), jnp.float32)
    box2 = {}

    def static(p, y):
      box2['cfg'], out = compress.to_static_modulation(
          cfg, p, ts, y,
          guidance=DEFAULT_GUIDANCE if cfg.guidance_embed else None)
      return out
    shapes = jax.eval_shape(static, shapes, pooled)
    cfg = box2['cfg']
  if recipe.downsample is not None:
    start, end = recipe.downsample
    end = end % cfg.num_blocks
    cfg, shapes = run(lambda p: compress.add_downsampler(
        cfg, p, start, end, jax.random.key(0)), shapes)
  return cfg, shapes


def nanoflux_student(recipe: Recipe = NANOFLUX,
                     base: FluxConfig | None = None
                     ) -> tuple[FluxConfig, dict]:
  """FLUX.1-schnell compressed by `recipe` (default: ~2.4B DiT params)."""
  return compressed_shapes(base or FluxConfig.schnell(), recipe)

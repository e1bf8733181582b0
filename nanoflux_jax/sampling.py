"""Rectified-flow sampling: latent packing, position ids, schedules, Euler loop.

Conventions match BFL's `flux.sampling` and diffusers' FluxPipeline:
latents [B, C, h, w] are packed into 2x2 patches [B, (h/2)(w/2), 4C] in the
order "b c (h ph) (w pw) -> b (h w) (c ph pw)"; image ids are (0, row, col)
on the patch grid, text ids are zero; the schedule runs from t=1 (noise) to
t=0 (data) and the Euler step is x += (t_next - t) * v.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models.flux import Flux

Array = jax.Array


def pack(latents: Array) -> Array:
  """[B, C, h, w] -> [B, (h/2)(w/2), 4C] (2x2 patches)."""
  b, c, h, w = latents.shape
  if h % 2 or w % 2:
    raise ValueError(f'pack: latent size {h}x{w} must be even')
  x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: Array, h: int, w: int) -> Array:
  """[B, (h/2)(w/2), 4C] -> [B, C, h, w], the inverse of `pack`."""
  b, n, d = x.shape
  if n != (h // 2) * (w // 2):
    raise ValueError(f'unpack: {n} tokens do not form a {h // 2}x{w // 2} grid')
  x = x.reshape(b, h // 2, w // 2, d // 4, 2, 2)
  return x.transpose(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(batch: int, grid_h: int, grid_w: int) -> Array:
  """[B, grid_h * grid_w, 3] ids (0, row, col) of the packed token grid."""
  rows = jnp.broadcast_to(jnp.arange(grid_h)[:, None], (grid_h, grid_w))
  cols = jnp.broadcast_to(jnp.arange(grid_w)[None, :], (grid_h, grid_w))
  ids = jnp.stack([jnp.zeros_like(rows), rows, cols], -1).astype(jnp.float32)
  return jnp.broadcast_to(ids.reshape(1, -1, 3), (batch, grid_h * grid_w, 3))


def text_ids(batch: int, length: int) -> Array:
  """[B, T, 3] zeros: text tokens carry no position in FLUX's RoPE."""
  return jnp.zeros((batch, length, 3), jnp.float32)


def time_shift(mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
  """BFL's resolution-dependent shift exp(mu) / (exp(mu) + (1/t - 1)^sigma)."""
  with np.errstate(divide='ignore'):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_mu(image_seq_len: int, base_shift: float = 0.5,
             max_shift: float = 1.15, base_len: int = 256,
             max_len: int = 4096) -> float:
  """mu interpolated linearly in the image token count (BFL / diffusers)."""
  m = (max_shift - base_shift) / (max_len - base_len)
  return image_seq_len * m + base_shift - m * base_len


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5,
                 max_shift: float = 1.15, shift: bool = True) -> list[float]:
  """num_steps + 1 timesteps from 1 to 0, as BFL's `get_schedule`.

  schnell: shift=False (plain linspace); dev: shift=True.
  """
  if num_steps < 1:
    raise ValueError(f'get_schedule: num_steps={num_steps} must be >= 1')
  t = np.linspace(1, 0, num_steps + 1, dtype=np.float64)
  if shift:
    t = time_shift(shift_mu(image_seq_len, base_shift, max_shift), 1.0, t)
  return [float(v) for v in t]


def schedule_for(config: FluxConfig, num_steps: int,
                 image_seq_len: int) -> list[float]:
  """The model's default schedule: dev-style shift iff it has guidance."""
  return get_schedule(num_steps, image_seq_len, shift=config.guidance_embed)


@functools.partial(jax.jit, static_argnums=0, static_argnames='img_grid')
def denoise(config: FluxConfig, params, img: Array, img_ids: Array,
            txt: Array, txt_ids: Array, y: Array | None, timesteps: Array,
            guidance: Array | None = None,
            img_grid: tuple[int, int] | None = None) -> Array:
  """Euler integration of the flow from timesteps[0] to timesteps[-1].

  One jitted function: the steps run in a lax.fori_loop, and the schedule is
  an argument, so a new schedule of the same length does not recompile.

  Args:
    img: [B, L, in_channels] packed noise at timesteps[0].
    timesteps: [n + 1] decreasing timesteps.
    guidance: [B] guidance scale, for guidance-distilled models.
    img_grid: (h, w) packed token grid; needed by token down-sampling models.
  Returns:
    [B, L, in_channels] float32 packed latents at timesteps[-1].
  """
  model = Flux(config)
  batch = img.shape[0]
  timesteps = jnp.asarray(timesteps, jnp.float32)

  def step(i, x):
    t, t_next = timesteps[i], timesteps[i + 1]
    v = model.apply({'params': params}, img=x, img_ids=img_ids, txt=txt,
                    txt_ids=txt_ids, timesteps=jnp.full((batch,), t), y=y,
                    guidance=guidance, img_grid=img_grid)
    return x + (t_next - t) * v.astype(jnp.float32)

  return jax.lax.fori_loop(0, timesteps.shape[0] - 1, step,
                           img.astype(jnp.float32))

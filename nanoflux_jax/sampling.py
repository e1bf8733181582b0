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


def schedule_for(config: FluxConfig, num_steps: int,
                 image_seq_len: int) -> list[float]:
  """The sampling timesteps of `config`: the one place they are computed.

  BFL's rule (`flux.sampling.get_schedule`, `shift=` set by the model name):
  num_steps + 1 timesteps from 1 (noise) to 0 (data), evenly spaced for a
  timestep-distilled model (schnell: no guidance embedder) and
  resolution-shifted for a guidance-distilled one (dev: guidance_embed),
  t -> time_shift(shift_mu(image_seq_len), 1, t). Every sampler, trainer,
  static-modulation table and export asks here, so a dev teacher is
  distilled on the schedule its pipeline samples.

  A static-modulation model keeps the timesteps its tables were built for
  (`to_static_modulation` drops guidance_embed, so the rule can no longer
  tell a dev-derived table from a schnell one): with S table rows and S / k
  steps it samples every k-th row (a fewer-step schedule of either rule is
  a subset of the S-step one at the same resolution), then 0. A step count
  that does not divide S falls back to the rule, and the model maps each
  timestep to its nearest row.

  Args:
    config: the denoiser's config; reads `guidance_embed`, and for a
      static-modulation model `static_timesteps`.
    num_steps: Euler steps (>= 1).
    image_seq_len: packed image tokens (grid_h * grid_w), mu's input.
  Returns:
    [num_steps + 1] Python floats, decreasing from 1.0 (the table's first
    row for a static model) to 0.0.
  """
  if num_steps < 1:
    raise ValueError(f'schedule_for: num_steps={num_steps} must be >= 1')
  table = config.static_timesteps if config.modulation == 'static' else ()
  if table and len(table) % num_steps == 0:
    return [float(v) for v in table[::len(table) // num_steps]] + [0.0]
  t = np.linspace(1, 0, num_steps + 1, dtype=np.float64)
  if config.guidance_embed:
    t = time_shift(shift_mu(image_seq_len), 1.0, t)
  return [float(v) for v in t]


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=('img_grid', 'record'))
def trajectory(config: FluxConfig, params, noise: Array, txt: Array,
               y: Array | None, timesteps: Array, guidance: Array | None = None,
               *, img_grid: tuple[int, int] | None = None,
               img_ids: Array | None = None, txt_ids: Array | None = None,
               record: bool = True
               ) -> tuple[Array | None, Array | None, Array]:
  """The Euler rollout: every sampler, teacher cache and calibration set.

  One jitted lax.scan; the schedule is an argument, so a new schedule of the
  same length does not recompile.

  Args:
    noise: [B, L, in_channels] packed x at timesteps[0].
    txt: [B, T, context] text embeddings; y: [B, vec] pooled vector (None
      for static-modulation models).
    timesteps: [n + 1] decreasing timesteps.
    guidance: [B] guidance scale, for guidance-embedded models.
    img_grid: (h, w) packed token grid: the image ids when img_ids is not
      given, and the grid token down-sampling models need.
    img_ids, txt_ids: [B, L, 3] / [B, T, 3] position ids; default the
      grid's image ids and zero text ids.
    record: False keeps only the final sample (no [B, n, L, C] buffers).
  Returns:
    (xs [B, n, L, C] the state at timesteps[k], vs [B, n, L, C] the velocity
    there, x_final [B, L, C] the sample at timesteps[-1]), float32; xs and
    vs are None without `record`.
  """
  b = noise.shape[0]
  if img_ids is None:
    if img_grid is None:
      raise ValueError('trajectory: pass img_grid or img_ids')
    img_ids = image_ids(b, *img_grid)
  if txt_ids is None:
    txt_ids = text_ids(b, txt.shape[1])
  model = Flux(config)
  ts = jnp.asarray(timesteps, jnp.float32)

  def step(x, k):
    v = model.apply({'params': params}, img=x, img_ids=img_ids, txt=txt,
                    txt_ids=txt_ids, timesteps=jnp.full((b,), ts[k]), y=y,
                    guidance=guidance, img_grid=img_grid).velocity
    v = v.astype(jnp.float32)
    return x + (ts[k + 1] - ts[k]) * v, (x, v) if record else None

  x_final, rec = jax.lax.scan(step, noise.astype(jnp.float32),
                              jnp.arange(ts.shape[0] - 1))
  if not record:
    return None, None, x_final
  xs, vs = rec
  return jnp.swapaxes(xs, 0, 1), jnp.swapaxes(vs, 0, 1), x_final


def denoise(config: FluxConfig, params, img: Array, img_ids: Array,
            txt: Array, txt_ids: Array, y: Array | None, timesteps: Array,
            guidance: Array | None = None,
            img_grid: tuple[int, int] | None = None) -> Array:
  """Euler integration of the flow from timesteps[0] to timesteps[-1]:
  `trajectory` without the per-step records.

  Args:
    img: [B, L, in_channels] packed noise at timesteps[0].
    timesteps: [n + 1] decreasing timesteps.
    guidance: [B] guidance scale, for guidance-distilled models.
    img_grid: (h, w) packed token grid; needed by token down-sampling models.
  Returns:
    [B, L, in_channels] float32 packed latents at timesteps[-1].
  """
  return trajectory(config, params, img, txt, y, timesteps, guidance,
                    img_grid=None if img_grid is None else tuple(img_grid),
                    img_ids=img_ids, txt_ids=txt_ids, record=False)[2]

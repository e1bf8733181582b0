"""Measuring one stage of the ladder: size, FLOPs, forward latency and its
samples (the same prompts and noise for every stage)."""
from __future__ import annotations

import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import compress
from nanoflux_jax import images
from nanoflux_jax import sampling
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.evaluate import metrics
from nanoflux_jax.ladder import rungs as rungs_lib
from nanoflux_jax.ladder.rungs import Context, Student
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.models import flux as flux_lib


def forward_ms(ctx: Context, student: Student, repeats: int) -> float:
  """Median ms of a jitted batch-1 forward (compile + one warm-up excluded)."""
  cfg, params = student
  (h, w), t = ctx.grid, ctx.config.distill.data.txt_len
  x = dict(img=jnp.zeros((1, h * w, cfg.in_channels)),
           img_ids=sampling.image_ids(1, h, w), txt_ids=sampling.text_ids(1, t),
           txt=jnp.zeros((1, t, cfg.context_in_dim)),
           timesteps=jnp.full((1,), 0.5), y=jnp.zeros((1, cfg.vec_in_dim)))
  fwd = jax.jit(functools.partial(flux_lib.Flux(cfg).apply,
                                  img_grid=rungs_lib.img_grid(cfg, ctx.grid)))
  times = []
  for _ in range(max(1, repeats) + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd({'params': params}, **x))
    times.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(times[1:])


def sample(ctx: Context, stage: Stage, student: Student) -> np.ndarray:
  """Final latents [N, L, C] for the fixed sample prompts and noise."""
  cfg, params = student
  s = ctx.config.samples
  prompts = data_lib.load_prompts(s.prompts)[:s.num]
  emb = ctx.embed(prompts)
  h, w = ctx.grid
  n = len(prompts)
  noise = np.random.default_rng(s.seed).standard_normal(
      (n, h * w, cfg.in_channels), np.float32)
  out = sampling.denoise(
      cfg, params, jnp.asarray(noise), sampling.image_ids(n, h, w),
      jnp.asarray(emb['txt']), sampling.text_ids(n, emb['txt'].shape[1]),
      jnp.asarray(emb['y']), jnp.asarray(stage.schedule, jnp.float32),
      img_grid=rungs_lib.img_grid(cfg, ctx.grid))
  return np.asarray(out)


def latent_preview(latents: np.ndarray, grid, scale: int = 8) -> np.ndarray:
  """Packed latents [N, L, C] -> uint8 [N, H, W, 3] from latent channels 0-2.

  A fixed value range (+-2.5) rather than per-image normalisation keeps the
  rungs' grids comparable. Real runs can decode with a VAE instead.
  """
  gh, gw = grid
  x = np.asarray(sampling.unpack(jnp.asarray(latents), 2 * gh, 2 * gw))
  x = x[:, :3].transpose(0, 2, 3, 1)
  if x.shape[-1] < 3:
    x = np.concatenate([x] + [x[..., :1]] * (3 - x.shape[-1]), -1)
  x = np.clip((x + 2.5) / 5.0 * 255.0, 0, 255).astype(np.uint8)
  return x.repeat(scale, 1).repeat(scale, 2)


def sample_images(ctx: Context, latents: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3]: decoded by the teacher pipeline's VAE, else latent
  previews."""
  if ctx.pipeline is None:
    return latent_preview(latents, ctx.grid, ctx.config.samples.scale)
  return np.asarray(ctx.pipeline.decode_latents(
      jnp.asarray(latents), ctx.resolution, ctx.resolution))


def sample_psnr(ctx: Context, latents: np.ndarray) -> float | None:
  """PSNR (dB) of the sample images against the teacher's (same noise);
  None without a teacher pipeline."""
  if ctx.pipeline is None:
    return None
  reference = np.load(teacher_latents_file(ctx.workdir))
  return float(metrics.psnr(sample_images(ctx, latents),
                            sample_images(ctx, reference)))


def teacher_latents_file(workdir: str) -> str:
  return os.path.join(workdir, 'samples', 'teacher_latents.npy')


def measure(ctx: Context, stage: Stage, student: Student, name: str,
             workdir: str, reference: np.ndarray | None
             ) -> tuple[dict, np.ndarray]:
  """(report row, sample latents); writes samples/{name}.png."""
  cfg, _ = student
  h, w = ctx.grid
  t = ctx.config.distill.data.txt_len
  latents = sample(ctx, stage, student)
  png = os.path.join('samples', f'{name}.png')
  if jax.process_index() == 0:
    images.save_grid(sample_images(ctx, latents), os.path.join(workdir, png))
  mse = 0.0 if reference is None else np.mean(np.square(latents - reference))
  return dict(name=name, params=int(compress.count_params(cfg)),
              gflops=compress.count_flops(cfg, h * w, t) / 1e9,
              ms=forward_ms(ctx, student, ctx.config.timing.repeats),
              device=jax.devices()[0].device_kind, sample_mse=float(mse),
              sample_psnr=None if reference is None else sample_psnr(
                  ctx, latents),
              samples=png), latents

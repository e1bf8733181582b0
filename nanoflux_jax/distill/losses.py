"""Distillation and rectified-flow losses, and timestep sampling.

All losses reduce in float32 whatever the compute dtype: squared bf16
differences of near-equal velocities underflow and the mean of millions of
terms loses precision in bf16.

Conventions (BFL / diffusers): t=1 is noise, t=0 is data, x_t =
(1 - t) x0 + t noise, and the model predicts the velocity v = noise - x0, so
an Euler step from t to t' < t is x += (t' - t) v.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_EPS = 1e-6


def mse(a: Array, b: Array, mask: Array | None = None) -> Array:
  """Mean squared error in fp32; `mask` [B, L] averages over kept tokens only.

  Args:
    a, b: [B, L, ...] arrays.
    mask: optional [B, L] (1 keep, 0 drop); broadcast over trailing dims.
  Returns:
    scalar float32.
  """
  d = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
  if mask is None:
    return d.mean()
  m = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (d.ndim - 2))
  m = jnp.broadcast_to(m, d.shape)
  return (d * m).sum() / jnp.maximum(m.sum(), 1.0)


def output_kd(student_v: Array, teacher_v: Array) -> Array:
  """Output distillation: MSE between velocities [B, L, C] -> scalar."""
  return mse(student_v, jax.lax.stop_gradient(teacher_v))


def normalized_feature_loss(student: Array, teacher: Array) -> Array:
  """||s - t||^2 / ||t||^2 per example, averaged over the batch.

  Normalising by the teacher feature norm makes every block pair contribute
  on the same scale, although FLUX's residual stream grows with depth.

  Args:
    student, teacher: [B, L, D] features (student already projected).
  Returns:
    scalar float32.
  """
  s = student.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  axes = tuple(range(1, s.ndim))
  num = jnp.square(s - t).sum(axes)
  den = jnp.square(t).sum(axes)
  return (num / (den + _EPS)).mean()


class FeatureProjection(nn.Module):
  """One learned linear map per (student block, teacher block) pair.

  Only created where the widths differ; equal widths compare directly. The
  params live in the train state next to the student's (`params['proj']`).
  """
  pairs: tuple[tuple[int, int], ...]
  student_dim: int
  teacher_dim: int

  @nn.compact
  def __call__(self, feats: Sequence[Array]) -> list[Array]:
    """feats: one [B, L, student_dim] per pair -> [B, L, teacher_dim] each."""
    if self.student_dim == self.teacher_dim:
      return list(feats)
    out = []
    for (s, t), f in zip(self.pairs, feats):
      dense = nn.Dense(
          self.teacher_dim, name=f'proj_{s}_{t}', dtype=f.dtype,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), ('embed', None)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 (None,)))
      out.append(dense(f))
    return out


def feature_kd(student_feats: Sequence[Array], teacher_feats: Sequence[Array],
               pairs: Sequence[tuple[int, int]],
               project=None) -> Array:
  """Feature distillation over mapped block pairs, mean over pairs.

  Args:
    student_feats, teacher_feats: per-block [B, L, D] features (Flux's
      `return_intermediates` 'img' tuple: double blocks first, then single).
    pairs: (student block, teacher block) global indices.
    project: optional callable list[[B, L, Ds]] -> list[[B, L, Dt]] (a bound
      FeatureProjection); None compares the features directly.
  Returns:
    scalar float32; 0 with no pairs.
  """
  if not pairs:
    return jnp.zeros((), jnp.float32)
  for s, t in pairs:
    if not (0 <= s < len(student_feats) and 0 <= t < len(teacher_feats)):
      raise ValueError(f'feature_kd: pair ({s}, {t}) out of range; student '
                       f'has {len(student_feats)} blocks, teacher '
                       f'{len(teacher_feats)}')
  fs = [student_feats[s] for s, _ in pairs]
  if project is not None:
    fs = project(fs)
  terms = [normalized_feature_loss(f, teacher_feats[t])
           for f, (_, t) in zip(fs, pairs)]
  return sum(terms) / len(terms)


def interpolate(x0: Array, noise: Array, t: Array) -> Array:
  """x_t = (1 - t) x0 + t noise, t [B] broadcast over [B, ...]."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - 1)).astype(jnp.float32)
  return (1.0 - t) * x0.astype(jnp.float32) + t * noise.astype(jnp.float32)


def rf_target(x0: Array, noise: Array) -> Array:
  """The rectified-flow velocity target v = noise - x0."""
  return noise.astype(jnp.float32) - x0.astype(jnp.float32)


def rectified_flow(v_pred: Array, x0: Array, noise: Array) -> Array:
  """Flow-matching loss MSE(v_pred, noise - x0) for x_t = interpolate(...)."""
  return mse(v_pred, rf_target(x0, noise))


def sample_timesteps(rng: Array, batch: int, schedule: Sequence[float],
                     mode: str = 'schedule', logit_mean: float = 0.0,
                     logit_std: float = 1.0, schedule_prob: float = 0.5
                     ) -> tuple[Array, Array, Array]:
  """Training timesteps.

  Args:
    rng: PRNG key.
    batch: B.
    schedule: the sampler's n + 1 timesteps from 1 to 0; training uses the n
      points where the model is evaluated (all but the last).
    mode: 'schedule' (uniform over those points), 'logit_normal'
      (sigmoid(N(logit_mean, logit_std)), SD3-style) or 'mixed' (each example
      from the schedule with probability schedule_prob, else logit-normal).
  Returns:
    (t [B] float32, index [B] int32 of the schedule point (the nearest one
    for logit-normal examples), on_schedule [B] bool).
  """
  points = jnp.asarray(schedule[:-1], jnp.float32)
  n = points.shape[0]
  k_idx, k_ln, k_mix = jax.random.split(rng, 3)
  idx = jax.random.randint(k_idx, (batch,), 0, n)
  t_sched = points[idx]
  t_ln = jax.nn.sigmoid(logit_mean + logit_std *
                        jax.random.normal(k_ln, (batch,), jnp.float32))
  if mode == 'schedule':
    on = jnp.ones((batch,), bool)
  elif mode == 'logit_normal':
    on = jnp.zeros((batch,), bool)
  elif mode == 'mixed':
    on = jax.random.uniform(k_mix, (batch,)) < schedule_prob
  else:
    raise ValueError(f'sample_timesteps: unknown mode {mode!r}; expected '
                     "'schedule', 'logit_normal' or 'mixed'")
  t = jnp.where(on, t_sched, t_ln)
  nearest = jnp.argmin(jnp.abs(t[:, None] - points[None]), -1)
  idx = jnp.where(on, idx, nearest).astype(jnp.int32)
  return t, idx, on


def weighted_total(terms: Mapping[str, Array],
                   weights: Mapping[str, float]) -> Array:
  """sum_k weights[k] * terms[k] over the terms with a non-zero weight."""
  total = jnp.zeros((), jnp.float32)
  for k, v in terms.items():
    w = float(weights.get(k, 0.0))
    if w:
      total = total + w * v
  return total

"""Sensitivity of the teacher to removing each head, MLP channel and block.

Calibration data are points x_t on the teacher's own sampling trajectories
(`calibration_set`), so scores measure damage where the sampler goes.
Criteria (registry `CRITERIA`, extend with `register`), all returning a
`PruneMask` of float scores where LOW means "safe to remove":
  loss      increase of the output MSE vs the teacher when one unit (or one
            group of MLP channels) is removed; every candidate runs under one
            jit through lax.map over candidate masks.
  taylor    |sum over the unit's weights of w * dL/dw| = |dL/dmask| at mask 1,
            the first-order estimate of the loss change on removal; L is the
            MSE to the straight-path flow target (noise - x_0) of the
            trajectory when calib has 'target', else ||f(x)||^2.
  block_io  1 - cos(block input, block output) over tokens, for depth only
            (head/MLP scores are NaN).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from nanoflux_jax import sampling
from nanoflux_jax.compress.masks import PruneMask, apply_masks
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models.flux import Flux

Array = jax.Array
_MODEL_KEYS = ('img', 'img_ids', 'txt', 'txt_ids', 'timesteps', 'y',
               'guidance')
CRITERIA: dict[str, Callable] = {}


def register(name: str):
  """Decorator adding fn(cfg, params, calib, **kw) -> PruneMask to CRITERIA."""
  def deco(fn):
    CRITERIA[name] = fn
    return fn
  return deco


def _inputs(calib: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in calib.items() if k in _MODEL_KEYS}


def _forward(cfg, params, inputs, img_grid, **kw):
  """Flux(cfg)'s FluxOutput on the calibration inputs."""
  return Flux(cfg).apply({'params': params}, **inputs, img_grid=img_grid, **kw)


def calibration_set(cfg: FluxConfig, params: dict, key: Array, n: int,
                    num_steps: int = 4, img_grid: tuple[int, int] = (4, 4),
                    txt_len: int = 8, guidance: float | None = None,
                    schedule=None, txt=None, y=None) -> dict:
  """Samples n trajectories of the teacher and returns every step's input.

  Noise is standard normal; so are the text embeddings and pooled vectors
  unless real prompts' `txt` [n, T, ctx] and `y` [n, vec] are given.

  Returns:
    dict of arrays with N = n * num_steps rows: img [N, L, in_channels] (x_t),
    img_ids [N, L, 3], txt [N, T, ctx], txt_ids [N, T, 3], timesteps [N], y
    [N, vec] (adaln models), guidance [N] (guidance models), target
    [N, L, in_channels] = noise - x_0 of the trajectory.
  """
  if n < 1 or num_steps < 1:
    raise ValueError(f'calibration_set: n={n} and num_steps={num_steps} must '
                     'be >= 1')
  h, w = img_grid
  length = h * w
  k_img, k_txt, k_y = jax.random.split(key, 3)
  noise = jax.random.normal(k_img, (n, length, cfg.in_channels))
  if txt is None:
    txt = jax.random.normal(k_txt, (n, txt_len, cfg.context_in_dim))
  txt = jnp.asarray(txt)
  txt_len = txt.shape[1]
  if cfg.modulation != 'adaln':
    y = None
  elif y is None:
    y = jax.random.normal(k_y, (n, cfg.vec_in_dim))
  g = None
  if cfg.guidance_embed:
    if guidance is None:
      raise ValueError('calibration_set: a guidance model needs guidance=')
    g = jnp.full((n,), guidance, jnp.float32)
  img_ids, txt_ids = sampling.image_ids(n, h, w), sampling.text_ids(n, txt_len)
  ts = list(schedule if schedule is not None else
            sampling.schedule_for(cfg, num_steps, length))
  if len(ts) != num_steps + 1:
    raise ValueError(f'calibration_set: schedule has {len(ts)} points, '
                     f'expected num_steps + 1 = {num_steps + 1}')
  xs, _, x = sampling.trajectory(cfg, params, noise, txt, y,
                                 jnp.asarray(ts, jnp.float32), g,
                                 img_grid=tuple(img_grid))
  rep = lambda a: jnp.concatenate([a] * num_steps, axis=0)
  # [n, steps, ...] -> [steps * n, ...]: step-major, as the timesteps.
  out = dict(img=jnp.swapaxes(xs, 0, 1).reshape(-1, *xs.shape[2:]),
             img_ids=rep(img_ids), txt=rep(txt),
             txt_ids=rep(txt_ids), target=rep(noise - x),
             timesteps=jnp.repeat(jnp.asarray(ts[:-1], jnp.float32), n))
  if y is not None:
    out['y'] = rep(y)
  if g is not None:
    out['guidance'] = rep(g)
  return out


# ----------------------------------------------------------------------------
# Criteria.
# ----------------------------------------------------------------------------
def _group_ids(cfg: FluxConfig, mlp_groups: int | None):
  """Flat [U] group id of every unit, the group count, and `unravel`."""
  _, unravel = ravel_pytree(PruneMask.ones(cfg))
  counter = [0]

  def ids(n, groups=None):
    k = n if groups is None else min(groups, n)
    out = counter[0] + (np.arange(n) * k) // n
    counter[0] += k
    return jnp.asarray(out, jnp.int32)

  gm = PruneMask(
      double_heads=tuple(ids(h) for h in cfg.double_heads),
      double_mlp_img=tuple(ids(m, mlp_groups) for m in cfg.double_mlp_img),
      double_mlp_txt=tuple(ids(m, mlp_groups) for m in cfg.double_mlp_txt),
      single_heads=tuple(ids(h) for h in cfg.single_heads),
      single_mlp=tuple(ids(m, mlp_groups) for m in cfg.single_mlp),
      double_blocks=ids(cfg.depth), single_blocks=ids(cfg.depth_single_blocks))
  flat, _ = ravel_pytree(gm)
  return flat.astype(jnp.int32), counter[0], unravel


@register('loss')
def loss_scores(cfg: FluxConfig, params: dict, calib: dict, *,
                img_grid=None, mlp_groups: int | None = None,
                batch_size: int | None = None) -> PruneMask:
  """Output MSE vs the teacher with each unit removed alone.

  mlp_groups: score MLP channels in this many contiguous groups per MLP (the
    group's score goes to each of its channels); None scores every channel
    (one forward per channel: fine for small models only).
  batch_size: candidates vmapped together inside lax.map (memory vs speed).
  """
  inputs = _inputs(calib)
  gid, n_groups, unravel = _group_ids(cfg, mlp_groups)

  @jax.jit
  def run(params, inputs):
    teacher = _forward(cfg, params, inputs, img_grid).velocity.astype(
        jnp.float32)

    def one(g):
      mask = unravel((gid != g).astype(jnp.float32))
      out = _forward(cfg, apply_masks(params, mask, cfg), inputs,
                     img_grid).velocity
      return jnp.mean(jnp.square(out.astype(jnp.float32) - teacher))

    per_group = jax.lax.map(one, jnp.arange(n_groups), batch_size=batch_size)
    return unravel(per_group[gid])
  return run(params, inputs)


@register('taylor')
def taylor_scores(cfg: FluxConfig, params: dict, calib: dict, *,
                  img_grid=None) -> PruneMask:
  """|dL/dmask| at the unmasked model: |sum_unit w * dL/dw|."""
  inputs = _inputs(calib)
  target = calib.get('target')

  @jax.jit
  def run(params, inputs, target):
    def loss(mask):
      out = _forward(cfg, apply_masks(params, mask, cfg), inputs,
                     img_grid).velocity.astype(jnp.float32)
      ref = 0.0 if target is None else target.astype(jnp.float32)
      return jnp.mean(jnp.square(out - ref))
    return jax.tree.map(jnp.abs, jax.grad(loss)(PruneMask.ones(cfg)))
  return run(params, inputs, None if target is None else jnp.asarray(target))


def _one_minus_cos(a: Array, b: Array) -> Array:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) *
                              jnp.linalg.norm(b, axis=-1) + 1e-12)
  return jnp.mean(1.0 - cos)


@register('block_io')
def block_io_scores(cfg: FluxConfig, params: dict, calib: dict, *,
                    img_grid=None) -> PruneMask:
  """1 - cos(input, output) of each block over its txt + img tokens.

  Where the down-sampler changes the image token count between a block's
  input and output (its first and last block), only text tokens are compared.
  """
  inputs = _inputs(calib)

  @jax.jit
  def run(params, inputs):
    feats = _forward(cfg, params, inputs, img_grid,
                     return_intermediates=True).intermediates
    dense = lambda p, x: x @ p['kernel'] + p['bias']
    prev = (dense(params['img_in'], inputs['img']),
            dense(params['txt_in'], inputs['txt']))
    scores = []
    for im, tx in zip(feats['img'], feats['txt']):
      if im.shape == prev[0].shape:
        scores.append(_one_minus_cos(jnp.concatenate([prev[1], prev[0]], 1),
                                     jnp.concatenate([tx, im], 1)))
      else:
        scores.append(_one_minus_cos(prev[1], tx))
      prev = (im, tx)
    scores = jnp.stack(scores)
    nan = PruneMask.full(cfg, jnp.nan)
    return nan.replace(double_blocks=scores[:cfg.depth],
                       single_blocks=scores[cfg.depth:])
  return run(params, inputs)


def sensitivity(cfg: FluxConfig, params: dict, calib: dict,
                criterion: str = 'loss', **kw) -> PruneMask:
  """Scores every unit with `CRITERIA[criterion]` (low = least important).

  Args:
    calib: dict from `calibration_set` (or the same keys from real data).
    **kw: criterion options, e.g. img_grid=(h, w) for down-sampling models,
      mlp_groups / batch_size for 'loss'.
  """
  if criterion not in CRITERIA:
    raise ValueError(f'sensitivity: unknown criterion {criterion!r}; '
                     f'registered: {sorted(CRITERIA)}')
  missing = [k for k in ('img', 'img_ids', 'txt', 'txt_ids', 'timesteps')
             if k not in calib]
  if missing:
    raise ValueError(f'sensitivity: calib lacks keys {missing}')
  # The scores (one float per unit) are the only thing fetched to the host,
  # explicitly: the params stay where they are (sharded or not).
  return jax.device_get(CRITERIA[criterion](cfg, params, calib, **kw))


"""Per-device byte accounting on shapes, for the memory plan (memory_plan.py).

Every count is the shard of an array on one device (`NamedSharding.
shard_shape`) of trees built under `jax.eval_shape`: a rung's student (its
kind's `shapes` transform, run by `shaped`), a block's activations
(`activation_bytes`) and FSDP's whole-tensor copies (`gathered_bytes`).
Nothing is allocated, and the mesh may be an `AbstractMesh` of any size
(`abstract_mesh`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models import scan_blocks


GIB = 1024 ** 3
ITEM_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


# ---------------------------------------------------------------------------
# Bytes of sharded abstract trees.
# ---------------------------------------------------------------------------
def abstract_mesh(spec, num_devices: int) -> AbstractMesh:
  """A (data, fsdp, tensor) AbstractMesh of num_devices (no devices needed)."""
  shape = parallel.mesh_shape(spec, num_devices)
  return AbstractMesh(shape, parallel.MESH_AXES)


def shard_bytes(x, sharding) -> int:
  """Bytes of x's shard on one device."""
  shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else (
      x.shape)
  return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def tree_bytes(tree, shardings=None) -> int:
  """Per-device bytes of an abstract (or concrete) tree under shardings."""
  leaves = jax.tree.leaves(tree)
  shs = ([None] * len(leaves) if shardings is None else
         jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(
             s, NamedSharding)))
  return sum(shard_bytes(x, s) for x, s in zip(leaves, shs))


def largest(tree, shardings, prefix: str = '') -> tuple[int, str]:
  """(per-device bytes, 'path [shape] dtype') of the largest shard."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  shs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(
      s, NamedSharding))
  best = (0, '')
  for (path, x), s in zip(flat, shs):
    b = shard_bytes(x, s)
    if b > best[0]:
      name = jax.tree_util.keystr(path, simple=True, separator='/')
      best = (b, f'{prefix}{name} {list(x.shape)} {np.dtype(x.dtype).name}')
  return best


# ---------------------------------------------------------------------------
# Students on shapes (a rung kind's `shapes` runs under `shaped`).
# ---------------------------------------------------------------------------
def abstract_params(cfg: FluxConfig, dtype: str | None):
  """The params of a Flux(cfg) as ShapeDtypeStructs; dtype: cast to it."""
  shapes = flux_lib.param_shapes(cfg)
  if dtype is None:
    return shapes
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def shaped(fn: Callable[..., tuple[Any, Any]], *args) -> tuple[Any, Any]:
  """jax.eval_shape of fn(*args) -> (arrays, static): (the arrays' shapes,
  static as fn returned it).

  `static` is any Python value fn computes besides arrays (a config, a
  stage), which eval_shape cannot return itself: a compression transform
  on abstract params gives its new config this way.
  """
  box = []

  def run(*a):
    out, static = fn(*a)
    box.append(static)
    return out
  out = jax.eval_shape(run, *args)
  return out, box[0]


# ---------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------
def _blocks(cfg: FluxConfig, img_len: int, txt_len: int):
  """[(kind, index, heads, mlp widths, img tokens)] of every block."""
  out = []
  f2 = cfg.downsample_factor ** 2
  for g in range(cfg.num_blocks):
    down = (cfg.downsample_start is not None and
            cfg.downsample_start <= g <= cfg.downsample_end)
    li = img_len // f2 if down else img_len
    if g < cfg.depth:
      out.append(('double', cfg.double_heads[g],
                  (cfg.double_mlp_img[g], cfg.double_mlp_txt[g]), li))
    else:
      j = g - cfg.depth
      out.append(('single', cfg.single_heads[j], (cfg.single_mlp[j],), li))
  return out


def tensor_split(n: int, tensor: int) -> int:
  """Per-device share of n heads / channels on the tensor axis (_fit)."""
  return n // tensor if n % tensor == 0 else n


def _block_work(cfg: FluxConfig, heads, mlps, li, lt, b, tensor, act,
                attention: str, backward: bool) -> int:
  """Live bytes while one block runs (forward, or recompute + backward)."""
  d, dh = cfg.hidden_size, cfg.head_dim
  h = tensor_split(heads, tensor)
  length = li + lt
  if len(mlps) == 2:
    m = sum(tensor_split(x, tensor) * (li if i == 0 else lt)
            for i, x in enumerate(mlps))
  else:
    m = tensor_split(mlps[0], tensor) * length
  # Residual in/out, two normalised + modulated copies, q/k/v (and RoPE'd
  # q/k), the attention output, the MLP hidden before and after GELU.
  tok = length * (4 * d + 6 * h * dh) + 2 * m
  work = b * tok * act
  if attention in ('xla', 'batched'):  # [B, H, L, L] logits and probs, fp32.
    work += 2 * b * h * length * length * 4
  elif attention in ('per_head',):
    work += 2 * b * length * length * 4
  return work * (2 if backward else 1)


def activation_bytes(student: FluxConfig, teacher: FluxConfig | None,
                     grid, txt_len: int, micro_batch: int, tensor: int,
                     compute_dtype: str, attention: str, *,
                     num_steps: int = 4, feature_pairs: int = 0,
                     cached_trajectory: bool = False) -> int:
  """Estimated per-device activation bytes of one distillation step.

  Rematerialised student blocks keep their inputs ([b, L, D] each) for the
  backward; one block at a time holds its working set twice (recompute and
  backward). The teacher runs without gradient (its trajectory of
  num_steps forwards, unless cached, plus the output-KD forward), so only
  one block's working set is live, plus the features feature KD compares.
  """
  act = ITEM_BYTES[compute_dtype]
  li = grid[0] * grid[1]
  b = micro_batch
  blocks = _blocks(student, li, txt_len)
  d = student.hidden_size
  saved = sum(b * (x[3] + txt_len) * d * act for x in blocks)
  if not student.remat:  # Every block's working set is kept.
    saved = sum(_block_work(student, x[1], x[2], x[3], txt_len, b, tensor,
                            act, attention, False) for x in blocks)
  peak = max(_block_work(student, x[1], x[2], x[3], txt_len, b, tensor, act,
                         attention, True) for x in blocks)
  # Outputs, targets, trajectory states: a few [b, Li, C] fp32 arrays.
  io = (num_steps + 6) * b * li * student.in_channels * 4
  feats = feature_pairs * b * li * d * act * 2
  t_peak = 0
  if teacher is not None:
    t_peak = max(_block_work(teacher, x[1], x[2], x[3], txt_len, b, tensor,
                             act, attention, False)
                 for x in _blocks(teacher, li, txt_len))
  return int(saved + max(peak, t_peak) + io + feats)


def block_param_counts(cfg: FluxConfig, params) -> list[int]:
  """Params of every block (a scanned run's stack counts once per layer)."""
  out = []
  for kind, a, b in scan_blocks.block_runs(cfg):
    v = params[scan_blocks.run_name(kind, a, b)]
    n = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(v))
    out += [n // (b - a)] * (b - a)
  return out


def gathered_block_bytes(cfg: FluxConfig, params, compute_dtype: str) -> int:
  """The largest block's params gathered whole in the compute dtype (FSDP)."""
  return max(block_param_counts(cfg, params)) * ITEM_BYTES[compute_dtype]


def _gathered_counts(params, shardings) -> dict:
  """{top-level key: elements per device once 'fsdp' is gathered}: the
  other mesh axes (tensor) still split a gathered tensor."""
  out = {}
  for k, v in params.items():
    leaves = jax.tree.leaves(v)
    shs = ([None] * len(leaves) if shardings is None else jax.tree.leaves(
        shardings[k], is_leaf=lambda s: isinstance(s, NamedSharding)))
    n = 0
    for x, sh in zip(leaves, shs):
      shape = list(x.shape)
      if sh is not None:
        for i, axes in enumerate(sh.spec):
          axes = (axes,) if isinstance(axes, str) else (axes or ())
          for a in axes:
            if a != 'fsdp':
              shape[i] //= sh.mesh.shape[a]
      n += int(math.prod(shape))
    out[k] = n
  return out


def gathered_bytes(cfg: FluxConfig, params, compute_dtype: str,
                   grads: bool, shardings=None) -> int:
  """FSDP's transient whole-tensor copies per device during the step.

  Unrolled blocks (scan_blocks=False): XLA keeps every block's gathered
  params (compute dtype) from the forward to the rematerialised backward,
  and (grads=True) the gradients whole in fp32 before their
  reduce-scatter. With `shardings`, a gathered tensor stays split over
  the mesh axes other than 'fsdp' (tensor). Scanned runs (scan_blocks=True,
  remat): the loop body gathers one layer's slice at a time, so all runs
  together hold two blocks' worth (the current one and the next,
  prefetched); blocks outside a run (a run of one) and the embedders are
  charged whole, as unrolled.
  Measured on XLA:CPU (tests/test_memory_plan.py); TPU's latency-hiding
  scheduler may free them sooner, so this errs high.
  """
  counts = _gathered_counts(params, shardings)
  n_all = sum(counts.values())
  if cfg.scan_blocks:
    runs = [(scan_blocks.run_name(k, a, b), b - a)
            for k, a, b in scan_blocks.block_runs(cfg) if b - a > 1]
    if runs:
      stacked = sum(counts[name] for name, _ in runs)
      one = max(counts[name] // n for name, n in runs)
      n_all = n_all - stacked + 2 * one
  return n_all * (ITEM_BYTES[compute_dtype] + (4 if grads else 0))

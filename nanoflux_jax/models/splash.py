"""Pallas splash attention (TPU flash attention) for FLUX's joint sequence.

jax.experimental.pallas.ops.tpu.splash_attention never materialises the
[B, H, L, L] scores, forward or backward (its custom VJP recomputes them per
tile). It wants lengths that are multiples of its tiles and tiles that are
multiples of 128 lanes, and FLUX's text + image sequence has any length
(512 + 4096, 256 + 1024, 24 + 64 in tests). So the sequence is padded to a
multiple of 128 and the padding is masked with segment ids: real tokens are
segment 1, padding segment 0, so no real query sees a padded key (and padded
queries, which are dropped, still see a non-empty row: no NaNs).

Under a mesh (`jax.set_mesh` + `nn.logical_axis_rules`) the kernel runs in a
`shard_map` over batch ('act_batch' -> data, fsdp) and heads ('heads' ->
tensor), the specs coming from `parallel.RULES` like every other constraint;
each device runs the kernel on its own [B/(data*fsdp), L, H/tensor, D]. The
sequence stays whole: a query tile needs every key.

Off TPU the kernel runs in Pallas interpret mode (the same kernel lowered to
ordinary XLA ops), which is how the tests check it on a CPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from nanoflux_jax import parallel

Array = jax.Array

_LANES = 128  # Tiles (and so padded lengths) are multiples of this.
_BLOCKS = (512, 256, 128)  # Largest first: fewer grid steps, fuller MXU.
_NAMES = ('act_batch', 'act_len', 'heads', 'kv')  # [B, L, H, D] activations.


def block_size(length: int) -> tuple[int, int]:
  """(padded length, tile) for a sequence of `length` tokens.

  The length is padded to the next multiple of 128; the tile is the largest
  of 512 / 256 / 128 dividing it, so no further padding is ever added
  (4608 -> 512, 1280 -> 256, 88 -> 128 on a 128 padded length).
  """
  if length < 1:
    raise ValueError(f'splash attention: sequence length {length} < 1')
  padded = -(-length // _LANES) * _LANES
  return padded, next(b for b in _BLOCKS if padded % b == 0)


def _kernel(heads: int, padded: int, block: int, interpret: bool):
  """A splash MHA kernel over [heads, padded, D], full (unmasked) attention.

  The full mask has no sparsity to exploit; padding is handled by segment
  ids at call time, so one kernel serves every real length with this padded
  length. Built inside the caller's trace, never cached: the kernel holds its
  mask info as arrays, which become tracers of that trace (a cached kernel
  would leak them); the numpy mask processing is cached upstream.
  """
  mask = sa.MultiHeadMask([sa.FullMask((padded, padded))] * heads)
  sizes = sa.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def _local(q: Array, k: Array, v: Array, interpret: bool) -> Array:
  """Splash attention on one device's q/k/v [B, L, H, D] -> [B, L, H, D]."""
  b, length, heads, d = q.shape
  padded, block = block_size(length)
  kernel = _kernel(heads, padded, block, interpret)
  # The kernel computes softmax(q k^T) v: fold 1/sqrt(d) into q, in fp32 so
  # only the final cast rounds.
  q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)

  def layout(x):  # [B, L, H, D] -> [B, H, padded, D]
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, 0)))

  seg = None
  if padded != length:
    ids = (jnp.arange(padded) < length).astype(jnp.int32)
    seg = sa.SegmentIds(q=ids, kv=ids)
  out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=seg))(
      layout(q), layout(k), layout(v))
  return jnp.swapaxes(out[:, :, :length], 1, 2)


def splash_attention(q: Array, k: Array, v: Array, *,
                     interpret: bool | None = None) -> Array:
  """Exact softmax(q k^T / sqrt(D)) v, q/k/v [B, L, H, D] -> [B, L, H, D].

  Args:
    interpret: run the Pallas kernel in interpret mode; None: off TPU.
  Returns:
    The attention output, q's dtype. Under an active mesh and logical rules
    it is sharded like q over batch and heads (see the module docstring).
  """
  if interpret is None:
    interpret = jax.default_backend() != 'tpu'
  local = functools.partial(_local, interpret=interpret)
  spec = parallel.activation_spec(_NAMES, q.shape)
  if spec is None or all(a is None for a in spec):
    return local(q, k, v)
  # Sequence and head_dim stay whole whatever the rules say.
  spec = jax.sharding.PartitionSpec(spec[0], None, spec[2], None)
  # check_vma=False: the kernel's pallas_call out_shapes carry no
  # varying-manual-axes type (jax refuses them under check_vma=True), and
  # the body has no collectives to check.
  return jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q, k, v)

"""Shared building blocks: norms, real-valued RoPE, embeddings, attention.

Everything numerically sensitive (norms, softmax, RoPE angles, the timestep
sinusoid) runs in float32 whatever the compute dtype, as in BFL's FLUX.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import parallel
from nanoflux_jax.models import splash

Array = jax.Array


class _NamedBox(nn.LogicallyPartitioned):
  """Logical names of a DenseGeneral kernel (or bias) in its *final* shape.

  flax's DenseGeneral initialises a flat 2-D kernel (1-D bias), unboxes it
  and only then reshapes it to (in..., features...) (google/flax#3676). Under
  a mesh, `nn.LogicallyPartitioned.unbox` would constrain the flat value with
  the rank-N names and fail; this box leaves a value of another rank alone
  and constrains the reshaped one through `parallel.constrain` (fitted, like
  the shardings `models.sharding.param_shardings` gives the params).
  """

  def unbox(self, apply_constraint=True):
    if not apply_constraint or jnp.ndim(self.value) != len(self.names):
      return self.value
    return parallel.constrain(self.value, self.names)


def _named_init(init, names):
  return lambda *a, **kw: _NamedBox(init(*a, **kw), tuple(names))


def _act_names(ndim: int, feature_names: Sequence[str | None]) -> tuple:
  """Logical names of an activation [batch, len..., features...].

  The feature dims take their kernel dims' names, except that the model dim
  is the residual stream (act_embed, not the FSDP-split param axis 'embed');
  heads / MLP channels stay tensor-parallel as their params are.
  """
  features = tuple('act_embed' if a == 'embed' else a for a in feature_names)
  lead = ndim - len(features)
  return (('act_batch',) + ('act_len',) * (lead - 1))[:lead] + features


class Dense(nn.DenseGeneral):
  """nn.DenseGeneral (same params) whose input and output are constrained.

  `logical_axes` names every kernel dim, inputs first. Input and output get
  `_act_names` (and so, under autodiff, do their cotangents). Pinning both
  sides of every projection keeps XLA's sharding propagation from choosing
  layouts such as a model dim split over 'tensor', which XLA's SPMD
  partitioner miscompiles on a (data, fsdp, tensor) mesh (see
  experiments/repro_xla_sharding.py). A no-op without a mesh and logical
  rules (`parallel.constrain`).
  """
  logical_axes: tuple[str | None, ...] = ()

  def __call__(self, inputs: Array) -> Array:
    n_in = len(self.axis) if isinstance(self.axis, tuple) else 1
    names = tuple(self.logical_axes)
    inputs = parallel.constrain(inputs, _act_names(inputs.ndim, names[:n_in]))
    y = super().__call__(inputs)
    return parallel.constrain(y, _act_names(y.ndim, names[n_in:]))


def dense(features, axes: Sequence[str | None], *, name: str,
          dtype, param_dtype, use_bias: bool = True, in_axes: int = 1,
          kernel_init=nn.initializers.lecun_normal()) -> Dense:
  """A DenseGeneral whose kernel, bias and activations carry logical names.

  Args:
    features: int or tuple of output dims (e.g. (3, heads, head_dim) for qkv).
    axes: logical names of every kernel dim, inputs first.
    in_axes: how many trailing input dims are contracted (2 for [heads, kv]).
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  if len(axes) != in_axes + len(features):
    raise ValueError(f'dense {name}: {len(axes)} axis names {tuple(axes)} for '
                     f'{in_axes} input and {len(features)} output dims')
  bias_axes = tuple(axes[in_axes:])
  return Dense(
      features=features if len(features) > 1 else features[0],
      axis=tuple(range(-in_axes, 0)) if in_axes > 1 else -1,
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=_named_init(kernel_init, axes),
      bias_init=_named_init(nn.initializers.zeros, bias_axes),
      logical_axes=tuple(axes))


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
  """Non-affine LayerNorm over the last dim, in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a learned scale over the last dim (FLUX's QK norm)."""
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('kv',)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    rrms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return (x32 * rrms * scale.astype(jnp.float32)).astype(x.dtype)


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.,
                       time_factor: float = 1000.) -> Array:
  """Sinusoidal embedding [cos | sin] of t * time_factor, float32.

  Args:
    t: [B] timesteps in [0, 1] (or guidance scales).
  Returns:
    [B, dim] float32.
  """
  t = time_factor * t.astype(jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) *
                  jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def rope(ids: Array, axes_dim: Sequence[int], theta: float) -> tuple[Array, Array]:
  """Real-valued rotary embedding for 3-axis position ids.

  Args:
    ids: [B, L, n_axes] positions (text: 0, image: (0, row, col)).
  Returns:
    (cos, sin), each [B, L, 1, sum(axes_dim) // 2] float32, the angle of every
    interleaved pair (x[2i], x[2i+1]) of a head's channels; axes are
    concatenated in order, as BFL's EmbedND does.
  """
  angles = []
  for i, d in enumerate(axes_dim):
    omega = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles.append(ids[..., i:i + 1].astype(jnp.float32) * omega)
  angle = jnp.concatenate(angles, axis=-1)[:, :, None, :]
  return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: Array, pe: tuple[Array, Array]) -> Array:
  """Rotates interleaved channel pairs of x [B, L, H, D] by pe (from `rope`).

  out = x * [c0, c0, c1, c1, ...] + swap_pairs(x) * [-s0, s0, -s1, s1, ...].
  The per-channel cos / sin [B, L, 1, D] are a gather of pe's per-pair
  values, and the gather is why: XLA counts cos / sin as cheap and fuses
  them into every consumer, where the broadcast over heads (and the two
  halves of each pair) made every block's q and k fusions evaluate them
  4 * H times per angle (in a profile of the shapes teacher at batch 8 x 88
  tokens those fusions took ~12% of the op time; an optimization_barrier
  does not stop it, XLA:CPU removes barriers before fusion). A gather counts
  as expensive, so XLA materialises it instead of fusing it into the
  broadcasting consumer: cos / sin are evaluated once per forward (CSE
  merges every block's identical gathers) and the q/k fusions only multiply.
  (A matmul with a 0/1 matrix would do the same for XLA, but the TFLite
  converter folds the reshapes around it into a rank-4 BATCH_MATMUL that
  it then rejects; a gather becomes GATHER_ND.)
  """
  cos, sin = pe
  half = cos.shape[-1]
  pairs = np.repeat(np.arange(half), 2)            # [0, 0, 1, 1, ...]
  sign = np.tile(np.array([-1., 1.], np.float32), half)
  take = lambda a: jnp.take(a, pairs, axis=-1, mode='clip')  # In bounds.
  c, sn = take(cos), take(sin) * sign
  x32 = x.astype(jnp.float32)
  swapped = x32.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
  return (x32 * c + swapped * sn).astype(x.dtype)


# Attention on CPU. The scores of one head at 1152 tokens are 5 MB: written by
# the QK^T matmul (K = head_dim is small, so it is memory-bound), read by the
# max, rewritten by exp and read by the PV matmul. Two things make it fast on
# XLA:CPU: (1) splitting each head's queries into chunks of <= _Q_CHUNK rows,
# so a chunk's scores stay in L2/L3 between those passes; (2) running the heads
# as `_HEAD_GROUPS` independent lax.map chains, which XLA's thunk executor runs
# concurrently, so the small, mostly single-threaded per-chunk ops of one chain
# overlap with the other's instead of leaving cores idle.
_Q_CHUNK = 576
_HEAD_GROUPS = 2


def _softmax_pv(q: Array, k: Array, v: Array, scale: float) -> Array:
  """Exact softmax(q k^T * scale) v for q [B, Lq, D], k/v [B, Lk, D].

  Scores, max, exp and sum are float32; the row sum divides the PV product
  (same math as normalising the probabilities first, one pass fewer). The
  scale is applied to (s - max) inside exp, so q is never rounded by it.
  """
  s = jnp.einsum('bqd,bkd->bqk', q, k, preferred_element_type=jnp.float32)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp((s - m) * scale)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum('bqk,bkd->bqd', p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return (o / l).astype(v.dtype)


def _attention_per_head(q: Array, k: Array, v: Array, *,
                        q_chunk: int | None = None,
                        groups: int | None = None) -> Array:
  """Exact attention, one head (and query chunk) at a time, q/k/v [B, L, H, D].

  Heads are split into `groups` contiguous groups, each a lax.map over its
  heads; inside one head the queries are processed in static chunks of at
  most `q_chunk` rows against all keys. Never materialises [B, H, L, L].
  """
  q_chunk = q_chunk or _Q_CHUNK
  groups = max(1, min(groups or _HEAD_GROUPS, q.shape[2]))
  scale = 1.0 / math.sqrt(q.shape[-1])
  lq = q.shape[1]
  n_chunks = -(-lq // q_chunk)
  step = -(-lq // n_chunks)  # Equal chunks, the last one possibly shorter.
  bounds = [(i, min(i + step, lq)) for i in range(0, lq, step)]
  q, k, v = (jnp.moveaxis(a, 2, 0) for a in (q, k, v))  # [H, B, L, D]

  def one_head(qkv):
    qh, kh, vh = qkv
    outs = [_softmax_pv(qh[:, a:b], kh, vh, scale) for a, b in bounds]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

  h = q.shape[0]
  cuts = [round(i * h / groups) for i in range(groups + 1)]
  outs = [jax.lax.map(one_head, (q[a:b], k[a:b], v[a:b]))
          for a, b in zip(cuts[:-1], cuts[1:])]
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
  return jnp.moveaxis(out, 0, 2)


def _attention_batched(q: Array, k: Array, v: Array) -> Array:
  """Exact attention, all heads at once, q [B, Lq, H, D], k/v [B, Lk, H, D].

  The heads are folded into the batch ([B * H, L, D]) and one `_softmax_pv`
  runs on all of them: the same float32 math as 'per_head', but one batched
  matmul per product and no loop, so small problems pay no per-iteration
  cost. Materialises the whole [B * H, Lq, Lk] scores.
  """
  b, lq, h, d = q.shape
  fold = lambda a: jnp.moveaxis(a, 2, 1).reshape(b * h, a.shape[1], d)
  out = _softmax_pv(fold(q), fold(k), fold(v), 1.0 / math.sqrt(d))
  return jnp.moveaxis(out.reshape(b, h, lq, d), 1, 2)


def _attention_reference(q: Array, k: Array, v: Array) -> Array:
  """Naive exact attention materialising [B, H, L, L] (tests, benchmarks)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                 preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', p, v)


IMPLS = ('auto', 'per_head', 'batched', 'xla', 'cudnn', 'splash')

# CPU 'auto': 'batched' (all heads folded into one `_softmax_pv`) when the
# float32 scores of all heads [B, H, Lq, Lk] take at most this many bytes,
# else 'per_head'. Both do the same math; per_head pays a loop iteration per
# head, batched pays for its scores and probabilities (twice this size)
# once they no longer fit the caches (32 MiB of L3 where measured). By
# experiments/benchmark_attention.py (README, Benchmarks; 2-core AMD EPYC,
# 2026-12-02, batch 1 x head_dim 64 and batch 8 x head_dim 32): up to 4 MiB
# batched is faster by up to 2.4x (the shapes models, batch 8 x 88 tokens x
# 2-4 heads, 0.5-0.9 MiB: 1.6x), or even (one head, where the two are the
# same computation; a few 0.1 ms cells); from 32 MiB on per_head is faster
# by 1.2-2.9x. Between 4 and 32 MiB either can win (several cells went
# either way in repeated runs), batched in most cells up to 8 MiB and
# per_head in most above it, hence 8 MiB.
# The whole matrix, not one head's share, sets the crossover: 512 tokens at
# batch 1 (1 MiB a head) is batched's at 2-8 heads and per_head's (by 1.9x)
# at 24. Worst loss of this choice against the faster path: 1.13x (batch 1)
# and 1.19x (batch 8) in the README's tables, 1.26x with each path's best
# time over all runs.
BATCHED_MAX_SCORE_BYTES = 8 * 2**20


def score_bytes(q_shape: Sequence[int], k_len: int | None = None) -> int:
  """Bytes of all heads' float32 scores [B, H, Lq, Lk], q [B, Lq, H, D]."""
  b, lq, h = q_shape[:3]
  return 4 * b * h * lq * (lq if k_len is None else k_len)


@functools.lru_cache(maxsize=None)
def _cudnn_works() -> bool:
  """Whether jax's cuDNN flash attention compiles here (cuDNN >= 8.9, an
  NVIDIA GPU). Probed once with a small bf16 call, since jax raises only when
  it lowers."""
  try:
    x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    jax.jit(functools.partial(jax.nn.dot_product_attention,
                              implementation='cudnn')).lower(x, x, x).compile()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def resolve_impl(impl: str, dtype=jnp.float32, backend: str | None = None,
                 cudnn_available=None, scores: int | None = None) -> str:
  """The attention implementation 'auto' stands for (others pass through).

  TPU: 'splash' (Pallas flash attention, nothing [B, H, L, L] in memory).
  GPU: 'cudnn' when cuDNN flash attention is available and the dtype is
  bf16 / fp16 (the only ones it takes), else 'xla'. CPU: chosen by size,
  'batched' (all heads in one `_softmax_pv`) when `scores` <=
  BATCHED_MAX_SCORE_BYTES, else (or when the size is unknown) 'per_head'.

  Args:
    dtype: the q/k/v dtype.
    backend: default jax.default_backend().
    cudnn_available: () -> bool; default a one-off compile probe.
    scores: bytes of all heads' float32 scores (`score_bytes`), or None.
  """
  if impl not in IMPLS:
    raise ValueError(f'attention: unknown implementation {impl!r}; expected '
                     f'one of {IMPLS}')
  if impl != 'auto':
    return impl
  backend = backend or jax.default_backend()
  if backend == 'tpu':
    return 'splash'
  if backend == 'cpu':
    small = scores is not None and scores <= BATCHED_MAX_SCORE_BYTES
    return 'batched' if small else 'per_head'
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend in ('gpu', 'cuda') and half and (cudnn_available or
                                              _cudnn_works)():
    return 'cudnn'
  return 'xla'


def attention(q: Array, k: Array, v: Array, impl: str = 'auto') -> Array:
  """Scaled dot-product attention (no mask), q/k/v [B, L, H, D] -> [B, L, H, D].

  impl: 'per_head' (exact, heads and query chunks one after another: the
  fastest on CPU for large score matrices), 'batched' (the same math with
  the heads folded into the batch: one call, for small ones), 'xla'
  (jax.nn's fused XLA path, all heads in one batched einsum; the GPU
  fallback and what the TFLite export traces), 'cudnn' (flash attention on
  NVIDIA GPUs), 'splash' (Pallas flash attention for TPUs, interpret mode
  elsewhere; `splash.py`), or 'auto' (`resolve_impl`: splash on TPU, cudnn
  on GPU when it can, on CPU batched or per_head by the size of the scores).
  """
  impl = resolve_impl(impl, q.dtype, scores=score_bytes(q.shape, k.shape[1]))
  if impl == 'per_head':
    return _attention_per_head(q, k, v)
  if impl == 'batched':
    return _attention_batched(q, k, v)
  if impl == 'splash':
    return splash.splash_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


@functools.lru_cache(maxsize=None)
def _dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def dtypes(config) -> tuple[jnp.dtype, jnp.dtype]:
  """(compute dtype, param dtype) of a config with `dtype`/`param_dtype`."""
  return _dtype(config.dtype), _dtype(config.param_dtype)

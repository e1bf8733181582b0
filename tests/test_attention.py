"""Exactness of every attention implementation against a naive reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflux_jax.models import layers


def _naive(q, k, v):
  """float64 numpy softmax(q k^T / sqrt(d)) v, q/k/v [B, L, H, D]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', p, v)


def _qkv(b, l, h, d, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  # Large-ish logits so the max subtraction matters.
  return tuple(jnp.asarray(scale * rng.standard_normal((b, l, h, d)),
                           jnp.float32) for _ in range(3))


def _rel_err(a, ref):
  return float(np.abs(np.asarray(a, np.float64) - ref).max() /
               np.abs(ref).max())


@pytest.mark.parametrize('b,l,h,d', [(1, 37, 4, 16), (2, 24, 3, 8),
                                     (1, 9, 1, 32)])
@pytest.mark.parametrize('impl', ['auto', 'per_head', 'batched', 'xla'])
def test_attention_matches_naive(impl, b, l, h, d):
  q, k, v = _qkv(b, l, h, d)
  out = jax.jit(lambda *a: layers.attention(*a, impl=impl))(q, k, v)
  assert out.shape == (b, l, h, d) and out.dtype == jnp.float32
  assert _rel_err(out, _naive(q, k, v)) < 1e-5


@pytest.mark.parametrize('q_chunk,groups', [(1, 1), (5, 2), (8, 3), (37, 4),
                                            (1000, 9), (16, 1)])
def test_per_head_chunks_and_groups_are_exact(q_chunk, groups):
  """Uneven query chunks and head groups (more groups than heads too)."""
  q, k, v = _qkv(2, 37, 4, 16, seed=1)
  out = jax.jit(lambda *a: layers._attention_per_head(  # pylint: disable=protected-access
      *a, q_chunk=q_chunk, groups=groups))(q, k, v)
  assert _rel_err(out, _naive(q, k, v)) < 1e-5


def test_reference_matches_naive():
  q, k, v = _qkv(1, 20, 2, 8, seed=2)
  out = layers._attention_reference(q, k, v)  # pylint: disable=protected-access
  assert _rel_err(out, _naive(q, k, v)) < 1e-5


def test_per_head_bf16_close_to_fp32():
  q, k, v = _qkv(1, 40, 2, 16, seed=3, scale=1.0)
  ref = _naive(q, k, v)
  out = layers._attention_per_head(  # pylint: disable=protected-access
      *(a.astype(jnp.bfloat16) for a in (q, k, v)), q_chunk=16)
  assert out.dtype == jnp.bfloat16
  assert _rel_err(out.astype(jnp.float32), ref) < 3e-2


def test_unknown_impl_raises():
  q, k, v = _qkv(1, 4, 1, 8)
  with pytest.raises(ValueError, match='flashy'):
    layers.attention(q, k, v, impl='flashy')


_GRAD_IMPLS = {
    'per_head': lambda *a: layers._attention_per_head(*a, q_chunk=7),  # pylint: disable=protected-access
    'batched': layers._attention_batched}  # pylint: disable=protected-access


@pytest.mark.parametrize('impl', sorted(_GRAD_IMPLS))
def test_gradient_matches_reference(impl):
  q, k, v = _qkv(1, 19, 2, 8, seed=4, scale=1.0)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  ours = jax.grad(loss(_GRAD_IMPLS[impl]), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss(layers._attention_reference),  # pylint: disable=protected-access
                 argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batched_cross_attention_matches_naive():
  """Lq != Lk: the fold must not mix the two lengths up."""
  q = _qkv(2, 7, 3, 8, seed=6)[0]
  k, v = _qkv(2, 12, 3, 8, seed=7)[:2]
  out = layers._attention_batched(q, k, v)  # pylint: disable=protected-access
  assert out.shape == (2, 7, 3, 8)
  assert _rel_err(out, _naive(q, k, v)) < 1e-5


# --- 'auto' on CPU: chosen by the size of all heads' scores. -------------
_T = layers.BATCHED_MAX_SCORE_BYTES


def test_score_bytes():
  assert layers.score_bytes((8, 88, 4, 32)) == 4 * 8 * 4 * 88 * 88
  assert layers.score_bytes((2, 10, 3, 16), k_len=7) == 4 * 2 * 3 * 10 * 7


def test_cpu_choice_on_both_sides_of_the_threshold():
  pick = lambda s: layers.resolve_impl('auto', backend='cpu', scores=s)
  assert pick(1) == pick(_T) == 'batched'
  assert pick(_T + 1) == pick(100 * _T) == 'per_head'
  assert pick(None) == 'per_head'  # Size unknown: the path that always fits.
  # Explicit choices and other backends do not depend on the size.
  assert layers.resolve_impl('per_head', backend='cpu', scores=1) == 'per_head'
  assert layers.resolve_impl('xla', backend='cpu', scores=1) == 'xla'
  assert layers.resolve_impl('batched', backend='cpu',
                             scores=100 * _T) == 'batched'
  assert layers.resolve_impl('auto', backend='tpu', scores=1) == 'splash'


def _traced_impl(monkeypatch, shape, k_len=None):
  """Which path `attention(impl='auto')` traces for q of `shape` (no FLOPs:
  jax.eval_shape)."""
  seen = []
  for name in ('per_head', 'batched'):
    fn = getattr(layers, f'_attention_{name}')
    monkeypatch.setattr(layers, f'_attention_{name}',
                        lambda *a, fn=fn, name=name, **k: seen.append(name)
                        or fn(*a, **k))
  dpa = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, **k: seen.append(k['implementation']) or dpa(*a, **k))
  kv = shape if k_len is None else (shape[0], k_len) + tuple(shape[2:])
  q = jax.ShapeDtypeStruct(shape, jnp.float32)
  k = jax.ShapeDtypeStruct(kv, jnp.float32)
  jax.eval_shape(lambda q, k: layers.attention(q, k, k), q, k)
  return seen


@pytest.mark.parametrize('batch,heads', [(1, 24), (2, 4)])
def test_attention_auto_dispatches_by_size(monkeypatch, batch, heads):
  assert jax.default_backend() == 'cpu'
  # The largest square L whose scores over all heads fit, and L + 1.
  l = int(math.isqrt(_T // (4 * batch * heads)))
  shape = lambda n, h=heads: (batch, n, h, 8)
  assert layers.score_bytes(shape(l)) <= _T < layers.score_bytes(shape(l + 1))
  assert _traced_impl(monkeypatch, shape(l)) == ['batched']
  assert _traced_impl(monkeypatch, shape(l + 1)) == ['per_head']
  # Cross-attention lengths count too (Lq x Lk), and so does the head count.
  assert _traced_impl(monkeypatch, shape(l), k_len=l + 50) == ['per_head']
  assert _traced_impl(monkeypatch, shape(l, 2 * heads)) == ['per_head']


@pytest.mark.parametrize('b,l,h,d', [(8, 88, 4, 32), (1, 64, 24, 64),
                                     (1, 130, 2, 64), (1, 600, 8, 16)])
def test_batched_and_per_head_agree(b, l, h, d):
  """The two CPU paths 'auto' switches between give the same result (1e-6,
  relative to the output's max) on shapes either side of the threshold."""
  q, k, v = _qkv(b, l, h, d, seed=5)
  outs = [np.asarray(jax.jit(lambda *a, i=i: layers.attention(*a, impl=i))(
      q, k, v), np.float64) for i in ('per_head', 'batched')]
  assert np.abs(outs[0] - outs[1]).max() / np.abs(outs[1]).max() < 1e-6
  # Against float64 both carry float32 rounding (~1e-6 at these logits).
  assert _rel_err(outs[0], _naive(q, k, v)) < 1e-5

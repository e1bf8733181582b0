"""Splash attention (interpret mode on CPU) against 'per_head', and 'auto'.

Forward parity at FLUX's joint lengths (4608 = 512 + 4096 at 1024 px,
1280 = 256 + 1024 at 512 px: no padding; 88 = 24 + 64 and others: padded and
masked by segment ids), gradients through the kernel's custom VJP, and the
shard_map over batch and heads on a (2, 2, 2) mesh of 8 fake CPU devices.
"""
import functools
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import flux
from nanoflux_jax.models import layers
from nanoflux_jax.models import sharding
from nanoflux_jax.models import splash

jax.config.update('jax_compilation_cache_dir', os.path.join(
    tempfile.gettempdir(), 'nanoflux_jax_test_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

per_head = layers._attention_per_head  # pylint: disable=protected-access


def _qkv(b, l, h, d, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(scale * rng.standard_normal((b, l, h, d)),
                           jnp.float32) for _ in range(3))


def _rel(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(a - ref).max() / np.abs(ref).max())


def _random_params(cfg, seed):
  """Random params without compiling an init (shapes from eval_shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: np.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      flux.param_shapes(cfg))


def _mesh8():
  return parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})


@pytest.mark.parametrize('length,want', [
    (4608, (4608, 512)), (1280, (1280, 256)), (88, (128, 128)),
    (1, (128, 128)), (300, (384, 128)), (1000, (1024, 512))])
def test_block_size_from_length(length, want):
  assert splash.block_size(length) == want


def test_block_size_rejects_empty():
  with pytest.raises(ValueError, match='length 0'):
    splash.block_size(0)


# 4608 / 1280: whole tiles; 88 / 300: one / three tiles, the last one padded.
@pytest.mark.parametrize('b,l,h,d', [(1, 4608, 1, 8), (1, 1280, 1, 8),
                                     (1, 88, 2, 16), (2, 300, 2, 8)])
def test_forward_matches_per_head(b, l, h, d):
  q, k, v = _qkv(b, l, h, d)
  out = jax.jit(splash.splash_attention)(q, k, v)
  assert out.shape == (b, l, h, d) and out.dtype == jnp.float32
  assert _rel(out, jax.jit(per_head)(q, k, v)) <= 1e-5


@pytest.mark.parametrize('b,l,h,d', [(1, 88, 2, 16), (2, 300, 1, 8),
                                     (1, 256, 1, 8)])
def test_gradients_match_per_head(b, l, h, d):
  """d/dq, d/dk, d/dv through the kernel's custom VJP (dq and dkv kernels)."""
  q, k, v = _qkv(b, l, h, d, seed=1, scale=1.0)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  got = jax.jit(jax.grad(loss(splash.splash_attention),
                         argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(per_head), argnums=(0, 1, 2)))(q, k, v)
  for name, a, ref in zip('qkv', got, want):
    assert _rel(a, ref) <= 1e-4, name


def test_splash_never_materialises_the_scores():
  """Compiled forward + backward at 2048 tokens, 2 heads: 'xla' keeps the
  [B, H, L, L] scores, splash's scratch is below one head's fp32 scores."""
  x = jax.ShapeDtypeStruct((1, 2048, 2, 8), jnp.bfloat16)

  def temp_bytes(impl):
    f = lambda *a: jnp.sum(layers.attention(*a, impl=impl).astype(
        jnp.float32))
    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    return step.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  scores = 2048 * 2048 * 4  # One head's fp32 scores.
  assert temp_bytes('xla') >= 2 * scores
  assert temp_bytes('splash') < scores


def test_attention_dispatches_splash():
  q, k, v = _qkv(1, 24, 2, 8, seed=2)
  out = layers.attention(q, k, v, impl='splash')
  assert _rel(out, per_head(q, k, v)) <= 1e-5


@pytest.mark.parametrize('backend,dtype,cudnn,want', [
    ('tpu', jnp.bfloat16, False, 'splash'),
    ('tpu', jnp.float32, False, 'splash'),
    ('gpu', jnp.bfloat16, True, 'cudnn'),
    ('gpu', jnp.float16, True, 'cudnn'),
    ('gpu', jnp.float32, True, 'xla'),    # cuDNN flash takes no fp32.
    ('gpu', jnp.bfloat16, False, 'xla'),  # No usable cuDNN.
    ('cpu', jnp.bfloat16, True, 'per_head'),
    ('cpu', jnp.float32, False, 'per_head'),
])
def test_auto_selection(backend, dtype, cudnn, want):
  probed = []

  def available():
    probed.append(backend)
    return cudnn

  assert layers.resolve_impl('auto', dtype, backend, available) == want
  # The cuDNN probe (a compile) runs only where cuDNN could be the answer.
  assert bool(probed) == (backend == 'gpu' and dtype != jnp.float32)


def test_auto_selection_here_and_explicit_impls():
  assert jax.default_backend() == 'cpu'
  assert layers.resolve_impl('auto') == 'per_head'
  for impl in ('per_head', 'batched', 'xla', 'cudnn', 'splash'):
    assert layers.resolve_impl(impl, backend='tpu') == impl
  with pytest.raises(ValueError, match="'flashy'"):
    layers.resolve_impl('flashy')
  assert FluxConfig.tiny(attention_impl='splash').attention_impl == 'splash'
  with pytest.raises(ValueError, match='attention_impl'):
    FluxConfig.tiny(attention_impl='flash')


# 4 heads split over 'tensor'; 3 do not divide 2 ways and stay replicated.
@pytest.mark.parametrize('heads,head_spec', [(4, 'tensor'), (3, None)])
def test_shard_map_over_batch_and_heads(heads, head_spec):
  q, k, v = _qkv(4, 88, heads, 16, seed=3, scale=1.0)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  want = per_head(q, k, v)
  want_g = jax.grad(loss(per_head), argnums=(0, 1, 2))(q, k, v)
  mesh = _mesh8()
  sh = jax.sharding.NamedSharding(mesh, P(('data', 'fsdp'), None, head_spec))
  q, k, v = (jax.device_put(a, sh) for a in (q, k, v))
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    fn = jax.jit(splash.splash_attention)
    assert 'shard_map' in str(jax.make_jaxpr(fn)(q, k, v))
    out = fn(q, k, v)
    got_g = jax.jit(jax.grad(loss(splash.splash_attention),
                             argnums=(0, 1, 2)))(q, k, v)
  assert out.sharding.spec[:3] == (('data', 'fsdp'), None, head_spec)
  assert _rel(out, want) <= 1e-5
  for a, ref in zip(got_g, want_g):
    assert _rel(a, ref) <= 1e-4


TINY = FluxConfig.tiny(depth=1, depth_single_blocks=1)


def test_flux_forward_splash_equals_per_head_on_mesh():
  """A (2, 2, 2)-sharded Flux forward: 24 + 64 tokens -> padded to 128."""
  params = _random_params(TINY, 0)
  rng = np.random.default_rng(0)
  inputs = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
            for k, v in flux.dummy_inputs(TINY, 4, 64, 24).items()}
  want = jax.jit(lambda p, x: flux.Flux(TINY.replace(
      attention_impl='per_head')).apply({'params': p}, **x).velocity)(
          params, inputs)
  mesh = _mesh8()
  cfg = TINY.replace(attention_impl='splash')
  p = parallel.shard_like(params, sharding.param_shardings(cfg, mesh))
  x = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim))
       for k, v in inputs.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    got = jax.jit(lambda p, x: flux.Flux(cfg).apply(
        {'params': p}, **x).velocity)(p, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_distill_step_splash_equals_per_head_on_mesh():
  """One distillation step (`loop.train_step`: teacher trajectory,
  student forward and backward through the splash VJP, AdamW), sharded over
  (2, 2, 2), gives the params of a one-device per_head step. 5 text + 8
  image tokens: padded to 128."""
  # One double block (the forward test above covers single blocks): the
  # two step compiles dominate this test's time.
  tiny = FluxConfig.tiny(depth=1, depth_single_blocks=0)
  # Host arrays: the step donates its state, each run places its own.
  teacher, student = _random_params(tiny, 1), _random_params(tiny, 2)
  rng = np.random.default_rng(0)
  batch = {'noise': rng.standard_normal((4, 8, tiny.in_channels)),
           'txt': rng.standard_normal((4, 5, tiny.context_in_dim)),
           'y': rng.standard_normal((4, tiny.vec_in_dim))}
  c = trainer.default_config()
  c.adam_eps = 1e-3  # Rounding-sized grads must not become +-lr steps.
  tx = loop.make_optimizer(c)

  def step(impl, mesh):
    cfg = tiny.replace(attention_impl=impl)
    spec = trainer.DistillSpec(
        student=cfg, teacher=cfg, schedule=(1.0, 0.0), grid=(2, 4),
        weights=(('output_kd', 1.0),))
    p_sh = sharding.param_shardings(cfg, mesh)
    params = {'student': parallel.shard_like(student, p_sh)}
    state_sh = loop.state_shardings(tx, params, {'student': p_sh}, mesh)
    state = jax.device_put(loop.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=tx.init(params), rng=jax.random.PRNGKey(0)), state_sh)
    frozen = {'teacher': parallel.shard_like(teacher, p_sh)}
    x = {k: jax.device_put(jnp.asarray(v, jnp.float32),
                           parallel.batch_sharding(mesh, v.ndim))
         for k, v in batch.items()}
    fn = loop.compile_train_step(
        functools.partial(trainer.distill_loss, spec=spec), tx, 1, state_sh,
        jax.tree.map(lambda a: a.sharding, x), {'teacher': p_sh}, mesh)
    return fn(state, x, frozen)

  got, got_m = step('splash', _mesh8())
  want, want_m = step('per_head',
                      parallel.create_mesh((1, 1, 1), jax.devices()[:1]))
  assert int(got.step) == 1
  qkv = got.params['student']['double_blocks_0']['img_attn']['qkv']['kernel']
  assert qkv.sharding.spec == P('fsdp', None, 'tensor', None)
  np.testing.assert_allclose(got_m['loss'], want_m['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               got.params, want.params)

"""Mesh construction, logical-axis rules and sharded init on 8 CPU devices."""
import os
import tempfile

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nanoflux_jax import checkpoint
from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.models import sharding

jax.config.update('jax_compilation_cache_dir', os.path.join(
    tempfile.gettempdir(), 'nanoflux_jax_test_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

CFG = FluxConfig.tiny(depth=1, depth_single_blocks=1, attention_impl='xla')


def test_eight_fake_devices():
  """conftest.py forces 8 fake CPU devices, whatever XLA_FLAGS held."""
  assert jax.device_count() == 8, jax.devices()


def test_mesh_shape_resolves_the_rest():
  assert parallel.mesh_shape({'data': -1}, 8) == (8, 1, 1)
  assert parallel.mesh_shape({'fsdp': 2, 'tensor': 2, 'data': -1}, 8) == (
      2, 2, 2)
  assert parallel.mesh_shape((1, -1, 2), 8) == (1, 4, 2)
  mesh = parallel.create_mesh({'data': 2, 'fsdp': -1, 'tensor': 2})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize('spec,match', [
    ({'data': 3, 'fsdp': -1}, r'do not divide the device count 8'),
    ({'data': 2, 'fsdp': 2, 'tensor': 3}, r'needs 12 devices but there are 8'),
    ({'data': -1, 'fsdp': -1}, r'at most one axis'),
    ({'model': 2}, r"unknown axes \['model'\]"),
])
def test_bad_mesh_raises(spec, match):
  with pytest.raises(ValueError, match=match):
    parallel.create_mesh(spec)


def test_rules_table_is_the_single_source():
  rules = dict(parallel.RULES)
  assert rules['embed'] == 'fsdp'
  assert rules['heads'] == rules['mlp'] == 'tensor'
  assert rules['act_batch'] == ('data', 'fsdp')
  for name in ('embed', 'heads', 'kv', 'mlp', 'vocab', 'conv_in', 'conv_out',
               'act_batch', 'act_len', 'act_embed'):
    assert name in rules, name


def test_sharded_init_places_params_by_rule():
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  params, shardings = sharding.init_flux(CFG, mesh, jax.random.PRNGKey(0))
  qkv = params['double_blocks_0']['img_attn']['qkv']['kernel']
  assert qkv.shape == (64, 3, 4, 16)
  assert qkv.sharding.spec == P('fsdp', None, 'tensor', None)
  # Each device holds a quarter: 64/2 rows x 4/2 heads.
  assert qkv.addressable_shards[0].data.shape == (32, 3, 2, 16)
  fc1 = params['double_blocks_0']['img_mlp']['fc1']['kernel']
  assert fc1.sharding.spec == P('fsdp', 'tensor')
  assert jax.tree.map(lambda x: x.sharding, params) == shardings
  # Same values as an unsharded init with the same key.
  from nanoflux_jax.models import flux
  want = flux.init_params(CFG, jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(qkv),
                             want['double_blocks_0']['img_attn']['qkv']['kernel'],
                             rtol=1e-6)


def test_odd_widths_fall_back_to_replication():
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  pruned = CFG.replace(double_heads=(3,), single_mlp=(77,))
  sh = sharding.param_shardings(pruned, mesh)
  # 3 heads do not split 2 ways: that dim is replicated, embed stays FSDP.
  assert sh['double_blocks_0']['img_attn']['qkv']['kernel'].spec == P(
      'fsdp', None, None, None)
  assert sh['single_blocks_0']['mlp_in']['kernel'].spec == P('fsdp', None)
  assert sh['double_blocks_0']['img_mlp']['fc1']['kernel'].spec == P(
      'fsdp', 'tensor')


def test_checkpoint_shards_while_loading(tmp_path):
  from nanoflux_jax.models import flux
  params = flux.init_params(CFG, jax.random.PRNGKey(1))
  checkpoint.save(str(tmp_path / 'ckpt'), CFG, params)
  mesh = parallel.create_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  cfg, loaded = convert_flux.load_flux_transformer(
      str(tmp_path / 'ckpt'), shardings=sharding.loading_shardings(mesh))
  assert cfg == CFG
  k = loaded['single_blocks_0']['mlp_in']['kernel']
  assert k.sharding.spec == P('fsdp', 'tensor')
  assert k.addressable_shards[0].data.shape == (16, 64)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_flux_value_and_grad_on_2x2x2_mesh_match_single_device():
  # Traced under the mesh, as the trainer does: flax's DenseGeneral used to
  # fail there on multi-dim kernels, and without the activation constraints
  # XLA miscompiled this mesh (experiments/repro_xla_sharding.py).
  import flax.linen as nn
  import jax.numpy as jnp
  from nanoflux_jax.models import flux
  params = flux.init_params(CFG, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  inputs = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
            for k, v in flux.dummy_inputs(CFG, 8, 8, 4).items()}
  target = jnp.asarray(rng.standard_normal((8, 8, CFG.out_dim)), jnp.float32)

  def loss(p, x):
    v = flux.Flux(CFG).apply({'params': p}, **x).velocity
    return jnp.mean(jnp.square(v - target))

  want = jax.jit(jax.value_and_grad(loss))(params, inputs)
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  p = parallel.shard_like(params, sharding.param_shardings(CFG, mesh))
  x = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim))
       for k, v in inputs.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    got = jax.jit(jax.value_and_grad(loss))(p, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               got, want)


def test_constrain_is_a_noop_without_mesh_and_fits_odd_dims():
  import flax.linen as nn
  import jax.numpy as jnp
  x = jnp.ones((6, 3))
  names = ('act_batch', 'heads')
  assert parallel.constrain(x, names) is x  # No mesh, no rules.
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
    y = jax.jit(lambda a: parallel.constrain(a * 2, names))(x)
    with pytest.raises(ValueError, match='2 logical axes'):
      parallel.constrain(jnp.ones((2, 2, 2)), names)
  # 6 rows do not split 4 ways, 3 heads not 2 ways: both replicated.
  assert y.sharding.spec in (P(), P(None, None), P(None,))

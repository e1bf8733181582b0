"""Compression: masks vs slicing, static modulation, down-sampler, counts,
checkpoint round trips (sensitivity: test_compress_sensitivity.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax import checkpoint
from nanoflux_jax import compress
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.models import flux

from flux_utils import random_inputs

H, W, TXT = 4, 4, 5
MASK_TOL = 1e-5    # masked vs sliced outputs, fp32.
STATIC_TOL = 1e-5  # static tables vs AdaLN with the same pooled vector.


def _cfg(**kw):
  return nf.FluxConfig.tiny(attention_impl='xla', **kw)  # 2 + 2 blocks.


def _params(cfg, seed=0):
  """Random params (numpy, no flax init: that is slow on a busy CPU) with
  fan-in scaled kernels and visibly non-zero biases, gates and tables."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    names = [getattr(k, 'key', '') for k in path]
    x = rng.standard_normal(s.shape).astype(np.float32)
    if names[-1] == 'kernel':
      fan_in = (s.shape[0] if len(s.shape) == 2 or names[-2] in ('qkv', 'lin')
                else int(np.prod(s.shape[:-1])))
      return jnp.asarray(x / np.sqrt(fan_in))
    if names[-1] == 'scale':
      return jnp.asarray(1 + 0.1 * x)
    return jnp.asarray(0.1 * x)
  return jax.tree_util.tree_map_with_path(leaf, flux.param_shapes(cfg))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(cfg, params, inputs, grid):
  return flux.Flux(cfg).apply({'params': params}, **inputs,
                              img_grid=grid).velocity


def _run(cfg, params, inputs):
  """Jitted forward (eager flax on CPU is slow); drops y for static models."""
  inputs = {k: jnp.asarray(v) for k, v in inputs.items()
            if not (k == 'y' and cfg.modulation == 'static')}
  grid = ((inputs['img'].shape[1] // W, W)
          if cfg.downsample_start is not None else None)
  return np.asarray(_apply(cfg, params, inputs, grid))


def _random_mask(cfg, seed, p=0.5, drop_blocks=(1,)):
  rng = np.random.default_rng(seed)
  vec = lambda n: np.where(rng.random(n) < p, 1.0, 0.0).astype(np.float32)

  def keep1(v):  # at least one unit, as select() guarantees.
    v[rng.integers(len(v))] = 1
    return v
  m = compress.PruneMask.ones(cfg)
  flags = np.ones(cfg.num_blocks, np.float32)
  flags[list(drop_blocks)] = 0
  return m.replace(
      **{f: tuple(keep1(vec(n)) for n in getattr(cfg, f)) for f in (
          'double_heads', 'double_mlp_img', 'double_mlp_txt', 'single_heads',
          'single_mlp')},
      double_blocks=flags[:cfg.depth], single_blocks=flags[cfg.depth:])


_masked = jax.jit(compress.apply_masks, static_argnums=2)


@pytest.mark.parametrize('kw,drop', [
    (dict(), (1,)),                                      # a double block
    (dict(downsample_start=1, downsample_end=2), (2,)),  # a single block
    (dict(downsample_start=1, downsample_end=2), (1,)),  # the start block
])
def test_masked_equals_sliced(kw, drop):
  cfg = _cfg(**kw)
  params = _params(cfg)
  inputs = random_inputs(cfg, 2, H, W, TXT)
  mask = _random_mask(cfg, 0, drop_blocks=drop)
  masked = _run(cfg, _masked(params, mask, cfg), inputs)
  small_cfg, small = compress.prune(cfg, params, mask)
  assert small_cfg.num_blocks == cfg.num_blocks - len(drop)
  assert small_cfg.double_heads == tuple(
      int(mask.double_heads[i].sum()) for i in range(cfg.depth)
      if i not in drop)
  np.testing.assert_allclose(_run(small_cfg, small, inputs), masked,
                             atol=MASK_TOL, rtol=0)
  assert compress.count_params(small_cfg) == sum(
      x.size for x in jax.tree.leaves(small))


def test_full_mask_is_identity_and_bad_mask_raises():
  cfg = _cfg()
  params = _params(cfg)
  inputs = random_inputs(cfg, 1, H, W, TXT)
  ones = compress.PruneMask.ones(cfg)
  np.testing.assert_array_equal(
      _run(cfg, _masked(params, ones, cfg), inputs),
      _run(cfg, params, inputs))
  with pytest.raises(ValueError, match='double_heads'):
    compress.prune(cfg, params, ones.replace(
        double_heads=(jnp.ones(3), jnp.ones(4))))
  with pytest.raises(ValueError, match='at least 1'):
    compress.prune(cfg, params, ones.replace(
        single_heads=(jnp.zeros(4),) + ones.single_heads[1:]))


def test_static_modulation_equals_adaln_exactly():
  cfg = _cfg(guidance_embed=True)
  params = _params(cfg)
  inputs = random_inputs(cfg, 1, H, W, TXT)
  ts = (1.0, 0.75, 0.5, 0.25)
  scfg, sparams = compress.to_static_modulation(
      cfg, params, ts, inputs['y'], guidance=float(inputs['guidance'][0]))
  assert scfg.modulation == 'static' and scfg.static_timesteps == ts
  assert {'time_in', 'vector_in', 'guidance_in'}.isdisjoint(sparams)
  assert sparams['double_blocks_0']['img_mod']['table'].shape == (4, 6, 64)
  for t in ts:
    x = dict(inputs, timesteps=np.full((1,), t, np.float32))
    ref = _run(cfg, params, x)
    x.pop('guidance')
    # Equal up to float rounding: the table's matmul runs at another batch
    # size than the teacher's (~2e-6 abs on outputs of size ~1).
    np.testing.assert_allclose(_run(scfg, sparams, x), ref, atol=STATIC_TOL,
                               rtol=0)
  with pytest.raises(ValueError, match='calib_pooled'):
    compress.to_static_modulation(cfg, params, ts, np.zeros((2, 5)),
                                  guidance=3.0)


def test_downsampler_shapes_identity_and_init_error():
  base = _cfg()
  params = _params(base)
  cfg, dparams = compress.add_downsampler(base, params, 1, 2,
                                          jax.random.key(3))
  ds = dparams['downsample']
  assert ds['down_proj']['kernel'].shape == (4 * 64, 64)
  assert ds['down_res']['conv1']['kernel'].shape == (3, 3, 64, 16)
  assert ds['merge']['kernel'].shape == (128, 64)
  inputs = random_inputs(cfg, 2, H, W, TXT)
  out = jax.eval_shape(functools.partial(
      flux.Flux(cfg).apply, img_grid=(H, W), return_intermediates=True),
      {'params': dparams}, **inputs)
  out, feats = out.velocity, out.intermediates
  assert out.shape == (2, H * W, cfg.in_channels)
  # Intermediates of blocks 1..2 are the coarse tokens.
  assert [f.shape[1] for f in feats['img']] == [16, 4, 4, 16]
  ref = _run(base, params, inputs)
  # (1) If the down-sampled blocks are identities, so is the whole detour.
  mask = compress.PruneMask.ones(cfg).replace(
      double_blocks=np.array([1., 0.]), single_blocks=np.array([0., 1.]))
  np.testing.assert_allclose(
      _run(cfg, _masked(dparams, mask, cfg), inputs),
      _run(base, _masked(params, mask, base), inputs),
      atol=1e-5, rtol=0)
  # (2) With active blocks, the init is closer to the teacher than removing
  # those blocks (stated tolerance: at most 0.8x that error, and < 100%).
  err = lambda a: np.abs(a - ref).max() / np.abs(ref).max()
  down_err = err(_run(cfg, dparams, inputs))
  drop_err = err(_run(base, _masked(params, mask, base), inputs))
  assert down_err < 0.8 * drop_err and down_err < 1.0, (down_err, drop_err)


def test_downsampler_bad_grid_raises():
  cfg, params = compress.add_downsampler(_cfg(), _params(_cfg()), 0, 2,
                                         jax.random.key(0))
  inputs = random_inputs(cfg, 1, 3, 6, TXT)
  apply = lambda **kw: jax.eval_shape(functools.partial(
      flux.Flux(cfg).apply, **kw), {'params': params}, **inputs)
  with pytest.raises(ValueError, match='img_grid'):
    apply()
  with pytest.raises(ValueError, match=r'\(3, 6\).*odd grid'):
    apply(img_grid=(3, 6))
  with pytest.raises(ValueError, match='has 12 cells'):
    apply(img_grid=(2, 6))


SMALL = dict(hidden_size=128, head_dim=32, axes_dim=(8, 12, 12), mlp_ratio=4.0,
             attention_impl='xla')


@pytest.mark.parametrize('kw', [
    dict(), dict(guidance_embed=True),
    dict(modulation='static', static_timesteps=(1.0, 0.5)),
    dict(downsample_start=1, downsample_end=2),
    dict(double_heads=(2, 3), single_mlp=(50, 70))])
def test_counts_match_eval_shape_and_xla(kw):
  cfg = nf.FluxConfig.tiny(**SMALL, **kw)
  shapes = flux.param_shapes(cfg)
  assert compress.count_params(cfg) == sum(
      int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  inputs = flux.dummy_inputs(cfg, 2, 64, 12)
  grid = inputs.pop('img_grid', None)
  fwd = jax.jit(lambda p, x: flux.Flux(cfg).apply({'params': p}, **x,
                                                  img_grid=grid).velocity)
  cost = fwd.lower(shapes, inputs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = compress.count_flops(cfg, 64, 12, batch=2)
  # XLA also counts elementwise work (norms, softmax, GELU): a few % more.
  assert 0.95 < cost['flops'] / ours < 1.05, (cost['flops'], ours)


def test_schnell_scale_param_counts():
  full = nf.FluxConfig.schnell()
  assert compress.count_params(full) == 11_891_178_560
  half = full.replace(double_heads=(12,) * 19, single_heads=(12,) * 38,
                      double_mlp_img=(6144,) * 19, double_mlp_txt=(6144,) * 19,
                      single_mlp=(6144,) * 38)
  static = full.replace(modulation='static', static_timesteps=(1, .75, .5, .25))
  for cfg in (half, static):
    shapes = flux.param_shapes(cfg)  # eval_shape: nothing is allocated.
    assert compress.count_params(cfg) == sum(
        int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  removed = compress.count_params(full) - compress.count_params(static)
  assert 3.1e9 < removed < 3.4e9, removed
  # Halving heads and MLPs halves everything but modulation and embedders.
  assert 0.6 < compress.count_params(half) / compress.count_params(full) < 0.66


def _student():
  """Pruned + static + down-sampled tiny student (and its teacher inputs)."""
  cfg = _cfg()
  params = _params(cfg)
  inputs = random_inputs(cfg, 1, H, W, TXT)
  cfg, params = compress.prune(cfg, params, _random_mask(cfg, 0))
  cfg, params = compress.to_static_modulation(cfg, params, (1.0, 0.5),
                                              inputs['y'])
  cfg, params = compress.add_downsampler(cfg, params, 1, 2, jax.random.key(1))
  return cfg, params, inputs


def test_compose_roundtrip_orbax_and_bfl(tmp_path):
  cfg, params, inputs = _student()
  assert cfg.modulation == 'static' and cfg.downsample_start == 1
  ref = _run(cfg, params, inputs)
  checkpoint.save(str(tmp_path / 'ckpt'), cfg, params)
  cfg2, params2 = checkpoint.load(str(tmp_path / 'ckpt'))
  assert cfg2 == cfg
  np.testing.assert_array_equal(_run(cfg2, params2, inputs), ref)
  path = str(tmp_path / 'student.safetensors')
  convert_flux.save_bfl(path, cfg, params)
  cfg3, params3 = convert_flux.load_flux_transformer(path)
  # Shapes give per-block widths; the uniform presets' mlp_ratio/num_heads
  # are re-derived from them.
  assert cfg3 == cfg.replace(mlp_ratio=cfg3.mlp_ratio, num_heads=cfg3.num_heads)
  np.testing.assert_array_equal(_run(cfg3, params3, inputs), ref)
  sd = convert_flux.to_bfl_state_dict(cfg, params)
  assert sd['downsample.down_res.conv1.weight'].shape == (16, 64, 3, 3)


def test_remove_blocks_merge():
  cfg = _cfg(depth_single_blocks=3)
  params = _params(cfg)
  small_cfg, small = compress.remove_blocks(cfg, params, [0, 2, 4], merge=True)
  assert (small_cfg.depth, small_cfg.depth_single_blocks) == (1, 2)
  # double 1 is merged into double 0; single 1 (global 3) into single 0 (a
  # tie between neighbours goes to the earlier block).
  k = lambda p, b: np.asarray(p[b]['img_mlp']['fc1']['kernel'])
  np.testing.assert_allclose(
      k(small, 'double_blocks_0'),
      (k(params, 'double_blocks_0') + k(params, 'double_blocks_1')) / 2,
      rtol=1e-6)
  np.testing.assert_array_equal(small['single_blocks_1']['mlp_in']['kernel'],
                                params['single_blocks_2']['mlp_in']['kernel'])
  with pytest.raises(ValueError, match=r'\[7\]'):
    compress.remove_blocks(cfg, params, [0, 7])

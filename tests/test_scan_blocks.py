"""scan_blocks: runs of identical blocks under lax.scan equal the unrolled
model, and params convert both ways (BFL / diffusers / checkpoints)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nanoflux_jax import checkpoint
from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.models import scan_blocks
from nanoflux_jax.models import flux
from nanoflux_jax.models import sharding

from flux_utils import make_diffusers_flux

UNIFORM = FluxConfig.tiny(attention_impl='xla')  # 2 double + 2 single.
# A student: global block 2 (single 0) runs on the down-sampled grid, single
# 1 is pruned to 2 heads, singles 2-3 form a run again.
STUDENT = FluxConfig.tiny(depth_single_blocks=4, single_heads=(4, 2, 4, 4),
                          downsample_start=2, downsample_end=2,
                          attention_impl='xla')


def _rel(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def test_block_runs():
  s = dict(scan_blocks=True)
  assert scan_blocks.block_runs(FluxConfig.schnell(**s)) == [
      ('double', 0, 19), ('single', 0, 38)]
  assert scan_blocks.block_runs(UNIFORM) == [  # scan_blocks off.
      ('double', 0, 1), ('double', 1, 2), ('single', 0, 1), ('single', 1, 2)]
  # Per-block widths and the down-sampler's range [2, 2] break runs; a run
  # of one stays unrolled.
  assert scan_blocks.block_runs(STUDENT.replace(**s)) == [
      ('double', 0, 2), ('single', 0, 1), ('single', 1, 2), ('single', 2, 4)]
  pruned = FluxConfig.tiny(depth=5, single_heads=(4, 2),
                           double_mlp_txt=(128, 128, 96, 128, 128),
                           scan_blocks=True)
  assert scan_blocks.block_runs(pruned) == [
      ('double', 0, 2), ('double', 2, 3), ('double', 3, 5), ('single', 0, 1),
      ('single', 1, 2)]
  ds = FluxConfig.tiny(depth=4, depth_single_blocks=4, downsample_start=1,
                       downsample_end=5, scan_blocks=True)
  # The coarse range [1, 5] is its own runs: they break before global
  # block 1 and after global block 5.
  assert scan_blocks.block_runs(ds) == [
      ('double', 0, 1), ('double', 1, 4), ('single', 0, 2), ('single', 2, 4)]
  assert scan_blocks.run_name('double', 0, 19) == 'double_blocks_0_to_18'
  assert scan_blocks.run_name('single', 7, 8) == 'single_blocks_7'


def _params(cfg):
  """Random params without compiling an init (shapes from eval_shape)."""
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      flux.param_shapes(cfg))


def _inputs(cfg):
  rng = np.random.default_rng(0)
  return {k: v if isinstance(v, tuple) else
          jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
          for k, v in flux.dummy_inputs(cfg, 2, 16, 8).items()}


def test_scanned_equals_unrolled():
  """Forward and every block's intermediates; the gradient test below
  covers a plain uniform model."""
  cfg = STUDENT
  params = _params(cfg)
  scfg = cfg.replace(scan_blocks=True)
  sparams = scan_blocks.scan_params(scfg, params)
  assert (jax.tree.map(np.shape, sparams) ==
          jax.tree.map(np.shape, flux.param_shapes(scfg)))
  x = _inputs(cfg)

  def fwd(c, p):
    out = jax.jit(lambda p: flux.Flux(c).apply(
        {'params': p}, **x, return_intermediates=True))(p)
    return out.velocity, out.intermediates

  (a, fa), (b, fb) = fwd(cfg, params), fwd(scfg, sparams)
  assert _rel(b, a) <= 1e-6
  assert len(fb['img']) == len(fa['img']) == cfg.num_blocks
  for u, v in zip(fa['img'] + fa['txt'], fb['img'] + fb['txt']):
    assert u.shape == v.shape and _rel(v, u) <= 1e-6


def test_scanned_remat_gradients_equal_unrolled():
  cfg = FluxConfig.tiny(depth_single_blocks=0, attention_impl='xla')
  params = _params(cfg)
  scfg = cfg.replace(scan_blocks=True, remat=True,
                     remat_policy='dots_saveable')
  x = _inputs(cfg)
  loss = lambda c: lambda p: jnp.sum(jnp.sin(flux.Flux(c).apply(
      {'params': p}, **x).velocity))
  ga = jax.jit(jax.grad(loss(cfg)))(params)
  gb = scan_blocks.unscan_params(scfg, jax.jit(jax.grad(loss(scfg)))(
      scan_blocks.scan_params(scfg, params)))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      v, u, atol=1e-5 * float(np.abs(u).max()) + 1e-7), ga, gb)


def test_bad_remat_policy_is_named():
  with pytest.raises(ValueError, match="remat_policy='dots'"):
    FluxConfig.tiny(remat_policy='dots')


def test_params_convert_both_ways(tmp_path):
  """BFL and diffusers import, save_bfl and checkpoints, either layout."""
  ref = make_diffusers_flux(layers=3, single_layers=2)
  ref.save_pretrained(tmp_path / 'transformer')
  cfg, params = convert_flux.load_flux_transformer(
      str(tmp_path / 'transformer'))
  scfg, sparams = convert_flux.load_flux_transformer(
      str(tmp_path / 'transformer'), scan_blocks=True)
  assert scfg == cfg.replace(scan_blocks=True)
  assert set(sparams) - set(params) == {'double_blocks_0_to_2',
                                        'single_blocks_0_to_1'}
  jax.tree.map(np.testing.assert_array_equal,
               scan_blocks.scan_params(scfg, params), sparams)
  jax.tree.map(np.testing.assert_array_equal,
               scan_blocks.unscan_params(scfg, sparams), params)
  # save_bfl writes the same file from either layout ...
  want = convert_flux.to_bfl_state_dict(cfg, params)
  got = convert_flux.to_bfl_state_dict(scfg, sparams)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  # ... and it loads back into either layout.
  convert_flux.save_bfl(str(tmp_path / 'flux.safetensors'), scfg, sparams)
  bcfg, bparams = convert_flux.load_flux_transformer(
      str(tmp_path / 'flux.safetensors'), scan_blocks=False)
  assert bcfg == cfg
  jax.tree.map(np.testing.assert_array_equal, bparams, params)
  # A checkpoint saved unrolled loads scanned (and back), sharded.
  checkpoint.save(str(tmp_path / 'ckpt'), cfg, params)
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  ccfg, cparams = checkpoint.load(
      str(tmp_path / 'ckpt'), shardings=sharding.loading_shardings(mesh),
      scan_blocks=True)
  assert ccfg == scfg
  jax.tree.map(np.testing.assert_array_equal, cparams, sparams)
  qkv = cparams['double_blocks_0_to_2']['img_attn']['qkv']['kernel']
  assert qkv.sharding.spec == P(None, 'fsdp', None, 'tensor', None)


def test_scanned_param_shardings():
  """Stacked params keep their rules; the 'layers' axis is replicated."""
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  sh = sharding.param_shardings(UNIFORM.replace(scan_blocks=True), mesh)
  assert sh['double_blocks_0_to_1']['img_attn']['qkv']['kernel'].spec == P(
      None, 'fsdp', None, 'tensor', None)
  assert sh['single_blocks_0_to_1']['mlp_in']['kernel'].spec == P(
      None, 'fsdp', 'tensor')
  assert sh['final_linear']['kernel'].spec == P('fsdp', None)

"""Parity of nf.Flux with diffusers' FluxTransformer2DModel (fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.convert import loading
from nanoflux_jax.models import flux, layers

from flux_utils import make_diffusers_flux, random_inputs, run_diffusers
from refs import max_rel_err, require, to_numpy

END_TO_END_TOL = 1e-4  # max |ours - ref| / max |ref| over the whole forward.
LAYER_TOL = 1e-5


def _load(model, tmp_path):
  model.save_pretrained(tmp_path / 'transformer')
  return convert_flux.load_flux_transformer(str(tmp_path / 'transformer'))


@pytest.mark.parametrize('kw,batch,h,w', [
    (dict(), 1, 4, 6),                                   # schnell-like
    (dict(guidance=True), 2, 6, 4),                      # dev-like, batch 2
    (dict(heads=2, head_dim=32, axes=(8, 12, 12), layers=3,
          single_layers=2), 2, 3, 5),                     # other heads/dims
])
def test_forward_matches_diffusers(tmp_path, kw, batch, h, w):
  ref = make_diffusers_flux(**kw)
  cfg, params = _load(ref, tmp_path)
  assert cfg.guidance_embed == kw.get('guidance', False)
  assert cfg.depth == kw.get('layers', 2)
  inputs = random_inputs(cfg, batch, h, w, txt_len=7)
  ours = flux.Flux(cfg).apply({'params': params}, **inputs)
  err = max_rel_err(ours, run_diffusers(ref, inputs))
  assert err < END_TO_END_TOL, err


def test_bfl_import_matches_diffusers_import(tmp_path):
  ref = make_diffusers_flux(guidance=True)
  cfg, params = _load(ref, tmp_path)
  convert_flux.save_bfl(str(tmp_path / 'flux.safetensors'), cfg, params)
  cfg_bfl, params_bfl = convert_flux.load_flux_transformer(
      str(tmp_path / 'flux.safetensors'))
  assert cfg_bfl == cfg
  inputs = random_inputs(cfg, 2, 4, 4, txt_len=5)
  a = flux.Flux(cfg).apply({'params': params}, **inputs)
  b = flux.Flux(cfg_bfl).apply({'params': params_bfl}, **inputs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfl_key_map_matches_diffusers_converter():
  """Our BFL layout, converted by diffusers' own BFL->diffusers function, must
  load through our diffusers map into the same params. diffusers' converter
  hard-codes hidden 3072 and MLP ratio 4, so use that width, one block each."""
  torch = require('torch')
  sfu = require('diffusers.loaders.single_file_utils')
  cfg = nf.FluxConfig(hidden_size=3072, num_heads=24, head_dim=128, depth=1,
                      depth_single_blocks=1, in_channels=8, context_in_dim=16,
                      vec_in_dim=8)
  shapes = flux.param_shapes(cfg)
  # A distinct value pattern per tensor (cheaper than RNG at this size, and
  # fp16 to halve the 0.5B-element traffic) so a wrong transpose, split or
  # swap shows.
  params = jax.tree.map(
      lambda s: (((np.arange(np.prod(s.shape), dtype=np.float32) * 0.618) % 1.0
                  ).reshape(s.shape) + np.prod(s.shape) % 97).astype(np.float16),
      shapes)
  bfl = convert_flux.to_bfl_state_dict(cfg, params)
  assert len(bfl) == 16 + 24 + 8  # top level + one double + one single block.
  diff = sfu.convert_flux_transformer_checkpoint_to_diffusers(
      {k: torch.from_numpy(v) for k, v in bfl.items()})
  source = {k: v.numpy() for k, v in diff.items()}
  back = loading.load_strict(source, convert_flux.diffusers_plan(cfg), shapes,
                             dtype=np.float16, origin='diffusers-converted')
  flat_a = jax.tree_util.tree_leaves_with_path(params)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(back))
  for path, a in flat_a:
    np.testing.assert_array_equal(a, np.asarray(flat_b[path]), err_msg=str(path))


def _bfl_keys(cfg):
  return {k for e in convert_flux.bfl_plan(cfg).values() for k in e.sources}


def _diffusers_keys(cfg):
  return {k for e in convert_flux.diffusers_plan(cfg).values() for k in e.sources}


@pytest.mark.parametrize('preset,n_bfl,n_diffusers,n_params', [
    ('schnell', 776, 1156, 11_891_178_560),
    ('dev', 780, 1160, 11_901_408_320)])
def test_full_size_shapes(preset, n_bfl, n_diffusers, n_params):
  cfg = getattr(nf.FluxConfig, preset)()
  shapes = flux.param_shapes(cfg)  # eval_shape: nothing is allocated.
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == n_params
  assert len(_bfl_keys(cfg)) == n_bfl
  assert len(_diffusers_keys(cfg)) == n_diffusers
  blk = shapes['double_blocks_0']['img_attn']
  assert blk['qkv']['kernel'].shape == (3072, 3, 24, 128)
  assert shapes['single_blocks_0']['mlp_in']['kernel'].shape == (3072, 12288)


def test_diffusers_full_size_key_count():
  """Our diffusers map names exactly the keys of a real-size diffusers model."""
  torch = require('torch')
  diffusers = require('diffusers')
  with torch.device('meta'):
    ref = diffusers.FluxTransformer2DModel(guidance_embeds=False)
  assert set(ref.state_dict()) == _diffusers_keys(nf.FluxConfig.schnell())

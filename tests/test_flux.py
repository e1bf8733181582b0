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
from refs import max_rel_err, require, to_numpy, unique_array

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
  ours = flux.Flux(cfg).apply({'params': params}, **inputs).velocity
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
  a = flux.Flux(cfg).apply({'params': params}, **inputs).velocity
  b = flux.Flux(cfg_bfl).apply({'params': params_bfl}, **inputs).velocity
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
  # Seeded random values keyed by each tensor's name (fp16 to halve the
  # 0.5B-element traffic): same-shaped tensors (query/key norm, img/txt qkv)
  # differ, so a wrong transpose, split or swap shows.
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: unique_array(jax.tree_util.keystr(path), s.shape,
                                   np.float16), shapes)
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


def _bfl_from_diffusers(sd, depth, single):
  """BFL state dict from a diffusers one, written from the documented map
  (DESIGN.md), independent of our key maps."""
  cat = lambda *ks: np.concatenate([sd[k] for k in ks], 0)
  out = {}

  def lin(dst, src):
    out[f'{dst}.weight'], out[f'{dst}.bias'] = sd[f'{src}.weight'], sd[
        f'{src}.bias']
  lin('img_in', 'x_embedder')
  lin('txt_in', 'context_embedder')
  lin('final_layer.linear', 'proj_out')
  tte = 'time_text_embed'
  for dst, src in (('time_in', 'timestep_embedder'),
                   ('vector_in', 'text_embedder'),
                   ('guidance_in', 'guidance_embedder')):
    if f'{tte}.{src}.linear_1.weight' in sd:
      lin(f'{dst}.in_layer', f'{tte}.{src}.linear_1')
      lin(f'{dst}.out_layer', f'{tte}.{src}.linear_2')
  for leaf in ('weight', 'bias'):  # diffusers (scale, shift) -> BFL (shift, scale)
    scale, shift = np.split(sd[f'norm_out.linear.{leaf}'], 2, 0)
    out[f'final_layer.adaLN_modulation.1.{leaf}'] = np.concatenate(
        [shift, scale], 0)
  for i in range(depth):
    d, b = f'double_blocks.{i}', f'transformer_blocks.{i}'
    lin(f'{d}.img_mod.lin', f'{b}.norm1.linear')
    lin(f'{d}.txt_mod.lin', f'{b}.norm1_context.linear')
    for s_, q, k, v, nq, nk, o, ff in (
        ('img', 'to_q', 'to_k', 'to_v', 'norm_q', 'norm_k', 'to_out.0', 'ff'),
        ('txt', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'norm_added_q',
         'norm_added_k', 'to_add_out', 'ff_context')):
      for leaf in ('weight', 'bias'):
        out[f'{d}.{s_}_attn.qkv.{leaf}'] = cat(
            *(f'{b}.attn.{x}.{leaf}' for x in (q, k, v)))
      out[f'{d}.{s_}_attn.norm.query_norm.scale'] = sd[f'{b}.attn.{nq}.weight']
      out[f'{d}.{s_}_attn.norm.key_norm.scale'] = sd[f'{b}.attn.{nk}.weight']
      lin(f'{d}.{s_}_attn.proj', f'{b}.attn.{o}')
      lin(f'{d}.{s_}_mlp.0', f'{b}.{ff}.net.0.proj')
      lin(f'{d}.{s_}_mlp.2', f'{b}.{ff}.net.2')
  for i in range(single):
    d, b = f'single_blocks.{i}', f'single_transformer_blocks.{i}'
    lin(f'{d}.modulation.lin', f'{b}.norm.linear')
    for leaf in ('weight', 'bias'):
      out[f'{d}.linear1.{leaf}'] = cat(
          *(f'{b}.attn.{x}.{leaf}' for x in ('to_q', 'to_k', 'to_v')),
          f'{b}.proj_mlp.{leaf}')
    lin(f'{d}.linear2', f'{b}.proj_out')
    out[f'{d}.norm.query_norm.scale'] = sd[f'{b}.attn.norm_q.weight']
    out[f'{d}.norm.key_norm.scale'] = sd[f'{b}.attn.norm_k.weight']
  return out


def test_bfl_export_and_import_follow_the_documented_map(tmp_path):
  """Tiny and cheap: our BFL export of a diffusers import equals the
  documented BFL<->diffusers map applied to the diffusers tensors, and
  importing that BFL dict gives the same params (a swap planted in both
  directions of our BFL map survives a round trip, not this)."""
  from nanoflux_jax.convert.safetensors_io import save_file  # pylint: disable=g-import-not-at-top
  ref = make_diffusers_flux(guidance=True)
  cfg, params = _load(ref, tmp_path)
  sd = {k: to_numpy(v).astype(np.float32) for k, v in ref.state_dict().items()}
  want = _bfl_from_diffusers(sd, cfg.depth, cfg.depth_single_blocks)
  got = convert_flux.to_bfl_state_dict(cfg, params)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  save_file(want, str(tmp_path / 'documented.safetensors'))
  _, back = convert_flux.load_flux_transformer(
      str(tmp_path / 'documented.safetensors'), axes_dim=cfg.axes_dim)
  jax.tree.map(np.testing.assert_array_equal, back, params)


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


# ----------------------------------------------------------------------------
# Layer-level parity (LAYER_TOL): RoPE and the timestep embedding on their own,
# so an error there is named rather than only seen end to end.
# ----------------------------------------------------------------------------
def test_timestep_embedding_matches_diffusers():
  torch = require('torch')
  emb = require('diffusers.models.embeddings')
  t = np.array([0.0, 0.013, 0.25, 0.5, 0.999, 1.0], np.float32)
  ours = layers.timestep_embedding(jnp.asarray(t), 256)
  # diffusers' FluxTransformer2DModel scales t by 1000, then Timesteps(256,
  # flip_sin_to_cos=True, downscale_freq_shift=0).
  ref = emb.get_timestep_embedding(torch.from_numpy(t) * 1000, 256,
                                   flip_sin_to_cos=True, downscale_freq_shift=0)
  assert ours.dtype == jnp.float32 and ours.shape == (6, 256)
  # sin/cos of arguments up to 1000: fp32 rounding of the argument is ~6e-5.
  np.testing.assert_allclose(np.asarray(ours), to_numpy(ref), atol=2e-4)
  assert max_rel_err(ours[:, 128:], to_numpy(ref)[:, 128:]) < 2e-4
  small = np.array([0.0, 1e-4, 3e-4], np.float32)  # Args < 1: fp32-exact.
  ours = layers.timestep_embedding(jnp.asarray(small), 256)
  ref = emb.get_timestep_embedding(torch.from_numpy(small) * 1000, 256,
                                   flip_sin_to_cos=True, downscale_freq_shift=0)
  assert max_rel_err(ours, to_numpy(ref)) < LAYER_TOL


@pytest.mark.parametrize('axes', [(4, 6, 6), (16, 56, 56)])
def test_rope_matches_diffusers(axes):
  torch = require('torch')
  emb = require('diffusers.models.embeddings')
  from flux_utils import image_ids  # pylint: disable=g-import-not-at-top
  ids = np.concatenate([np.zeros((1, 3, 3), np.float32),  # 3 text tokens.
                        image_ids(3, 5, 1)], 1)          # non-square grid.
  cos, sin = layers.rope(jnp.asarray(ids), axes, 10_000)
  pos = emb.FluxPosEmbed(theta=10000, axes_dim=list(axes))
  ref_cos, ref_sin = pos(torch.from_numpy(ids[0]))  # [L, D], pairs repeated.
  assert cos.shape == (1, 18, 1, sum(axes) // 2)
  assert max_rel_err(cos[0, :, 0], to_numpy(ref_cos)[:, ::2]) < LAYER_TOL
  assert max_rel_err(sin[0, :, 0], to_numpy(ref_sin)[:, ::2]) < LAYER_TOL
  # Rotating q [B, L, H, D] as diffusers does on [B, H, L, D].
  x = np.random.default_rng(0).standard_normal(
      (1, 18, 2, sum(axes))).astype(np.float32)
  ours = layers.apply_rope(jnp.asarray(x), (cos, sin))
  ref = emb.apply_rotary_emb(torch.from_numpy(x.transpose(0, 2, 1, 3)),
                             (ref_cos, ref_sin), use_real=True,
                             use_real_unbind_dim=-1)
  assert max_rel_err(ours, to_numpy(ref).transpose(0, 2, 1, 3)) < LAYER_TOL


def test_flux_always_returns_a_flux_output():
  """One output contract: velocity always, intermediates only when asked."""
  cfg = nf.FluxConfig.tiny(attention_impl='xla')
  params = flux.init_params(cfg, jax.random.key(0))
  inputs = random_inputs(cfg, 2, 2, 4, txt_len=3)
  plain = flux.Flux(cfg).apply({'params': params}, **inputs)
  full = flux.Flux(cfg).apply({'params': params}, **inputs,
                              return_intermediates=True)
  assert isinstance(plain, nf.FluxOutput) and isinstance(full, nf.FluxOutput)
  assert plain.intermediates == {}
  assert plain.velocity.shape == (2, 8, cfg.out_dim)
  np.testing.assert_array_equal(plain.velocity, full.velocity)
  assert len(full.intermediates['img']) == cfg.num_blocks
  assert full.intermediates['img'][0].shape == (2, 8, cfg.hidden_size)
  # A pytree: it passes through jit as it is.
  jitted = jax.jit(lambda p: flux.Flux(cfg).apply({'params': p}, **inputs))
  assert isinstance(jitted(params), nf.FluxOutput)

"""End-to-end parity of nf.FluxPipeline with diffusers' FluxPipeline."""
import numpy as np
import pytest

import nanoflux_jax as nf

from refs import max_rel_err, require
from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline

PROMPTS = ['a red circle on the left', 'a photo of a blue dog on a square']
LATENT_TOL = 1e-4     # max relative error of the final packed latents.
PIXEL_TOL = 1         # uint8 units (rounding of diffusers' float images).
# Non-default call arguments (diffusers' defaults are 3.5 and 512 / 256).
GUIDANCE = 2.0
MAX_SEQ = 24
# bf16 weights: latents after 3 steps, and images in uint8 levels.
# Measured: latents 1.0e-3 (schnell) / 1.1e-3 (dev); images vs our fp32
# mean 0.16 max 1 (both), vs diffusers bf16 mean 0.40 max 2 (schnell) / 0.88
# max 5 (dev: diffusers rounds the guidance to bf16 before x1000, so its own
# bf16 is further from fp32: our fp32 vs it, mean 0.90).
BF16_LATENT_TOL = 1e-2
BF16_MEAN_LEVELS = 2.0
BF16_MAX_LEVELS = 10


@pytest.fixture(scope='module', params=[False, True], ids=['schnell', 'dev'])
def pipelines(request, tmp_path_factory):
  path = tmp_path_factory.mktemp('pipe')
  ref = make_tiny_flux_pipeline(path, guidance_embeds=request.param)
  return ref, nf.FluxPipeline.from_pretrained(str(path)), path


def _noise(ref, batch, height, width, seed=0):
  torch = require('torch')
  g = torch.Generator().manual_seed(seed)
  h, w = 2 * (height // 4), 2 * (width // 4)  # vae factor 2, 2x2 patches.
  x = torch.randn((batch, 16, h, w), generator=g)
  return ref._pack_latents(x, batch, 16, h, w)


def test_latents_and_images_match_diffusers(pipelines):
  """Non-default guidance and T5 length on both sides: a pipeline that drops
  either argument on the way in (and uses its default) fails here."""
  torch = require('torch')
  ref, ours, _ = pipelines
  height, width = 32, 48
  noise = _noise(ref, 2, height, width)
  # T5 pads without a mask, so the token count changes the embeddings; the
  # guidance value reaches the dev model's guidance embedder.
  ref_kw = dict(height=height, width=width, num_inference_steps=3,
                latents=noise, guidance_scale=GUIDANCE,
                max_sequence_length=MAX_SEQ)
  with torch.no_grad():
    want = ref(PROMPTS, output_type='latent', **ref_kw).images.numpy()
    want_img = ref(PROMPTS, output_type='np', **ref_kw).images
  kw = dict(height=height, width=width, num_steps=3, latents=noise.numpy(),
            guidance=GUIDANCE, max_sequence_length=MAX_SEQ)
  got = ours(PROMPTS, output_type='latent', **kw)
  assert got.shape == (2, (height // 4) * (width // 4), 64)
  assert max_rel_err(got, want) < LATENT_TOL
  img = ours(PROMPTS, **kw)
  assert img.dtype == np.uint8 and img.shape == (2, height, width, 3)
  diff = np.abs(img.astype(int) - np.round(want_img * 255).astype(int))
  assert diff.max() <= PIXEL_TOL, diff.max()
  assert set(ours.last_timings) == {'encode', 'denoise', 'decode'}


def test_guidance_and_sequence_length_reach_the_model(pipelines):
  """The arguments of the parity test above are not no-ops here: each one,
  changed alone, changes our latents (guidance only on the dev model)."""
  ref, ours, _ = pipelines
  kw = dict(height=16, width=16, num_steps=2, seed=1, output_type='latent')
  base = ours(PROMPTS, guidance=GUIDANCE, max_sequence_length=MAX_SEQ, **kw)
  longer = ours(PROMPTS, guidance=GUIDANCE, max_sequence_length=2 * MAX_SEQ,
                **kw)
  assert max_rel_err(longer, base) > 1e-3
  other_g = ours(PROMPTS, guidance=2 * GUIDANCE, max_sequence_length=MAX_SEQ,
                 **kw)
  if ref.transformer.config.guidance_embeds:
    assert max_rel_err(other_g, base) > 1e-3
  else:  # schnell has no guidance embedder: the value is ignored.
    np.testing.assert_array_equal(np.asarray(other_g), np.asarray(base))


def test_bf16_pipeline_matches_fp32_and_diffusers_bf16(pipelines):
  """The README's dtype='bfloat16' pipeline (bf16 weights) against our fp32
  one and diffusers' pipeline loaded in bf16, from the same noise."""
  torch = require('torch')
  diffusers = require('diffusers')
  ref, ours, path = pipelines
  ours16 = nf.FluxPipeline.from_pretrained(str(path), dtype='bfloat16')
  assert str(ours16.flux_params['img_in']['kernel'].dtype) == 'bfloat16'
  ref16 = diffusers.FluxPipeline.from_pretrained(str(path),
                                                 torch_dtype=torch.bfloat16)
  height, width = 32, 48
  noise = _noise(ref, 2, height, width)
  kw = dict(height=height, width=width, num_steps=3, latents=noise.numpy())
  lat32 = ours(PROMPTS, output_type='latent', **kw)
  lat16 = ours16(PROMPTS, output_type='latent', **kw)
  img32, img16 = ours(PROMPTS, **kw), ours16(PROMPTS, **kw)
  with torch.no_grad():
    want = ref16(PROMPTS, height=height, width=width, num_inference_steps=3,
                 latents=noise.to(torch.bfloat16), output_type='np',
                 max_sequence_length=256).images
  want = np.round(np.asarray(want, np.float32) * 255).astype(int)
  lat_err = max_rel_err(lat16, lat32)
  d32 = np.abs(img16.astype(int) - img32.astype(int))
  dref = np.abs(img16.astype(int) - want)
  dref32 = np.abs(img32.astype(int) - want)  # diffusers' own bf16 error.
  print(f'bf16 pipeline: latents max rel err vs fp32 {lat_err:.2e}; uint8 '
        f'|diff| vs our fp32 mean {d32.mean():.2f} max {d32.max()}, vs '
        f'diffusers bf16 mean {dref.mean():.2f} max {dref.max()} (our fp32 '
        f'vs diffusers bf16: mean {dref32.mean():.2f})')
  assert 1e-4 < lat_err <= BF16_LATENT_TOL  # bf16 really ran, and is close.
  assert d32.mean() <= BF16_MEAN_LEVELS and dref.mean() <= BF16_MEAN_LEVELS
  assert d32.max() <= BF16_MAX_LEVELS and dref.max() <= BF16_MAX_LEVELS


def test_encoders_match_diffusers(pipelines):
  torch = require('torch')
  ref, ours, _ = pipelines
  with torch.no_grad():
    embeds, pooled, _ = ref.encode_prompt(PROMPTS, None, max_sequence_length=16)
  t5, clip = ours.encode_prompt(PROMPTS, max_sequence_length=16)
  assert max_rel_err(t5, embeds.numpy()) < 1e-5
  assert max_rel_err(clip, pooled.numpy()) < 1e-5


def test_save_load_roundtrip(pipelines, tmp_path):
  _, ours, _ = pipelines
  ours.save(str(tmp_path / 'saved'))
  again = nf.FluxPipeline.from_pretrained(str(tmp_path / 'saved'))
  a = ours(PROMPTS[:1], height=16, width=16, num_steps=2, seed=3,
           output_type='latent')
  b = again(PROMPTS[:1], height=16, width=16, num_steps=2, seed=3,
            output_type='latent')
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert again.flux_cfg == ours.flux_cfg


def test_bad_input(pipelines, tmp_path):
  _, ours, path = pipelines
  with pytest.raises(ValueError, match='height=30'):
    ours(PROMPTS, height=30, width=32)
  with pytest.raises(ValueError, match='empty'):
    ours([], height=32, width=32)
  with pytest.raises(ValueError, match='latents have shape'):
    ours(PROMPTS, height=32, width=32, latents=np.zeros((2, 5, 64)))
  broken = tmp_path / 'broken'
  import shutil
  shutil.copytree(path, broken)
  shutil.rmtree(broken / 'vae')
  with pytest.raises(FileNotFoundError, match='vae'):
    nf.FluxPipeline.from_pretrained(str(broken))


def test_long_prompt_is_truncated_with_warning(pipelines, monkeypatch):
  from nanoflux_jax import call_args  # Its token_ids warns.
  _, ours, _ = pipelines
  records = []
  monkeypatch.setattr(call_args.logging, 'warning',
                      lambda msg, *a: records.append(msg % a))
  t5_ids, clip_ids = ours.tokenize([' '.join(['red circle'] * 40)],
                                   max_sequence_length=8)
  assert t5_ids.shape == (1, 8) and clip_ids.shape == (1, 77)
  assert any('T5: prompt truncated to 8' in r for r in records), records

"""Tests for the offline tiny FluxPipeline builder (tests/tiny_flux.py)."""
import json
import os

import numpy as np
import pytest

from refs import require
from nanoflux_jax.testing import tiny_flux

PROMPTS = ['a photo of a red cat', 'The blue square is on the LEFT of a dog!']
HEIGHT, WIDTH = 32, 48  # multiples of vae_scale_factor * 2 = 4; non-square
STEPS = 2
MAX_SEQ = 32  # T5 tokens (FLUX default 512; kept short for speed)


def _run(pipe, output_type, seed=0, **kw):
  torch = require('torch')
  kw.setdefault('height', HEIGHT)
  kw.setdefault('width', WIDTH)
  return pipe(
      PROMPTS, num_inference_steps=STEPS, max_sequence_length=MAX_SEQ,
      output_type=output_type, generator=torch.Generator().manual_seed(seed),
      **kw).images


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(in-memory pipeline, reloaded pipeline, folder)."""
  require('torch')
  require('transformers')
  diffusers = require('diffusers')
  path = tmp_path_factory.mktemp('tiny') / 'flux'
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('HF_HUB_OFFLINE', '1')
    pipe = tiny_flux.make_tiny_flux_pipeline(path)
    reloaded = diffusers.FluxPipeline.from_pretrained(path)
  for p in (pipe, reloaded):
    p.set_progress_bar_config(disable=True)
  return pipe, reloaded, path


def test_saved_layout_is_sharded_like_flux(built):
  _, _, path = built
  for sub, index_name in (('text_encoder_2', 'model.safetensors.index.json'),
                          ('transformer',
                           'diffusion_pytorch_model.safetensors.index.json')):
    index_file = path / sub / index_name
    assert index_file.is_file(), sorted(os.listdir(path / sub))
    shards = set(json.loads(index_file.read_text())['weight_map'].values())
    assert len(shards) >= 2, shards
    for shard in shards:
      assert (path / sub / shard).is_file(), shard
  assert (path / 'text_encoder' / 'model.safetensors').is_file()
  assert (path / 'vae' / 'diffusion_pytorch_model.safetensors').is_file()
  for f in ('vocab.json', 'merges.txt', 'tokenizer.json'):
    assert (path / 'tokenizer' / f).is_file(), f
  for f in ('spiece.model', 'tokenizer.json'):
    assert (path / 'tokenizer_2' / f).is_file(), f
  scheduler = json.loads((path / 'scheduler' / 'scheduler_config.json').read_text())
  assert scheduler['use_dynamic_shifting'] is False
  assert scheduler['shift'] == 1.0


def test_configs(built):
  pipe, _, _ = built
  assert pipe.vae_scale_factor == 2
  t = pipe.transformer.config
  assert (t.in_channels, t.num_layers, t.num_single_layers) == (64, 2, 2)
  assert (t.num_attention_heads, t.attention_head_dim) == (4, 16)
  assert tuple(t.axes_dims_rope) == (4, 6, 6)
  assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model == 32
  assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size == 32
  assert not t.guidance_embeds
  assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
  assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)
  assert pipe.text_encoder.config.eos_token_id == 2
  v = pipe.vae.config
  assert (v.latent_channels, v.scaling_factor, v.shift_factor) == (16, 0.3611, 0.1159)
  assert not v.use_quant_conv and not v.use_post_quant_conv


def test_no_constant_weights(built):
  pipe, _, _ = built
  for name in ('transformer', 'text_encoder', 'text_encoder_2', 'vae'):
    for key, p in getattr(pipe, name).named_parameters():
      flat = p.detach().reshape(-1)
      assert flat.numel() == 1 or not bool((flat == flat[0]).all()), (name, key)


def test_reload_has_identical_weights(built):
  pipe, reloaded, _ = built
  for name in ('transformer', 'text_encoder', 'text_encoder_2', 'vae'):
    a = getattr(pipe, name).state_dict()
    b = getattr(reloaded, name).state_dict()
    assert sorted(a) == sorted(b), name
    for k in a:
      np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=f'{name}.{k}')


@pytest.fixture(scope='module')
def outputs(built):
  """The in-memory pipeline's (latent, np) outputs for PROMPTS at seed 0."""
  pipe, _, _ = built
  return _run(pipe, 'latent'), _run(pipe, 'np')


def test_latent_and_np_outputs(outputs):
  lat, img = outputs
  # Packed 2x2 patches: [B, (H/2/2) * (W/2/2), 16 * 4].
  assert tuple(lat.shape) == (2, (HEIGHT // 4) * (WIDTH // 4), 64)
  assert bool(lat.isfinite().all())
  assert not np.allclose(lat[0].numpy(), lat[1].numpy())  # prompts matter
  assert img.shape == (2, HEIGHT, WIDTH, 3)
  assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
  assert img.std() > 0.01


def test_reload_gives_identical_outputs(built, outputs):
  _, reloaded, _ = built
  lat, img = outputs
  np.testing.assert_array_equal(_run(reloaded, 'latent').numpy(), lat.numpy())
  np.testing.assert_array_equal(_run(reloaded, 'np'), img)


def test_latents_argument_is_packed_noise(built, outputs):
  """`latents=` takes the packed [B, L, 64] noise, as prepare_latents makes it."""
  torch = require('torch')
  pipe, _, _ = built
  g = torch.Generator().manual_seed(0)
  noise = torch.randn((2, 16, HEIGHT // 2, WIDTH // 2), generator=g)
  packed = pipe._pack_latents(noise, 2, 16, HEIGHT // 2, WIDTH // 2)  # pylint: disable=protected-access
  ours = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
              max_sequence_length=MAX_SEQ, output_type='latent',
              latents=packed).images
  np.testing.assert_array_equal(ours.numpy(), outputs[0].numpy())


def test_t5_tokenizer(built):
  spm = require('sentencepiece')
  pipe, reloaded, path = built
  tok = pipe.tokenizer_2
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
  assert 200 <= len(tok) <= 400
  enc = tok(PROMPTS, padding='max_length', max_length=MAX_SEQ, truncation=True)
  sp = spm.SentencePieceProcessor(model_file=str(path / 'tokenizer_2' / 'spiece.model'))
  for prompt, ids in zip(PROMPTS, enc.input_ids):
    assert len(ids) == MAX_SEQ
    n = ids.index(1)
    assert ids[n + 1:] == [0] * (MAX_SEQ - n - 1)
    assert 2 not in ids  # all characters known
    assert ids[:n] == sp.encode(prompt)  # same as raw sentencepiece
  long = tok(' '.join(PROMPTS * 5), padding='max_length', max_length=8,
             truncation=True).input_ids
  assert len(long) == 8 and long[-1] == 1
  assert reloaded.tokenizer_2(PROMPTS).input_ids == tok(PROMPTS).input_ids


def test_clip_tokenizer_pools_at_eos(built):
  torch = require('torch')
  pipe, reloaded, _ = built
  tok = pipe.tokenizer
  assert tok.model_max_length == 77
  assert tok.eos_token_id == len(tok) - 1  # largest id, as in CLIP
  assert tok.bos_token_id == len(tok) - 2
  assert tok.pad_token == '<|endoftext|>'
  enc = tok(PROMPTS, padding='max_length', max_length=77, truncation=True,
            return_tensors='pt')
  ids = enc.input_ids
  assert ids.shape == (2, 77)
  assert (ids[:, 0] == tok.bos_token_id).all()
  assert tok(['A Cat']).input_ids == tok(['a cat']).input_ids  # lower-cases
  eos_pos = ids.argmax(-1)
  for row, pos in zip(ids.tolist(), eos_pos.tolist()):
    assert row[pos] == tok.eos_token_id and tok.eos_token_id not in row[:pos]
  out = pipe.text_encoder(ids)
  np.testing.assert_array_equal(
      out.pooler_output.detach().numpy(),
      out.last_hidden_state[torch.arange(2), eos_pos].detach().numpy())
  assert reloaded.tokenizer(PROMPTS).input_ids == tok(PROMPTS).input_ids
  # What FluxPipeline feeds the transformer.
  with torch.no_grad():
    embeds, pooled, text_ids = pipe.encode_prompt(
        PROMPTS, PROMPTS, max_sequence_length=MAX_SEQ)
  assert tuple(embeds.shape) == (2, MAX_SEQ, 32)
  assert tuple(pooled.shape) == (2, 32)
  assert tuple(text_ids.shape) == (MAX_SEQ, 3)
  np.testing.assert_array_equal(pooled.numpy(), out.pooler_output.detach().numpy())


def test_dev_variant_with_sizes(tmp_path):
  diffusers = require('diffusers')
  sizes = dict(num_attention_heads=2, attention_head_dim=8, axes_dims_rope=(2, 2, 4),
               t5_d_model=24, clip_hidden=16, num_single_layers=1)
  pipe = tiny_flux.make_tiny_flux_pipeline(tmp_path / 'dev', guidance_embeds=True,
                                           seed=1, sizes=sizes)
  t = pipe.transformer.config
  assert t.guidance_embeds and t.joint_attention_dim == 24
  assert t.pooled_projection_dim == 16 and t.num_single_layers == 1
  assert pipe.scheduler.config.use_dynamic_shifting
  pipe.set_progress_bar_config(disable=True)
  lat = _run(pipe, 'latent', guidance_scale=3.5, height=16, width=24)
  assert tuple(lat.shape) == (2, 4 * 6, 64) and bool(lat.isfinite().all())
  reloaded = diffusers.FluxPipeline.from_pretrained(tmp_path / 'dev')
  reloaded.set_progress_bar_config(disable=True)
  np.testing.assert_array_equal(
      _run(reloaded, 'latent', guidance_scale=3.5, height=16, width=24).numpy(),
      lat.numpy())


def test_bad_sizes_raise(tmp_path):
  with pytest.raises(ValueError, match='hidden_dim'):
    tiny_flux.make_tiny_flux_pipeline(tmp_path / 'x', sizes=dict(hidden_dim=8))
  with pytest.raises(ValueError, match='axes_dims_rope'):
    tiny_flux.make_tiny_flux_pipeline(tmp_path / 'x', sizes=dict(attention_head_dim=32))

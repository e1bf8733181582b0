"""A tiny random `diffusers.FluxPipeline`, built fully offline, for parity tests.

Nothing is downloaded: the T5 tokenizer is a sentencepiece unigram model trained
on the fly, the CLIP tokenizer a byte-level BPE learned on the same sentences
(both in `tiny_tokenizers`), and every model is randomly initialised from a
fixed torch seed.

  pipe = make_tiny_flux_pipeline(tmp_path / 'flux')   # also saved there
  pipe2 = diffusers.FluxPipeline.from_pretrained(tmp_path / 'flux')

The saved folder has the layout of the real FLUX.1 folders: model_index.json,
scheduler/, text_encoder/ (one file), text_encoder_2/ (SHARDED, with
model.safetensors.index.json), tokenizer/ (vocab.json, merges.txt, ...),
tokenizer_2/ (spiece.model, tokenizer.json, ...), transformer/ (SHARDED, with
diffusion_pytorch_model.safetensors.index.json), vae/ (one file).

Default ("tiny") sizes, see `DEFAULT_SIZES`:
  transformer: in_channels 64 (= 4 x 16 packed 2x2 latent patches),
    2 double + 2 single blocks, 4 heads x 16 (hidden 64), axes_dims_rope
    (4, 6, 6), joint_attention_dim 32 (= T5 d_model), pooled_projection_dim 32
    (= CLIP hidden), mlp_ratio 4 (diffusers' fixed default).
  T5 encoder: d_model 32, d_kv 8, d_ff 64, 2 layers, 4 heads, gated-gelu,
    relative buckets 8, max distance 20, vocab = len(tokenizer_2) (300).
  CLIP text: hidden 32, 2 layers, 4 heads, intermediate 37, 77 positions,
    projection_dim 32, quick_gelu, eos_token_id 2 (the legacy argmax pooling,
    as in CLIP-L's config), vocab = len(tokenizer) (714 = 512 byte
    symbols + 200 merges + bos 712 + eos 713).
  VAE: latent_channels 16, block_out_channels (32, 32) -> vae_scale_factor 2,
    layers_per_block 1, norm_num_groups 8, no quant convs, scaling 0.3611,
    shift 0.1159.
  Images: height and width must be multiples of vae_scale_factor * 2 = 4
  (the pipeline floors otherwise); latents are [B, 16, H/2, W/2], packed to
  [B, (H/4) * (W/4), 64].
  Scheduler: FLUX.1-schnell's (shift 1.0, no dynamic shifting), or with
  guidance_embeds=True FLUX.1-dev's (shift 3.0, dynamic shifting, base/max
  shift 0.5/1.15, base/max image seq len 256/4096).

diffusers notes: `pipe(..., latents=x)` takes x already PACKED, [B, L, 64]
(randn [B, 16, H/2, W/2] then `FluxPipeline._pack_latents`), unscaled; the
default sigmas are linspace(1, 1/steps, steps) and mu = calculate_shift(L)
(ignored unless use_dynamic_shifting). output_type='latent' returns the packed
latents, not unpacked or VAE-scaled ones.
"""
import os
import pathlib
import shutil

from nanoflux_jax.testing.tiny_tokenizers import CLIP_MAX_LENGTH
from nanoflux_jax.testing.tiny_tokenizers import CLIP_NUM_MERGES
from nanoflux_jax.testing.tiny_tokenizers import make_clip_tokenizer
from nanoflux_jax.testing.tiny_tokenizers import make_t5_tokenizer
from nanoflux_jax.testing.tiny_tokenizers import T5_VOCAB_SIZE

# Keys of `sizes` and their defaults. Callers may override any subset, e.g.
# `sizes=dict(num_attention_heads=8, attention_head_dim=32, num_layers=4)` for
# benchmarks. Derived, not overridable: joint_attention_dim = t5_d_model,
# pooled_projection_dim = clip_hidden, vocab sizes = the tokenizers' sizes.
DEFAULT_SIZES = dict(
    # FluxTransformer2DModel. hidden = num_attention_heads * attention_head_dim;
    # sum(axes_dims_rope) must equal attention_head_dim.
    num_layers=2,  # double-stream blocks
    num_single_layers=2,  # single-stream blocks
    num_attention_heads=4,
    attention_head_dim=16,
    axes_dims_rope=(4, 6, 6),
    # T5EncoderModel (tokenizer_2 / text_encoder_2).
    t5_d_model=32,
    t5_d_kv=8,
    t5_d_ff=64,
    t5_num_layers=2,
    t5_num_heads=4,
    t5_relative_attention_num_buckets=8,
    t5_relative_attention_max_distance=20,
    t5_vocab_size=T5_VOCAB_SIZE,  # sentencepiece target (a soft limit)
    # CLIPTextModel (tokenizer / text_encoder).
    clip_hidden=32,
    clip_layers=2,
    clip_heads=4,
    clip_intermediate=37,
    clip_projection_dim=32,
    clip_num_merges=CLIP_NUM_MERGES,  # BPE merges on the 512 byte symbols
    # AutoencoderKL. vae_scale_factor = 2 ** (len(vae_block_out_channels) - 1).
    vae_block_out_channels=(32, 32),
    vae_layers_per_block=1,
    vae_norm_num_groups=8,
)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def _perturb_constant_tensors(module, seed):
  """Adds small noise to every parameter whose entries are all equal.

  diffusers / transformers initialise norms to ones, biases and some output
  linears to zeros; a key-mapping bug in a converter would go unnoticed on
  such tensors, so they are made random too (ones -> 1 + N(0, 0.1),
  zeros -> N(0, 0.02)).
  """
  # Deferred: torch is optional (the 'dev' extra) and heavy.
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(module.named_parameters()):
      flat = p.detach().reshape(-1)
      if flat.numel() and bool((flat == flat[0]).all()):
        scale = 0.02 if float(flat[0]) == 0.0 else 0.1
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.add_(scale * noise.to(p.dtype))


def _check_sizes(sizes):
  sizes = dict(sizes or {})
  unknown = sorted(set(sizes) - set(DEFAULT_SIZES))
  if unknown:
    raise ValueError(f'unknown sizes keys {unknown}; known: {sorted(DEFAULT_SIZES)}')
  out = dict(DEFAULT_SIZES, **sizes)
  if sum(out['axes_dims_rope']) != out['attention_head_dim']:
    raise ValueError(f'sum(axes_dims_rope)={sum(out["axes_dims_rope"])} must equal '
                     f'attention_head_dim={out["attention_head_dim"]}')
  return out


def make_scheduler(guidance_embeds=False):
  """FLUX.1-schnell's scheduler, or FLUX.1-dev's when `guidance_embeds`."""
  # Deferred: diffusers is optional (the 'dev' extra) and heavy.
  from diffusers import FlowMatchEulerDiscreteScheduler  # pylint: disable=g-import-not-at-top
  common = dict(num_train_timesteps=1000, base_image_seq_len=256,
                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
  if guidance_embeds:  # FLUX.1-dev
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                           **common)
  return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False,
                                         **common)


def _reshard(model, directory, weights_prefix, n_shards=2):
  """Re-saves `model` into `directory` split into about `n_shards` shards."""
  total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
  biggest = max(p.numel() * p.element_size() for p in model.state_dict().values())
  max_shard = max(biggest, total // n_shards + 1)
  for f in os.listdir(directory):
    if f.startswith(weights_prefix):
      os.remove(os.path.join(directory, f))
  model.save_pretrained(directory, max_shard_size=max_shard)
  index = [f for f in os.listdir(directory) if f.endswith('.index.json')]
  assert index, f'{directory} was not saved sharded'


def make_tiny_flux_pipeline(path, *, guidance_embeds=False, seed=0, sizes=None):
  """Builds a tiny random FluxPipeline, saves it to `path`, and returns it.

  Args:
    path: folder to `save_pretrained` the pipeline into (created; an existing
      folder is overwritten).
    guidance_embeds: False -> FLUX.1-schnell-like (no guidance embedder,
      unshifted schedule); True -> FLUX.1-dev-like (guidance embedder, dynamic
      shifting with mu from the image length).
    seed: torch seed for all random weights (each component gets its own
      derived seed, so the result is independent of call order).
    sizes: optional dict overriding `DEFAULT_SIZES` (unknown keys raise).

  Returns:
    the in-memory `diffusers.FluxPipeline` (fp32, eval mode); reloading `path`
    with `FluxPipeline.from_pretrained` gives identical weights.
  """
  # Deferred: torch, transformers and diffusers are optional (the 'dev'
  # extra) and heavy.
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  s = _check_sizes(sizes)
  path = pathlib.Path(path)
  if path.exists():
    shutil.rmtree(path)
  path.mkdir(parents=True)
  tok_dir = path / '_tokenizers'
  tokenizer = make_clip_tokenizer(tok_dir / 'tokenizer', s['clip_num_merges'])
  tokenizer_2 = make_t5_tokenizer(tok_dir / 'tokenizer_2', s['t5_vocab_size'])

  torch.manual_seed(seed)
  clip_cfg = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer),
      hidden_size=s['clip_hidden'],
      intermediate_size=s['clip_intermediate'],
      projection_dim=s['clip_projection_dim'],
      num_hidden_layers=s['clip_layers'],
      num_attention_heads=s['clip_heads'],
      max_position_embeddings=CLIP_MAX_LENGTH,
      hidden_act='quick_gelu',
      layer_norm_eps=1e-5,
      # As CLIP-L's config: eos_token_id 2 selects argmax(input_ids) pooling.
      bos_token_id=0, pad_token_id=1, eos_token_id=2,
  )
  text_encoder = transformers.CLIPTextModel(clip_cfg)
  _perturb_constant_tensors(text_encoder, seed + 101)

  torch.manual_seed(seed + 1)
  t5_cfg = transformers.T5Config(
      vocab_size=len(tokenizer_2),
      d_model=s['t5_d_model'],
      d_kv=s['t5_d_kv'],
      d_ff=s['t5_d_ff'],
      num_layers=s['t5_num_layers'],
      num_heads=s['t5_num_heads'],
      relative_attention_num_buckets=s['t5_relative_attention_num_buckets'],
      relative_attention_max_distance=s['t5_relative_attention_max_distance'],
      feed_forward_proj='gated-gelu',
      dropout_rate=0.0,
      layer_norm_epsilon=1e-6,
      tie_word_embeddings=False,
      is_encoder_decoder=True,
      use_cache=False,
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
  )
  text_encoder_2 = transformers.T5EncoderModel(t5_cfg)
  _perturb_constant_tensors(text_encoder_2, seed + 102)

  torch.manual_seed(seed + 2)
  nb = len(s['vae_block_out_channels'])
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3,
      down_block_types=('DownEncoderBlock2D',) * nb,
      up_block_types=('UpDecoderBlock2D',) * nb,
      block_out_channels=tuple(s['vae_block_out_channels']),
      layers_per_block=s['vae_layers_per_block'],
      act_fn='silu',
      latent_channels=16,
      norm_num_groups=s['vae_norm_num_groups'],
      sample_size=32,
      scaling_factor=0.3611,
      shift_factor=0.1159,
      force_upcast=True,
      use_quant_conv=False,
      use_post_quant_conv=False,
      mid_block_add_attention=True,
  )
  _perturb_constant_tensors(vae, seed + 103)

  torch.manual_seed(seed + 3)
  transformer = diffusers.FluxTransformer2DModel(
      patch_size=1,
      in_channels=64,
      out_channels=None,
      num_layers=s['num_layers'],
      num_single_layers=s['num_single_layers'],
      attention_head_dim=s['attention_head_dim'],
      num_attention_heads=s['num_attention_heads'],
      joint_attention_dim=s['t5_d_model'],
      pooled_projection_dim=s['clip_hidden'],
      guidance_embeds=guidance_embeds,
      axes_dims_rope=tuple(s['axes_dims_rope']),
  )
  _perturb_constant_tensors(transformer, seed + 104)

  for m in (text_encoder, text_encoder_2, vae, transformer):
    m.eval()  # already fp32; `.to(dtype)` would make diffusers warn

  pipe = diffusers.FluxPipeline(
      scheduler=make_scheduler(guidance_embeds),
      vae=vae,
      text_encoder=text_encoder,
      tokenizer=tokenizer,
      text_encoder_2=text_encoder_2,
      tokenizer_2=tokenizer_2,
      transformer=transformer,
  )
  pipe.save_pretrained(path, safe_serialization=True)
  # Shard the two big components, as in the real FLUX folders.
  _reshard(text_encoder_2, path / 'text_encoder_2', 'model')
  _reshard(transformer, path / 'transformer', 'diffusion_pytorch_model')
  # Keep the raw tokenizer files (spiece.model, CLIP-format vocab/merges).
  for name, keep in (('tokenizer_2', ('spiece.model',)),
                     ('tokenizer', ('vocab.json', 'merges.txt'))):
    for f in keep:
      shutil.copyfile(tok_dir / name / f, path / name / f)
  shutil.rmtree(tok_dir)
  return pipe

"""The shapes world's teacher: a small FLUX pipeline trained from scratch.

The toy stand-in for FLUX.1-schnell, with the same parts and code paths:
  - tokenizers fitted on the world's captions (a word-level sentencepiece
    T5 tokenizer and a byte-level BPE CLIP tokenizer);
  - a T5-style encoder pretrained on the captions (shapes_encoders: every
    token's embedding learns which object its phrase describes, as a
    pretrained T5's does) and a random CLIP-style pooled vector, both frozen
    while the DiT trains (FLUX's encoders are frozen too);
  - a small autoencoder fitted on the world: a linear one on 4x4 pixel
    patches (`VAEConfig.linear`, PCA: 48 pixel values -> 12 latents, about
    33 dB), so 64 px RGB -> 16x16x12 latents -> 8x8 packed tokens of 48
    channels. (Raw pixel patches would give 192-channel tokens, wider than
    the DiT: its output could not carry all of the noise it must predict.)
  - a FLUX DiT (double + single blocks, RoPE, AdaLN) trained with rectified
    flow by `trainer.train` on `ShapesData`.

`load_or_train(c, directory)` returns the trained `FluxPipeline`, cached in
directory/pipeline; a second run loads it. Layout of `directory`:
  init/        the untrained pipeline (tokenizers + encoders): a resumed
               training run reuses exactly these encoders
  train/       the trainer's checkpoints and samples/step_*.png grids
  pipeline/    the trained pipeline (FluxPipeline.save)
"""
from __future__ import annotations

import functools
import os
import tempfile

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nanoflux_jax import parallel
from nanoflux_jax.call_args import CallDefaults
from nanoflux_jax import sampling
from nanoflux_jax.configs import ClipConfig, FluxConfig, T5Config, VAEConfig
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.shapes import t5_pretrain as shapes_encoders
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import sharding
from nanoflux_jax.models.clip import ClipTextModel
from nanoflux_jax.models.t5 import T5Encoder
from nanoflux_jax.models import vae as vae_lib
from nanoflux_jax.pipeline import FluxPipeline
from nanoflux_jax.pipeline import is_pipeline
from nanoflux_jax.testing import tiny_flux

# Scenes the tokenizers are fitted on: enough to see every word many times.
_CORPUS_SCENES = 2000


def default_config() -> ml_collections.ConfigDict:
  """The teacher of the `quick` shapes ladder (see experiments/configs)."""
  c = ml_collections.ConfigDict()
  c.world = 'shapes'          # data.shapes.WORLDS: the scenes' geometry.
  c.world_seed = 0
  c.resolution = 64
  c.pixel_factor = 4          # 64 px -> 16x16 latents -> 8x8 tokens.
  c.latent_channels = 12      # of the linear patch autoencoder.
  c.txt_len = 24              # T5 tokens (the longest caption has 22).
  c.seed = 0
  c.pool_size = 8192          # training scenes, rendered and encoded once.
  c.t5 = {'vocab_size': 256, 'd_model': 64, 'd_kv': 16, 'num_heads': 4,
          'd_ff': 128, 'num_layers': 2, 'relative_attention_num_buckets': 32,
          'relative_attention_max_distance': 32}
  # Supervised pretraining of the T5 on caption structure (shapes_encoders);
  # steps 0 leaves it random (and frozen).
  c.t5_pretrain = {'steps': 400, 'batch_size': 64, 'learning_rate': 3e-3}
  c.clip = {'num_merges': 200, 'hidden_size': 64, 'intermediate_size': 128,
            'num_layers': 2, 'num_heads': 4}
  c.flux = {'hidden_size': 128, 'num_heads': 4, 'head_dim': 32,
            'mlp_ratio': 4.0, 'depth': 2, 'depth_single_blocks': 4,
            'axes_dim': (4, 14, 14)}
  c.train = trainer.default_config()
  c.train.teacher = {'path': '', 'preset': ''}   # from scratch.
  c.train.loss.weights = {'output_kd': 0.0, 'feature_kd': 0.0, 'rf': 1.0}
  c.train.timesteps.mode = 'logit_normal'
  c.train.compute_dtype = 'float32'
  c.train.num_steps = 1500
  c.train.batch_size = 32
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 1
  c.train.sample_every = 500
  c.train.num_sampling_steps = 8
  return c


# ---------------------------------------------------------------------------
# The untrained pipeline.
# ---------------------------------------------------------------------------
def fit_linear_codec(world: shapes.ShapesWorld, cfg: VAEConfig,
                     num_images: int = 2000) -> tuple[VAEConfig, dict]:
  """PCA of the world's f x f patches: the best linear autoencoder with
  cfg.latent_channels latents. scaling_factor makes the latents unit-std."""
  f, k = cfg.pixel_factor, cfg.latent_channels
  images = world.batch(0, num_images)[0].astype(np.float32) / 127.5 - 1.0
  patches = np.asarray(vae_lib.space_to_depth(images, f)).reshape(-1, 3 * f * f)
  mean = patches.mean(0)
  w = np.linalg.svd(patches - mean, full_matrices=False)[2][:k].T  # [3f², k]
  std = float(((patches - mean) @ w).std())
  params = {'encoder': {'kernel': w, 'bias': -mean @ w},
            'decoder': {'kernel': w.T.copy(), 'bias': mean}}
  return cfg.replace(scaling_factor=1.0 / std), jax.tree.map(
      lambda a: np.asarray(a, np.float32), params)


def flux_config(c: ml_collections.ConfigDict, vae: VAEConfig, t5: T5Config,
                clip: ClipConfig) -> FluxConfig:
  return FluxConfig(in_channels=4 * vae.latent_channels,
                    context_in_dim=t5.d_model, vec_in_dim=clip.hidden_size,
                    **dict(c.flux))


def _frozen_init(module: nn.Module, seed: int, ids) -> dict:
  return jax.jit(lambda r: nn.meta.unbox(module.init(r, ids)['params']))(
      jax.random.PRNGKey(seed))


def build_pipeline(c: ml_collections.ConfigDict, tokenizer_dir: str
                   ) -> FluxPipeline:
  """Tokenizers fitted on captions (written under tokenizer_dir), the T5
  pretrained on caption structure (c.t5_pretrain.steps; 0 leaves it random),
  a random CLIP, the linear patch autoencoder (PCA) and an untrained DiT."""
  world = c.get('world', 'shapes')
  corpus = shapes.ShapesWorld(c.world_seed, c.resolution, world).captions(
      _CORPUS_SCENES) + [' '.join(shapes.vocabulary(world))]
  t5_kw = dict(c.t5)
  tok_t5 = tiny_flux.make_t5_tokenizer(
      os.path.join(tokenizer_dir, 'tokenizer_2'), t5_kw.pop('vocab_size'),
      sentences=corpus, model_type='word')
  clip_kw = dict(c.clip)
  tok_clip = tiny_flux.make_clip_tokenizer(
      os.path.join(tokenizer_dir, 'tokenizer'), clip_kw.pop('num_merges'),
      sentences=corpus)
  t5_cfg = T5Config.tiny(vocab_size=len(tok_t5), **t5_kw)
  clip_cfg = ClipConfig.tiny(vocab_size=len(tok_clip), **clip_kw)
  vae_cfg, vae_params = fit_linear_codec(
      shapes.ShapesWorld(c.world_seed, c.resolution, world),
      VAEConfig.linear(c.pixel_factor, c.latent_channels))
  cfg = flux_config(c, vae_cfg, t5_cfg, clip_cfg)
  ids = jnp.zeros((1, 8), jnp.int32)
  t5 = _frozen_init(T5Encoder(t5_cfg), c.seed + 1, ids)
  if c.t5_pretrain.steps:
    t5, acc = shapes_encoders.pretrain_t5(
        t5_cfg, t5, tok_t5,
        shapes.ShapesWorld(c.world_seed, c.resolution, world), c.txt_len,
        seed=c.seed, **dict(c.t5_pretrain))
    logging.info('shapes teacher: T5 caption probe accuracy %s', acc)
  clip = _frozen_init(ClipTextModel(clip_cfg), c.seed + 2, ids)
  dit = nn.meta.unbox(sharding.init_flux(
      cfg, parallel.create_mesh({'data': -1}), jax.random.PRNGKey(c.seed))[0])
  return FluxPipeline((cfg, dit), (clip_cfg, clip), (t5_cfg, t5),
                      (vae_cfg, vae_params), tok_clip, tok_t5)


# ---------------------------------------------------------------------------
# Training data.
# ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _encode_images(cfg: VAEConfig, params, images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> packed model-space latents [B, L, 4C]."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  z, _ = vae_lib.vae_module(cfg).apply({'params': params}, x,
                                       method='encode')
  z = (z - cfg.shift_factor) * cfg.scaling_factor
  return sampling.pack(z.transpose(0, 3, 1, 2))


def encode_images(pipe: FluxPipeline, images: np.ndarray) -> np.ndarray:
  return np.asarray(_encode_images(pipe.vae_cfg, pipe.vae_params,
                                   jnp.asarray(images)))


class ShapesData:
  """Rendered scenes as (txt, y, noise, latents) batches.

  The first `pool_size` scenes of the world are rendered, encoded to
  latents and their captions embedded once (in chunks); batch `step` draws
  its rows from that pool and its noise from an RNG seeded by (seed, step),
  so a resumed run sees the batches an uninterrupted one would, whatever
  the number of processes. (Rendering on the fly would cost more than a
  training step on an accelerator.)
  """

  def __init__(self, pipe: FluxPipeline, world: shapes.ShapesWorld,
               batch_size: int, txt_len: int, seed: int = 0,
               pool_size: int = 8192, chunk: int = 256):
    self.batch_size, self.seed = batch_size, seed
    parts = []
    for start in range(0, pool_size, chunk):
      images, caps, _ = world.batch(start, min(chunk, pool_size - start))
      txt, y = pipe.encode_prompt(caps, txt_len)
      parts.append((np.asarray(txt), np.asarray(y),
                    encode_images(pipe, images)))
    self.txt, self.y, self.latents = (np.concatenate(a) for a in zip(*parts))

  def batch(self, step: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    rows = data_lib.process_rows(self.batch_size, process_index,
                                 process_count)
    rng = np.random.default_rng([self.seed, step])
    idx = rng.integers(0, len(self.latents), self.batch_size)[rows]
    noise = rng.standard_normal((self.batch_size,) + self.latents.shape[1:],
                                np.float32)[rows]
    return {'txt': self.txt[idx], 'y': self.y[idx], 'noise': noise,
            'latents': self.latents[idx]}


def sample_images(pipe: FluxPipeline, flux, prompts, noise: np.ndarray,
                  num_steps: int, txt_len: int) -> np.ndarray:
  """uint8 [N, R, R, 3] from `flux` = (cfg, params) inside `pipe`, from
  fixed packed noise [N, L, C] (square token grids)."""
  cfg, params = flux
  n, length = noise.shape[:2]
  f = pipe.latent_factor
  gh = gw = int(round(length ** 0.5))
  txt, y = pipe.encode_prompt(prompts, txt_len)
  ts = sampling.schedule_for(cfg, num_steps, length)
  out = sampling.denoise(cfg, params, jnp.asarray(noise),
                         sampling.image_ids(n, gh, gw), txt,
                         sampling.text_ids(n, txt.shape[1]), y,
                         jnp.asarray(ts, jnp.float32), img_grid=(gh, gw))
  return np.asarray(pipe.decode_latents(out, gh * f, gw * f))


# ---------------------------------------------------------------------------
# Train or load.
# ---------------------------------------------------------------------------
def call_defaults(c: ml_collections.ConfigDict) -> CallDefaults:
  """The settings the teacher is trained and sampled with, saved in its
  folder's call_defaults.json so that `pipe(prompts)` uses them."""
  return CallDefaults(height=c.resolution, width=c.resolution,
                      num_steps=c.train.num_sampling_steps,
                      max_sequence_length=c.txt_len)


def load_or_train(c: ml_collections.ConfigDict, directory: str, *,
                  mesh=None) -> FluxPipeline:
  """The trained teacher pipeline in directory/pipeline, trained if absent.

  An interrupted training resumes from directory/train's checkpoints.
  """
  final = os.path.join(directory, 'pipeline')
  if is_pipeline(final):
    logging.info('shapes teacher: loading the cached %s', final)
    return FluxPipeline.load(final)
  init = os.path.join(directory, 'init')
  if not is_pipeline(init):
    with tempfile.TemporaryDirectory() as tmp:
      build_pipeline(c, tmp).save(init)
  pipe = FluxPipeline.load(init)
  world = shapes.ShapesWorld(c.world_seed, c.resolution,
                             c.get('world', 'shapes'))
  grid = (c.resolution // pipe.latent_factor,) * 2
  tc = ml_collections.ConfigDict(c.train.to_dict())
  tc.data.grid, tc.data.txt_len = grid, c.txt_len
  data = ShapesData(pipe, world, tc.batch_size, c.txt_len, c.seed,
                    c.pool_size)

  # Progress grids: 8 fixed held-out captions (world seed + 1), fixed noise.
  _, sample_caps, _ = shapes.ShapesWorld(c.world_seed + 1, c.resolution,
                                         world.world).batch(0, 8)
  noise = np.random.default_rng(0).standard_normal(
      (8, grid[0] * grid[1], pipe.flux_cfg.in_channels), np.float32)
  sample_fn = lambda step, params: sample_images(
      pipe, (pipe.flux_cfg, params['student']), sample_caps, noise,
      tc.num_sampling_steps, c.txt_len)

  logging.info('shapes teacher: training %s for %d steps in %s',
               pipe.flux_cfg, tc.num_steps, directory)
  train_dir = os.path.join(directory, 'train')
  state, _ = trainer.train(tc, train_dir,
                           student=(pipe.flux_cfg, pipe.flux_params),
                           data=data, sample_fn=sample_fn, mesh=mesh)
  if int(jax.device_get(state.step)) < tc.num_steps:
    raise RuntimeError(f'shapes teacher: training in {train_dir} stopped at '
                       f'step {int(state.step)} of {tc.num_steps} '
                       '(stop_after); rerun to resume')
  params = jax.device_get(state.params['student'])
  teacher = FluxPipeline((pipe.flux_cfg, params),
                         (pipe.clip_cfg, pipe.clip_params),
                         (pipe.t5_cfg, pipe.t5_params),
                         (pipe.vae_cfg, pipe.vae_params),
                         pipe.tokenizer, pipe.tokenizer_2,
                         call_defaults=call_defaults(c))
  if jax.process_index() == 0:
    teacher.save(final)
  return teacher

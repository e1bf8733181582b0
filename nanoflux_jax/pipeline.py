"""FluxPipeline: tokenize -> encode (T5 + CLIP) -> denoise (DiT) -> decode (VAE).

Reproduces diffusers' FluxPipeline: T5 embeddings padded to
`max_sequence_length`, CLIP pooled output at 77 tokens, packed 2x2 latents,
BFL's schedule (shifted for guidance-distilled models), Euler steps, and
VAE decoding after x / scaling + shift. Each stage is one jitted function
keyed on the (hashable) config, so compiled code is shared between pipelines
and calls of the same shapes.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import call_args
from nanoflux_jax import checkpoint
from nanoflux_jax import pipeline_checks
from nanoflux_jax import sampling
from nanoflux_jax.call_args import CallDefaults
from nanoflux_jax.call_args import DEFAULT_GUIDANCE
from nanoflux_jax.call_args import check_int
from nanoflux_jax.call_args import check_prompts
from nanoflux_jax.configs import ClipConfig, FluxConfig, T5Config, VAEConfig
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.convert import text_encoders
from nanoflux_jax.convert import vae as convert_vae
from nanoflux_jax.models import sharding
from nanoflux_jax.models.clip import ClipTextModel
from nanoflux_jax.models.t5 import StudentTextEncoder, T5Encoder
from nanoflux_jax.models.t5 import student_from_checkpoint
from nanoflux_jax.models.vae import model_to_latents, vae_module

PIPELINE_FILE = 'nanoflux_pipeline.json'
_COMPONENTS = ('transformer', 'text_encoder', 'text_encoder_2', 'vae')
_TOKENIZERS = ('tokenizer', 'tokenizer_2')
CLIP_MAX_LENGTH = 77


@functools.partial(jax.jit, static_argnums=0)
def _t5_encode(cfg: T5Config, params, ids: jax.Array) -> jax.Array:
  return T5Encoder(cfg).apply({'params': params}, ids).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _student_encode(cfg: T5Config, out_dim: int, params,
                    ids: jax.Array) -> jax.Array:
  return StudentTextEncoder(cfg, out_dim).apply({'params': params},
                                                ids).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def clip_pooled(cfg: ClipConfig, params, ids: jax.Array) -> jax.Array:
  """CLIP's pooled text vector [B, vec] (fp32) of token ids [B, 77]."""
  return ClipTextModel(cfg).apply({'params': params}, ids)[1].astype(
      jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _decode(cfg: VAEConfig, params, packed: jax.Array, h: int,
            w: int) -> jax.Array:
  """Packed latents [B, L, 4C] -> uint8 images [B, h*s, w*s, 3]."""
  z = model_to_latents(sampling.unpack(packed, h, w), cfg)  # [B, C, h, w]
  x = vae_module(cfg).apply({'params': params}, z.transpose(0, 2, 3, 1),
                            method='decode').astype(jnp.float32)
  return jnp.round(jnp.clip(x / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


def _load_tokenizer(path: str):
  # Deferred: transformers (tokenizers only) is heavy to import.
  import transformers  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: tokenizer folder is missing')
  return transformers.AutoTokenizer.from_pretrained(path)


def is_pipeline(path: str) -> bool:
  """True for a folder `FluxPipeline.save` wrote (it has PIPELINE_FILE)."""
  return os.path.isfile(os.path.join(path, PIPELINE_FILE))


def _component(folder: str, name: str) -> str:
  path = os.path.join(folder, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{folder}: pipeline component folder {name}/ is '
                            'missing')
  return path


class FluxPipeline:
  """Text-to-image with FLUX.1 in JAX.

  Build with `FluxPipeline.from_pretrained(folder)` (a diffusers FLUX folder
  or a folder written by `save`), or from configs and params directly.
  `with_text_encoder` swaps T5 for a distilled student.

  The T5 stage is `t5_cfg`, `t5_params` and `t5_out_dim`: None for FLUX's
  T5Encoder, else the width of a StudentTextEncoder (then t5_params is its
  {'t5', 'proj'} tree).

  `call_defaults` (call_args.CallDefaults) fills the call arguments left
  out: a folder's call_defaults.json (the settings it was trained with),
  else diffusers' FLUX.1 defaults; `save` writes it back.
  """

  def __init__(self, transformer: tuple[FluxConfig, Any],
               text_encoder: tuple[ClipConfig, Any],
               text_encoder_2: tuple,
               vae: tuple[VAEConfig, Any], tokenizer, tokenizer_2, *,
               call_defaults: CallDefaults | None = None):
    """text_encoder_2 is (cfg, params) for T5, or (cfg, out_dim, params) for
    a StudentTextEncoder, as compress.text_encoder.load_student returns."""
    self.call_defaults = call_defaults or CallDefaults()
    self.flux_cfg, self.flux_params = transformer
    self.clip_cfg, self.clip_params = text_encoder
    if len(text_encoder_2) == 3:
      self.t5_cfg, self.t5_out_dim, self.t5_params = text_encoder_2
    else:
      (self.t5_cfg, self.t5_params), self.t5_out_dim = text_encoder_2, None
    self.vae_cfg, self.vae_params = vae
    self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
    self.last_timings: dict[str, float] = {}

  # --------------------------------------------------------------------------
  # Loading and saving.
  # --------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, folder: str, dtype=None, *,
                      flux_overrides: dict | None = None,
                      mesh=None) -> 'FluxPipeline':
    """Loads a diffusers FLUX pipeline folder or a nanoflux pipeline folder.

    Args:
      folder: has transformer/, text_encoder/ (CLIP), text_encoder_2/ (T5),
        vae/, tokenizer/ and tokenizer_2/.
      dtype: cast all params (e.g. jnp.bfloat16); None keeps stored dtypes.
      flux_overrides: FluxConfig fields to replace, e.g. {'remat': True}.
      mesh: load the DiT and T5 straight onto this mesh, sharded by
        `parallel.RULES`, one tensor at a time: no host ever holds the
        whole 12B DiT or T5-XXL (multi-host pods). CLIP and the VAE are
        small and go to the default device.
    Raises:
      CheckpointError: the parts disagree (pipeline_checks: tokenizers
        against embedding tables, widths, latent channels), checked on the
        configs and tensor headers before any tensor is read; or a
        call_defaults.json is corrupt.
    """
    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, PIPELINE_FILE)):
      return cls.load(folder, dtype=dtype, flux_overrides=flux_overrides,
                      mesh=mesh)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f'{folder}: no such pipeline folder')
    paths = {n: _component(folder, n) for n in _COMPONENTS + _TOKENIZERS}
    defaults = call_args.read_call_defaults(folder)
    toks = [_load_tokenizer(paths[n]) for n in _TOKENIZERS]
    pipeline_checks.check_parts(
        folder, convert_flux.transformer_config(paths['transformer']),
        text_encoders.clip_config_from_hf(paths['text_encoder']),
        text_encoders.t5_config_from_hf(paths['text_encoder_2']), None,
        convert_vae.vae_config_from_diffusers(paths['vae']), *toks)
    flux_sh = t5_sh = None
    if mesh is not None:
      flux_sh = sharding.loading_shardings(mesh)
      t5_sh = sharding.t5_loading_shardings(mesh)
    return cls(
        convert_flux.load_flux_transformer(paths['transformer'], dtype,
                                           shardings=flux_sh,
                                           **(flux_overrides or {})),
        text_encoders.load_clip_text(paths['text_encoder'], dtype),
        text_encoders.load_t5_encoder(paths['text_encoder_2'], dtype,
                                      shardings=t5_sh),
        convert_vae.load_vae(paths['vae'], dtype), *toks,
        call_defaults=defaults)

  def save(self, directory: str) -> None:
    """Writes every component (orbax + config), the tokenizers and
    call_defaults.json to `directory`, atomically: a failed save leaves an
    existing folder intact.

    Raises:
      OverwriteError: `directory` exists and is neither a saved pipeline nor
        an empty folder (nothing is written or deleted).
    """
    directory = os.path.abspath(os.fspath(directory))
    atomic.check_replaceable(directory, is_pipeline, 'saved FluxPipeline')
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    atomic.remove_stale(directory)
    tmp = atomic.tmp_sibling(directory)
    try:
      for name, cfg, params in self._components():
        checkpoint.save(os.path.join(tmp, name), cfg, params)
      self.tokenizer.save_pretrained(os.path.join(tmp, 'tokenizer'))
      self.tokenizer_2.save_pretrained(os.path.join(tmp, 'tokenizer_2'))
      with open(os.path.join(tmp, PIPELINE_FILE), 'w') as f:
        json.dump({'components': list(_COMPONENTS + _TOKENIZERS)}, f)
      call_args.write_call_defaults(tmp, self.call_defaults)
      atomic.check_replaceable(directory, is_pipeline, 'saved FluxPipeline')
      atomic.replace_dir(tmp, directory)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  @classmethod
  def load(cls, directory: str, dtype=None, *,
           flux_overrides: dict | None = None, mesh=None) -> 'FluxPipeline':
    """Loads a folder written by `save` (its text_encoder_2/ may hold a
    student text encoder, see `with_text_encoder`); `mesh`: the DiT (and a
    T5 teacher) straight onto it, as in `from_pretrained`; the parts are
    checked against each other and against their stored params' shapes
    first (pipeline_checks)."""
    paths = {n: _component(directory, n) for n in _COMPONENTS + _TOKENIZERS}
    defaults = call_args.read_call_defaults(directory)
    cfgs = {n: checkpoint.load_config(paths[n]) for n in _COMPONENTS}
    toks = [_load_tokenizer(paths[n]) for n in _TOKENIZERS]
    t5_cfg = t5_out = cfgs['text_encoder_2']
    if isinstance(t5_cfg, dict):  # A student text encoder (see _components).
      t5_cfg, t5_out = student_from_checkpoint(t5_cfg, None,
                                               paths['text_encoder_2'])[:2]
    else:
      t5_out = None
    pipeline_checks.check_parts(directory, cfgs['transformer'],
                                cfgs['text_encoder'], t5_cfg, t5_out,
                                cfgs['vae'], *toks)
    for n in _COMPONENTS:
      pipeline_checks.check_stored_params(paths[n], cfgs[n])
    shardings = {}
    if mesh is not None:
      shardings['transformer'] = sharding.param_shardings(
          cfgs['transformer'], mesh)
      if isinstance(t5_cfg, T5Config) and t5_out is None:
        shardings['text_encoder_2'] = sharding.t5_loading_shardings(mesh)(
            t5_cfg, None)
    parts = {n: checkpoint.load(paths[n], dtype=dtype,
                                shardings=shardings.get(n))
             for n in _COMPONENTS}
    cfg, params = parts['text_encoder_2']
    if isinstance(cfg, dict):  # A student text encoder (see _components).
      parts['text_encoder_2'] = student_from_checkpoint(
          cfg, params, paths['text_encoder_2'], dtype)
    if flux_overrides:
      cfg, params = parts['transformer']
      parts['transformer'] = (cfg.replace(**flux_overrides), params)
    return cls(parts['transformer'], parts['text_encoder'],
               parts['text_encoder_2'], parts['vae'], *toks,
               call_defaults=defaults)

  def with_call_defaults(self, **fields) -> 'FluxPipeline':
    """A new pipeline (params shared) whose call defaults have `fields`
    (height, width, num_steps, max_sequence_length, guidance) replaced;
    `save` writes them to the folder's call_defaults.json."""
    new = copy.copy(self)
    try:
      new.call_defaults = self.call_defaults.replace(**fields)
    except TypeError as e:  # An unknown field.
      raise ValueError(f'with_call_defaults: {e}') from e
    new.last_timings = {}
    return new

  def with_text_encoder(self, student) -> 'FluxPipeline':
    """A new pipeline whose T5 stage is a distilled student text encoder.

    The transformer, CLIP, VAE and tokenizers are shared, not copied; the
    student reads tokenizer_2's ids.

    Args:
      student: a folder written by compress.text_encoder.save_student, or
        (T5Config, out_dim, params) as load_student returns it (params: the
        StudentTextEncoder tree {'t5': ..., 'proj': ...}).
    Returns:
      A FluxPipeline whose encode_prompt yields the student's [B, T, out_dim]
      embeddings; `self` is unchanged.
    Raises:
      ValueError: out_dim is not the transformer's context_in_dim, or the
        student's vocab_size is not this pipeline's T5 vocab_size.
    """
    if isinstance(student, (str, os.PathLike)):
      student = student_from_checkpoint(*checkpoint.load(student),
                                        os.fspath(student))
    cfg, out_dim, params = student
    if out_dim != self.flux_cfg.context_in_dim:
      raise ValueError(f'with_text_encoder: student out_dim={out_dim} but the '
                       'transformer reads context_in_dim='
                       f'{self.flux_cfg.context_in_dim}')
    if cfg.vocab_size != self.t5_cfg.vocab_size:
      raise ValueError(f'with_text_encoder: student vocab_size={cfg.vocab_size}'
                       f' but tokenizer_2 feeds T5 vocab_size='
                       f'{self.t5_cfg.vocab_size}')
    new = copy.copy(self)  # Shares every other component's params.
    new.t5_cfg, new.t5_out_dim, new.t5_params = cfg, int(out_dim), params
    new.last_timings = {}
    return new

  def _components(self):
    t5_cfg = self.t5_cfg
    if self.t5_out_dim is not None:  # The config save_student writes.
      t5_cfg = {'t5': t5_cfg.to_dict(), 'out_dim': self.t5_out_dim}
    return (('transformer', self.flux_cfg, self.flux_params),
            ('text_encoder', self.clip_cfg, self.clip_params),
            ('text_encoder_2', t5_cfg, self.t5_params),
            ('vae', self.vae_cfg, self.vae_params))

  # --------------------------------------------------------------------------
  # Stages.
  # --------------------------------------------------------------------------
  @property
  def latent_factor(self) -> int:
    """Pixels per packed token side: VAE down-sampling x 2 (16 for FLUX)."""
    return 2 * self.vae_cfg.downsample_factor

  def tokenize(self, prompts: Sequence[str],
               max_sequence_length: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """-> (t5_ids [B, max_sequence_length], clip_ids [B, 77]) int32.

    max_sequence_length None: the call default. Longer prompts are
    truncated with a warning, as diffusers does (call_args.token_ids, which
    TFLitePipeline shares).
    """
    if max_sequence_length is None:
      max_sequence_length = self.call_defaults.max_sequence_length
    return (call_args.token_ids(self.tokenizer_2, prompts,
                                max_sequence_length, 'T5'),
            call_args.token_ids(self.tokenizer, prompts, CLIP_MAX_LENGTH,
                                'CLIP'))

  def encode_prompt(self, prompts: Sequence[str],
                    max_sequence_length: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """-> (t5 embeddings [B, T, context], pooled CLIP [B, vec]), float32;
    T = max_sequence_length (None: the call default)."""
    t5_ids, clip_ids = self.tokenize(prompts, max_sequence_length)
    if self.t5_out_dim is None:
      txt = _t5_encode(self.t5_cfg, self.t5_params, t5_ids)
    else:
      txt = _student_encode(self.t5_cfg, self.t5_out_dim, self.t5_params,
                            t5_ids)
    return txt, clip_pooled(self.clip_cfg, self.clip_params, clip_ids)

  def decode_latents(self, packed: jax.Array, height: int,
                     width: int) -> jax.Array:
    """Packed latents [B, L, 4C] -> uint8 images [B, height, width, 3]."""
    s = self.vae_cfg.downsample_factor
    return _decode(self.vae_cfg, self.vae_params, packed, height // s,
                   width // s)

  def resolve_call(self, height=None, width=None, num_steps=None,
                   guidance=None, max_sequence_length=None) -> dict:
    """The call arguments with each None replaced by `call_defaults`."""
    d = self.call_defaults
    pick = lambda v, default: default if v is None else v
    return dict(height=pick(height, d.height), width=pick(width, d.width),
                num_steps=pick(num_steps, d.num_steps),
                guidance=pick(guidance, d.guidance),
                max_sequence_length=pick(max_sequence_length,
                                         d.max_sequence_length))

  def check_call(self, prompts, height=None, width=None, num_steps=None,
                 seed=None, guidance=None, max_sequence_length=None,
                 output_type='np') -> list[str]:
    """Validates `__call__`'s arguments before any work; -> the prompt list.

    None means the call default (`call_defaults`), validated as well.
    Raises:
      ValueError: naming the argument and what was expected.
    """
    where = 'FluxPipeline'
    prompts = check_prompts(where, prompts)
    a = self.resolve_call(height, width, num_steps, guidance,
                          max_sequence_length)
    for name in ('height', 'width'):
      check_int(where, name, a[name], multiple=self.latent_factor)
    check_int(where, 'num_steps', a['num_steps'])
    check_int(where, 'max_sequence_length', a['max_sequence_length'], 1, 512)
    if seed is not None:
      check_int(where, 'seed', seed, -2**63, 2**63 - 1)
    if a['guidance'] is not None:
      call_args.check_number(where, 'guidance', a['guidance'])
    if output_type not in ('np', 'latent'):
      raise ValueError(f"{where}: output_type={output_type!r}; expected "
                       "'np' or 'latent'")
    return prompts

  def __call__(self, prompts: Sequence[str] | str, height: int | None = None,
               width: int | None = None, num_steps: int | None = None,
               seed: int | None = None, latents=None,
               guidance: float | None = None,
               max_sequence_length: int | None = None,
               output_type: str = 'np'):
    """Generates images.

    Arguments left None take the folder's call defaults (`call_defaults`:
    its call_defaults.json, else 512 x 512, 4 steps, 256 T5 tokens).

    Args:
      prompts: a prompt or a list of B prompts.
      height, width: pixels, multiples of `latent_factor` (16 for FLUX).
      num_steps: Euler steps (4 for schnell).
      seed: noise seed (ignored when `latents` is given); None means 0.
      latents: initial noise, packed [B, (H/16)(W/16), 64] as diffusers';
        every value finite.
      guidance: guidance scale for guidance-distilled models (default
        DEFAULT_GUIDANCE, 3.5).
      max_sequence_length: T5 tokens.
      output_type: 'np' -> uint8 [B, H, W, 3]; 'latent' -> final packed
        latents [B, (H/16)(W/16), 64] float32.
    Raises:
      ValueError: an argument is out of range or not finite (checked before
        any work).
    """
    prompts = self.check_call(prompts, height, width, num_steps, seed,
                              guidance, max_sequence_length, output_type)
    a = self.resolve_call(height, width, num_steps, guidance,
                          max_sequence_length)
    height, width, num_steps = a['height'], a['width'], a['num_steps']
    guidance, max_sequence_length = a['guidance'], a['max_sequence_length']
    b, f, cfg = len(prompts), self.latent_factor, self.flux_cfg
    gh, gw = height // f, width // f
    shape = (b, gh * gw, cfg.in_channels)
    if latents is None:
      c = cfg.in_channels // 4
      noise = jax.random.normal(jax.random.key(seed or 0), (b, c, 2 * gh, 2 * gw))
      latents = sampling.pack(noise)
    else:  # A NaN here gives an all-black image and no error.
      call_args.check_finite('FluxPipeline', 'latents', latents)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape != shape:
      raise ValueError(f'FluxPipeline: latents have shape {latents.shape}, '
                       f'expected packed {shape}')

    timings, t0 = {}, time.perf_counter()
    txt, pooled = self.encode_prompt(prompts, max_sequence_length)
    txt.block_until_ready()
    timings['encode'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g = None
    if cfg.guidance_embed:
      g = jnp.full((b,), DEFAULT_GUIDANCE if guidance is None else guidance,
                   jnp.float32)
    ts = sampling.schedule_for(cfg, num_steps, gh * gw)
    out = sampling.denoise(cfg, self.flux_params, latents,
                           sampling.image_ids(b, gh, gw), txt,
                           sampling.text_ids(b, txt.shape[1]), pooled,
                           jnp.asarray(ts, jnp.float32), g,
                           img_grid=(gh, gw))
    out.block_until_ready()
    timings['denoise'] = time.perf_counter() - t0

    if output_type == 'latent':
      self.last_timings = timings
      return out
    t0 = time.perf_counter()
    images = np.asarray(self.decode_latents(out, height, width))
    timings['decode'] = time.perf_counter() - t0
    self.last_timings = timings
    return images

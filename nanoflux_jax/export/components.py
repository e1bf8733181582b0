"""Export-ready JAX functions for each pipeline component, batch 1.

Every builder returns `(fn, inputs)`: `fn(params, inputs) -> {name: array}`
and `inputs = {name: (shape, dtype)}`, the form `tflite.convert` takes.

Denoiser signatures (L image tokens, T text tokens, fixed at export):
  adaln:  img [1, L, in_ch], txt [1, T, ctx], timesteps [1] f32,
          y [1, vec] f32 (+ guidance [1] f32 for guidance-distilled models)
  static: img, txt, step [1] int32 (row of config.static_timesteps); no y.
  output: velocity [1, L, out_ch].
Position ids are baked in (fixed resolution), so RoPE becomes constants.

A chunked denoiser is a chain of files over consecutive blocks with named
hand-offs: the first chunk holds the input embedders (and, for adaln, emits
`vec`, the conditioning vector [1, D]); later chunks take img_h [1, L, D],
txt_h [1, T, D] (and vec or step); the last holds the final layer and emits
velocity. A runner keeps one dict of named tensors and feeds each file the
names it asks for.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import sampling
from nanoflux_jax.configs import ClipConfig, FluxConfig, T5Config, VAEConfig
from nanoflux_jax.models import downsample
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models import layers
from nanoflux_jax.models.clip import ClipTextModel
from nanoflux_jax.models.t5 import StudentTextEncoder, T5Encoder
from nanoflux_jax.models.vae import model_to_latents, vae_module

F32, I32 = np.float32, np.int32
_HEAD_KEYS = ('img_in', 'txt_in', 'time_in', 'guidance_in', 'vector_in')
_TAIL_KEYS = ('final_mod', 'final_linear')


def export_flux_config(cfg: FluxConfig) -> FluxConfig:
  """fp32, no remat, and jax.nn's attention (lowers to BATCH_MATMUL+SOFTMAX;
  the CPU 'per_head' lax.map would become a TFLite WHILE loop)."""
  return cfg.replace(attention_impl='xla', dtype='float32',
                     param_dtype='float32', remat=False)


def denoiser_inputs(cfg: FluxConfig, num_tokens: int,
                    txt_len: int) -> dict[str, tuple]:
  """The denoiser's exported inputs {name: (shape, dtype)}."""
  out = {'img': ((1, num_tokens, cfg.in_channels), F32),
         'txt': ((1, txt_len, cfg.context_in_dim), F32)}
  if cfg.modulation == 'static':
    out['step'] = ((1,), I32)
  else:
    out['timesteps'] = ((1,), F32)
    out['y'] = ((1, cfg.vec_in_dim), F32)
    if cfg.guidance_embed:
      out['guidance'] = ((1,), F32)
  return out


def _timesteps(cfg: FluxConfig, inputs) -> jax.Array:
  if cfg.modulation == 'static':
    # The model maps a timestep to its nearest table row; feeding the row's
    # own timestep makes that map the identity on the step index.
    table = jnp.asarray(cfg.static_timesteps, jnp.float32)
    return jnp.take(table, inputs['step'].astype(jnp.int32), axis=0)
  return inputs['timesteps']


def _ids(grid_h: int, grid_w: int, txt_len: int):
  """(img_ids [1, L, 3], txt_ids [1, T, 3]) as numpy constants, the same
  values as sampling.image_ids / text_ids (numpy so that building a function
  inside a jit trace still bakes constants)."""
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  ids = np.stack([np.zeros_like(rows), rows, cols], -1).astype(np.float32)
  return ids.reshape(1, -1, 3), np.zeros((1, txt_len, 3), np.float32)


def denoiser_fn(cfg: FluxConfig, grid_h: int, grid_w: int,
                txt_len: int) -> tuple[Callable, dict]:
  """The whole DiT as one function (what an unchunked file holds)."""
  cfg = export_flux_config(cfg)
  img_ids, txt_ids = _ids(grid_h, grid_w, txt_len)

  def fn(params, x):
    v = flux_lib.Flux(cfg).apply(
        {'params': params}, img=x['img'], img_ids=img_ids, txt=x['txt'],
        txt_ids=txt_ids, timesteps=_timesteps(cfg, x), y=x.get('y'),
        guidance=x.get('guidance'), img_grid=(grid_h, grid_w)).velocity
    return {'velocity': v.astype(jnp.float32)}

  return fn, denoiser_inputs(cfg, grid_h * grid_w, txt_len)


# ----------------------------------------------------------------------------
# Chunking.
# ----------------------------------------------------------------------------
def block_keys(cfg: FluxConfig) -> list[str]:
  return ([f'double_blocks_{i}' for i in range(cfg.depth)] +
          [f'single_blocks_{i}' for i in range(cfg.depth_single_blocks)])


def _bytes(tree, bytes_per_param: float) -> float:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) * bytes_per_param


# The down-sampler's params are split between the chunk that down-samples
# (before block downsample_start) and the one that up-samples (after block
# downsample_end); chunk key lists name the halves with these keys.
DOWN_KEY, UP_KEY = 'downsample_down', 'downsample_up'
_DOWN_PARTS = {DOWN_KEY: ('down_proj', 'down_res'), UP_KEY: ('up_res', 'merge')}


def chunk_params(params, keys: list[str]) -> dict:
  """The params of one chunk ({key: subtree}); `params` may be a tree of
  arrays or of ShapeDtypeStructs."""
  out = {}
  for k in keys:
    if k in _DOWN_PARTS:
      out[k] = {n: params['downsample'][n] for n in _DOWN_PARTS[k]}
    else:
      out[k] = params[k]
  return out


def plan_chunks(cfg: FluxConfig, params, max_bytes: float,
                bytes_per_param: float = 4.0) -> list[list[str]]:
  """Groups consecutive blocks into chunks of at most `max_bytes` of weights.

  The embedders join the first chunk and the final layer the last; the
  down-sampler's down half joins block downsample_start and its up half
  block downsample_end (DOWN_KEY / UP_KEY). A block larger than `max_bytes`
  gets a chunk of its own (blocks are never split). `params` may be shapes.

  Returns:
    A list of chunks, each a list of keys for `chunk_params`.
  Raises:
    NotImplementedError: params outside the block stack that no chunk
      covers (a scanned layout, say).
  """
  blocks = block_keys(cfg)
  head = [k for k in _HEAD_KEYS if k in params]
  tail = [k for k in _TAIL_KEYS if k in params]
  ds = cfg.downsample_start is not None
  extra = sorted(set(params) - set(blocks) - set(head) - set(tail) -
                 ({'downsample'} if ds else set()))
  if extra:
    raise NotImplementedError(
        f'chunked denoiser export: params {extra} are not covered; export '
        'unchunked (max_chunk_bytes=None)')
  units = [[k] for k in blocks]
  if ds:
    units[cfg.downsample_start] = [DOWN_KEY] + units[cfg.downsample_start]
    units[cfg.downsample_end] = units[cfg.downsample_end] + [UP_KEY]
  units[0] = head + units[0]
  units[-1] = units[-1] + tail
  chunks, cur, cur_bytes = [], [], 0.0
  for unit in units:
    b = _bytes(chunk_params(params, unit), bytes_per_param)
    if cur and cur_bytes + b > max_bytes:
      chunks.append(cur)
      cur, cur_bytes = [], 0.0
    cur, cur_bytes = cur + unit, cur_bytes + b
  chunks.append(cur)
  return chunks


def _block_index(cfg: FluxConfig, key: str) -> int:
  """Global index (double blocks first) of a block key."""
  i = int(key.rsplit('_', 1)[1])
  return i if key.startswith('double_blocks_') else cfg.depth + i


def _coarse(cfg: FluxConfig, g: int) -> bool:
  """Whether global block g runs on the down-sampled grid."""
  return (cfg.downsample_start is not None and
          cfg.downsample_start <= g <= cfg.downsample_end)


def chunk_signature(cfg: FluxConfig, keys: list[str], grid_h: int,
                    grid_w: int, txt_len: int) -> tuple[dict, list[str]]:
  """(inputs {name: (shape, dtype)}, output names) of one chunk."""
  d, n_img = cfg.hidden_size, grid_h * grid_w
  static = cfg.modulation == 'static'
  blocks = [k for k in keys if 'blocks_' in k]
  first, last = keys[0] in _HEAD_KEYS, keys[-1] in _TAIL_KEYS
  n_coarse = n_img // cfg.downsample_factor ** 2
  # A chunk starting inside the coarse range gets the detour's state.
  detour_in = _coarse(cfg, _block_index(cfg, blocks[0])) and DOWN_KEY not in keys
  detour_out = _coarse(cfg, _block_index(cfg, blocks[-1])) and UP_KEY not in keys
  if first:
    inputs = denoiser_inputs(cfg, n_img, txt_len)
  else:
    inputs = {'img_h': ((1, n_coarse if detour_in else n_img, d), F32),
              'txt_h': ((1, txt_len, d), F32)}
    inputs.update({'step': ((1,), I32)} if static else
                  {'vec': ((1, d), F32)})
    if detour_in:
      inputs.update(skip=((1, n_img, d), F32),
                    coarse_in=((1, n_coarse, d), F32))
  if last:
    outputs = ['velocity']
  else:
    outputs = ['img_h', 'txt_h'] + ([] if static else ['vec'])
    if detour_out:
      outputs += ['skip', 'coarse_in']
  return inputs, outputs


def chunk_fn(cfg: FluxConfig, keys: list[str], grid_h: int, grid_w: int,
             txt_len: int) -> tuple[Callable, dict]:
  """One chunk of consecutive blocks (see the module docstring for names).

  Inside the down-sampled range the hand-off also carries the detour's
  state: img_h is then coarse [1, L/f^2, D], plus skip [1, L, D] (the
  tokens before down-sampling) and coarse_in [1, L/f^2, D].
  """
  cfg = export_flux_config(cfg)
  dtype, pdtype = layers.dtypes(cfg)
  d = cfg.hidden_size
  first = keys[0] in _HEAD_KEYS
  static = cfg.modulation == 'static'
  img_ids, txt_ids = _ids(grid_h, grid_w, txt_len)
  grid = (grid_h, grid_w)
  inputs, outputs = chunk_signature(cfg, keys, grid_h, grid_w, txt_len)
  dense = lambda n, name: nn.DenseGeneral(n, dtype=dtype, param_dtype=pdtype,
                                          name=name)

  def fn(p, x):
    x = {n: x[n] for n in inputs}
    detour = {n: x[n] for n in ('skip', 'coarse_in') if n in x}
    vec = None
    if first:
      img = dense(d, 'img_in').apply({'params': p['img_in']}, x['img'])
      txt = dense(d, 'txt_in').apply({'params': p['txt_in']}, x['txt'])
      if not static:
        emb = lambda k, v: flux_lib.MLPEmbedder(cfg).apply(
            {'params': p[k]}, layers.timestep_embedding(v, 256))
        vec = emb('time_in', x['timesteps'])
        if cfg.guidance_embed:
          vec = vec + emb('guidance_in', x['guidance'])
        vec = vec + flux_lib.MLPEmbedder(cfg).apply(
            {'params': p['vector_in']}, x['y'])
    else:
      img, txt = x['img_h'], x['txt_h']
      vec = None if static else x['vec']
    cond = (flux_lib.static_step_index(_timesteps(cfg, x),
                                       cfg.static_timesteps)
            if static else vec)
    pe_full = layers.rope(jnp.concatenate([txt_ids, img_ids], axis=1),
                          cfg.axes_dim, cfg.theta)
    if cfg.downsample_start is not None:
      ids = downsample.coarse_ids(img_ids, grid, cfg.downsample_factor)
      pe_coarse = layers.rope(jnp.concatenate([txt_ids, ids], axis=1),
                              cfg.axes_dim, cfg.theta)
      sampler = downsample.TokenDownsampler(cfg)
    for k in keys:
      if k == DOWN_KEY:
        detour['skip'] = img
        img = detour['coarse_in'] = sampler.apply(
            {'params': p[k]}, img, grid, method='down')
      elif k == UP_KEY:
        img = sampler.apply({'params': p[k]}, img, detour.pop('coarse_in'),
                            detour.pop('skip'), grid, method='up')
      elif 'blocks_' in k:
        i = int(k.rsplit('_', 1)[1])
        pe = pe_coarse if _coarse(cfg, _block_index(cfg, k)) else pe_full
        if k.startswith('double_blocks_'):
          img, txt = flux_lib.DoubleStreamBlock(cfg, i).apply(
              {'params': p[k]}, img, txt, cond, pe)
        else:
          # Concatenating and splitting per block moves data only, so this
          # is the same math as Flux's single [txt, img] stream.
          xs = flux_lib.SingleStreamBlock(cfg, i).apply(
              {'params': p[k]}, jnp.concatenate([txt, img], axis=1), cond, pe)
          txt, img = xs[:, :txt_len], xs[:, txt_len:]
    if 'velocity' in outputs:
      shift, scale = flux_lib.Modulation(cfg, 2).apply(
          {'params': p['final_mod']}, cond)
      h = (1 + scale) * layers.layer_norm(img) + shift
      out = dense(cfg.out_dim, 'final_linear').apply(
          {'params': p['final_linear']}, h)
      return {'velocity': out.astype(jnp.float32)}
    values = dict(img_h=img, txt_h=txt, vec=vec, **detour)
    return {n: values[n] for n in outputs}

  return fn, inputs


def run_chunks_jax(cfg: FluxConfig, params, chunks: list[list[str]],
                   grid_h: int, grid_w: int, inputs: dict) -> jax.Array:
  """Chains the chunk functions in JAX (reference for the chunked files)."""
  state = dict(inputs)
  for keys in chunks:
    fn, _ = chunk_fn(cfg, keys, grid_h, grid_w, inputs['txt'].shape[1])
    state.update(fn(chunk_params(params, keys), state))
  return state['velocity']


# ----------------------------------------------------------------------------
# Text encoders and VAE decoder.
# ----------------------------------------------------------------------------
def t5_fn(cfg: T5Config, length: int,
          out_dim: int | None = None) -> tuple[Callable, dict]:
  """input_ids [1, length] int32 -> t5_embeds [1, length, width] f32.

  out_dim None: FLUX's T5Encoder (width d_model). Otherwise a distilled
  StudentTextEncoder (params {'t5', 'proj'}) projecting to width out_dim, so
  the file has the same signature and output name as the teacher's.
  """
  cfg = cfg.replace(dtype='float32', param_dtype='float32')
  model = (T5Encoder(cfg) if out_dim is None
           else StudentTextEncoder(cfg, out_dim))

  def fn(params, x):
    h = model.apply({'params': params}, x['input_ids'])
    return {'t5_embeds': h.astype(jnp.float32)}

  return fn, {'input_ids': ((1, length), I32)}


def clip_fn(cfg: ClipConfig, length: int = 77) -> tuple[Callable, dict]:
  """input_ids [1, length] int32 -> pooled [1, hidden] f32 (EOS pooling)."""
  cfg = cfg.replace(dtype='float32', param_dtype='float32')

  def fn(params, x):
    _, pooled = ClipTextModel(cfg).apply({'params': params}, x['input_ids'])
    return {'pooled': pooled.astype(jnp.float32)}

  return fn, {'input_ids': ((1, length), I32)}


def vae_decoder_fn(cfg: VAEConfig, grid_h: int, grid_w: int,
                   packed_channels: int) -> tuple[Callable, dict]:
  """latents [1, gh*gw, 4C] (packed, model space) -> image [1, H, W, 3] uint8.

  The whole post-processing of FluxPipeline.decode_latents is in the graph
  (unpack, x / scaling + shift, decode, round(clip(x/2 + 0.5) * 255)), so an
  app feeds the denoiser's output as it is and gets pixels back.
  """
  cfg = cfg.replace(dtype='float32', param_dtype='float32')
  h, w = 2 * grid_h, 2 * grid_w

  def fn(params, x):
    z = model_to_latents(sampling.unpack(x['latents'], h, w), cfg)
    img = vae_module(cfg).apply({'params': params}, z.transpose(0, 2, 3, 1),
                                method='decode').astype(jnp.float32)
    img = jnp.round(jnp.clip(img / 2 + 0.5, 0, 1) * 255)
    return {'image': img.astype(jnp.uint8)}

  return fn, {'latents': ((1, grid_h * grid_w, packed_channels), F32)}


def vae_decoder_params(vae_params) -> dict:
  """The decoder's subtree (the encoder is not exported), as `fn` expects."""
  if not vae_params:  # A parameter-free pixel codec.
    return {}
  if 'decoder' not in vae_params:
    raise KeyError(f'VAE params have no decoder/ subtree (keys: '
                   f'{sorted(vae_params)})')
  return {'decoder': vae_params['decoder']}


def describe(fn_inputs: dict[str, tuple]) -> dict[str, Any]:
  return {k: {'shape': list(s), 'dtype': np.dtype(t).name}
          for k, (s, t) in fn_inputs.items()}

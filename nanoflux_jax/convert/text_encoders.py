"""Import of HF transformers text encoders: T5 v1.1 encoder and CLIP text.

Both read an HF model folder (config.json plus model.safetensors, or shards
with model.safetensors.index.json, as FLUX.1's text_encoder_2/ ships) and go
through `load_strict`, so every missing, unexpected or mis-shaped tensor
raises one error naming it.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax.configs import ClipConfig
from nanoflux_jax.configs import T5Config
from nanoflux_jax.convert import loading
from nanoflux_jax.convert.loading import Entry
from nanoflux_jax.convert.loading import linear
from nanoflux_jax.convert.loading import load_strict
from nanoflux_jax.convert.loading import same
from nanoflux_jax.convert.safetensors_io import open_tensors
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.models.clip import ClipTextModel
from nanoflux_jax.models.t5 import T5Encoder


# ------------------------------------------------------------------ configs --
def _pick(fname: str, d: dict[str, Any], mapping: dict[str, str],
          hf_defaults: dict[str, Any]) -> dict[str, Any]:
  """Our field -> d[HF field], falling back to transformers' own default.

  A missing field means what it means to transformers (its config class
  default), not what our preset happens to use.
  """
  out = {}
  for ours, hf in mapping.items():
    value, default = d.get(hf, hf_defaults[hf]), hf_defaults[hf]
    kind = int if isinstance(default, int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
      raise CheckpointError(f'{fname}: {hf}={value!r} is not a non-negative '
                            f'{"integer" if kind is int else "number"}')
    out[ours] = value
  return out


# transformers' T5Config / CLIPTextConfig defaults (transformers 4.x and 5.x).
_T5_DEFAULTS = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
    num_heads=8, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
_CLIP_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048,
    num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
    layer_norm_eps=1e-5, eos_token_id=49407)


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def t5_config_from_hf(path: str) -> T5Config:
  """Reads an HF T5 (v1.1) config.json into a T5Config."""
  fname, d = loading.read_config_json(path)
  ffn = d.get('feed_forward_proj', 'relu')
  if ffn != 'gated-gelu':
    raise CheckpointError(f'{fname}: feed_forward_proj={ffn!r} is not '
                          "supported; only T5 v1.1's 'gated-gelu'")
  # dense_act_fn is not checked: transformers derives it from
  # feed_forward_proj ('gated-gelu' -> gelu_new) whatever the file says.
  if d.get('is_decoder', False):
    raise CheckpointError(f'{fname}: is_decoder=true; expected an encoder')
  mapping = dict(
      vocab_size='vocab_size', d_model='d_model', d_kv='d_kv', d_ff='d_ff',
      num_layers='num_layers', num_heads='num_heads',
      relative_attention_num_buckets='relative_attention_num_buckets',
      relative_attention_max_distance='relative_attention_max_distance',
      layer_norm_epsilon='layer_norm_epsilon')
  kw = _pick(fname, d, mapping, _T5_DEFAULTS)
  try:
    return T5Config(**kw)
  except ValueError as e:
    raise CheckpointError(f'{fname}: {e}') from e


def clip_config_from_hf(path: str) -> ClipConfig:
  """Reads an HF CLIPTextModel config.json into a ClipConfig."""
  fname, d = loading.read_config_json(path)
  if d.get('model_type') == 'clip' or 'text_config' in d:
    raise CheckpointError(f'{fname}: a full CLIPModel config; point at a '
                          'CLIPTextModel folder (e.g. FLUX text_encoder/)')
  act = d.get('hidden_act', 'quick_gelu')
  if act != 'quick_gelu':
    raise CheckpointError(f'{fname}: hidden_act={act!r} is not supported; '
                          "only 'quick_gelu'")
  mapping = dict(
      vocab_size='vocab_size', hidden_size='hidden_size',
      intermediate_size='intermediate_size', num_layers='num_hidden_layers',
      num_heads='num_attention_heads',
      max_position_embeddings='max_position_embeddings',
      layer_norm_eps='layer_norm_eps', eos_token_id='eos_token_id')
  kw = _pick(fname, d, mapping, _CLIP_DEFAULTS)
  if not kw['num_heads'] or kw['hidden_size'] % kw['num_heads']:
    raise CheckpointError(
        f'{fname}: hidden_size={kw["hidden_size"]} is not divisible by '
        f'num_attention_heads={kw["num_heads"]}')
  try:
    return ClipConfig(**kw)
  except ValueError as e:
    raise CheckpointError(f'{fname}: {e}') from e


# ------------------------------------------------------------------- plans --
def _check(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  # A transposed [in, out] weight would reshape silently when the element
  # counts agree; compare the source shape itself.
  if tuple(w.shape) != shape:
    raise ValueError(f'source shape {tuple(w.shape)}, expected {shape}')
  return w


def _heads_in(key: str, d: int, heads: int, head_dim: int) -> Entry:
  """torch [H*Dh, D] q/k/v weight -> flax [D, H, Dh] kernel."""
  return Entry((key,), lambda w: _check(w, (heads * head_dim, d)).T.reshape(
      d, heads, head_dim))


def _heads_out(key: str, d: int, heads: int, head_dim: int) -> Entry:
  """torch [D, H*Dh] output weight -> flax [H, Dh, D] kernel."""
  return Entry((key,), lambda w: _check(w, (d, heads * head_dim)).T.reshape(
      heads, head_dim, d))


def _heads_bias(key: str, heads: int, head_dim: int) -> Entry:
  """torch [H*Dh] bias -> flax [H, Dh]."""
  return Entry((key,), lambda b: _check(b, (heads * head_dim,)).reshape(
      heads, head_dim))


def t5_plan(cfg: T5Config, keys: set[str]) -> dict[str, Entry]:
  """Our param path -> Entry for transformers' T5EncoderModel keys.

  `shared.weight` and `encoder.embed_tokens.weight` are the same tied
  embedding; a checkpoint may hold either or both. We read one and list both
  as sources so that neither counts as unexpected.
  """
  emb = tuple(k for k in ('shared.weight', 'encoder.embed_tokens.weight')
              if k in keys) or ('shared.weight',)
  plan = {
      'token_embed/embedding': Entry(emb, lambda w, *_: w),
      'relative_attention_bias': same(
          'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.'
          'weight'),
      'final_norm/scale': same('encoder.final_layer_norm.weight'),
  }
  dims = cfg.d_model, cfg.num_heads, cfg.d_kv
  for i in range(cfg.num_layers):
    hf, ours = f'encoder.block.{i}.layer', f'layers_{i}'
    plan[f'{ours}/attn_norm/scale'] = same(f'{hf}.0.layer_norm.weight')
    for n in 'qkv':
      plan[f'{ours}/attn/{n}/kernel'] = _heads_in(
          f'{hf}.0.SelfAttention.{n}.weight', *dims)
    plan[f'{ours}/attn/o/kernel'] = _heads_out(
        f'{hf}.0.SelfAttention.o.weight', *dims)
    plan[f'{ours}/ffn_norm/scale'] = same(f'{hf}.1.layer_norm.weight')
    for n in ('wi_0', 'wi_1', 'wo'):
      plan[f'{ours}/ffn/{n}/kernel'] = linear(
          f'{hf}.1.DenseReluDense.{n}.weight')
  return plan


def clip_plan(cfg: ClipConfig, keys: set[str]) -> dict[str, Entry]:
  """Our param path -> Entry for transformers' CLIPTextModel keys.

  transformers 4.x writes keys under `text_model.` (FLUX.1's text_encoder/
  does); transformers 5 writes them without that prefix. The layout is picked
  from the checkpoint's keys; a mix of both leaves keys unexpected and raises.
  Older checkpoints also store the `embeddings.position_ids` buffer (an
  arange, not a parameter); it is listed as an extra source of the position
  embedding so that it is consumed, and otherwise ignored.
  """
  legacy = any(k.startswith('text_model.') for k in keys)
  p = 'text_model.' if legacy else ''
  pos_src = (f'{p}embeddings.position_embedding.weight',)
  if f'{p}embeddings.position_ids' in keys:
    pos_src += (f'{p}embeddings.position_ids',)
  plan = {
      'token_embed/embedding': same(f'{p}embeddings.token_embedding.weight'),
      'position_embedding': Entry(pos_src, lambda w, *_: w,
                                  any_dtype=pos_src[1:]),
      'final_layer_norm/scale': same(f'{p}final_layer_norm.weight'),
      'final_layer_norm/bias': same(f'{p}final_layer_norm.bias'),
  }
  dims = (cfg.hidden_size, cfg.num_heads, cfg.hidden_size // cfg.num_heads)
  for i in range(cfg.num_layers):
    hf, ours = f'{p}encoder.layers.{i}', f'layers_{i}'
    for n in ('layer_norm1', 'layer_norm2'):
      plan[f'{ours}/{n}/scale'] = same(f'{hf}.{n}.weight')
      plan[f'{ours}/{n}/bias'] = same(f'{hf}.{n}.bias')
    for n in 'qkv':
      plan[f'{ours}/attn/{n}/kernel'] = _heads_in(
          f'{hf}.self_attn.{n}_proj.weight', *dims)
      plan[f'{ours}/attn/{n}/bias'] = _heads_bias(
          f'{hf}.self_attn.{n}_proj.bias', *dims[1:])
    plan[f'{ours}/attn/out/kernel'] = _heads_out(
        f'{hf}.self_attn.out_proj.weight', *dims)
    plan[f'{ours}/attn/out/bias'] = same(f'{hf}.self_attn.out_proj.bias')
    for n in ('fc1', 'fc2'):
      plan[f'{ours}/mlp/{n}/kernel'] = linear(f'{hf}.mlp.{n}.weight')
      plan[f'{ours}/mlp/{n}/bias'] = same(f'{hf}.mlp.{n}.bias')
  return plan


# ----------------------------------------------------------------- loaders --
def param_shapes(model: nn.Module) -> dict:
  """The param tree as unboxed ShapeDtypeStructs; nothing is allocated."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), ids)
  return nn.unbox(variables)['params']


def _model_folder(path, what: str) -> str:
  """The HF model folder `path`, or a CheckpointError naming it."""
  path = os.fspath(path)
  if os.path.isfile(path):
    raise CheckpointError(
        f'{path}: is a file; {what} loads an HF model folder (config.json '
        'beside model.safetensors or its shards), e.g. FLUX.1\'s '
        f'{"text_encoder_2" if what == "load_t5_encoder" else "text_encoder"}/')
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: no such folder ({what} loads an HF model '
                          'folder)')
  return path


def _load(path, cfg, model_cls, plan_fn, dtype, shardings, nonfinite):
  loading.check_nonfinite_option(nonfinite)
  if dtype is not None:
    # Params are stored in `dtype`; compute follows, as for FLUX's bf16 T5.
    cfg = cfg.replace(dtype=_dtype_name(dtype), param_dtype=_dtype_name(dtype))
  target = param_shapes(model_cls(cfg))
  if callable(shardings):  # (config, param shapes) -> shardings.
    shardings = shardings(cfg, target)
  source = open_tensors(path)
  try:
    params = load_strict(source, plan_fn(cfg, set(source)), target,
                         dtype=dtype, shardings=shardings,
                         origin=os.fspath(path), nonfinite=nonfinite)
  finally:
    source.close()
  return cfg, params


def load_t5_encoder(path: str, dtype=None, shardings: Any = None, *,
                    nonfinite: str = 'warn') -> tuple[T5Config, dict]:
  """Loads an HF T5EncoderModel folder (e.g. FLUX.1's text_encoder_2/).

  Args:
    path: folder with config.json and model.safetensors (or shards with
      model.safetensors.index.json).
    dtype: None keeps the config's float32 params; otherwise params are cast
      to `dtype` and the returned config's dtype and param_dtype are set to it.
    shardings: optional nested dict of jax Shardings like the param tree,
      or a callable (config, param_shapes) -> such a tree (e.g.
      `models.sharding.t5_loading_shardings(mesh)`); each tensor is placed onto
      its sharding as soon as it is converted (no host copy of the model).
    nonfinite: 'warn', 'error' or 'ignore' for NaN / inf params (see
      loading.load_strict).
  Returns:
    (config, params) for `T5Encoder(config).apply({'params': params}, ...)`.
  Raises:
    CheckpointError: naming the folder, file or keys.
  """
  path = _model_folder(path, 'load_t5_encoder')
  return _load(path, t5_config_from_hf(path), T5Encoder, t5_plan, dtype,
               shardings, nonfinite)


def load_clip_text(path: str, dtype=None, shardings: Any = None, *,
                   nonfinite: str = 'warn') -> tuple[ClipConfig, dict]:
  """Loads an HF CLIPTextModel folder (e.g. FLUX.1's text_encoder/).

  Args:
    path: folder with config.json and model.safetensors (or shards).
    dtype: as for `load_t5_encoder`.
    shardings: optional nested dict of jax Shardings like the param tree.
    nonfinite: as for `load_t5_encoder`.
  Returns:
    (config, params) for `ClipTextModel(config).apply({'params': params}, ...)`.
  Raises:
    CheckpointError: naming the folder, file or keys.
  """
  path = _model_folder(path, 'load_clip_text')
  return _load(path, clip_config_from_hf(path), ClipTextModel, clip_plan,
               dtype, shardings, nonfinite)


__all__ = ['load_t5_encoder', 'load_clip_text', 't5_config_from_hf',
           'clip_config_from_hf', 't5_plan', 'clip_plan', 'param_shapes']

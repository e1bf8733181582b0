"""Import of a transformers `CLIPModel` folder (both towers) for CLIP scoring.

The folder is what `CLIPModel.save_pretrained` (or a snapshot of
openai/clip-vit-large-patch14) holds: config.json with text_config and
vision_config, model.safetensors (or shards with an index). Tensors stream
one by one through `load_strict`: every missing, unexpected or mis-shaped
tensor raises one CheckpointError naming it, and with `shardings` each lands
on its devices as soon as it is converted.

Keys: text_model.* (the text tower, as in FLUX.1's text_encoder/ written by
transformers 4.x), vision_model.*, text_projection.weight,
visual_projection.weight and logit_scale; older snapshots also store the
`embeddings.position_ids` buffers, which are consumed and ignored.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from nanoflux_jax.configs import ClipConfig
from nanoflux_jax.configs import ClipModelConfig
from nanoflux_jax.configs import ClipVisionConfig
from nanoflux_jax.convert import loading
from nanoflux_jax.convert import text_encoders
from nanoflux_jax.convert.loading import Entry
from nanoflux_jax.convert.loading import linear
from nanoflux_jax.convert.loading import load_strict
from nanoflux_jax.convert.loading import same
from nanoflux_jax.convert.safetensors_io import open_tensors
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.models import clip_vision

# transformers' CLIPVisionConfig / CLIPConfig defaults (4.x and 5.x): a field
# missing from config.json means what it means to transformers.
_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
    layer_norm_eps=1e-5)
_PROJECTION_DIM_DEFAULT = 512


def _act(fname: str, where: str, d: dict) -> None:
  act = d.get('hidden_act', 'quick_gelu')
  if act != 'quick_gelu':
    raise CheckpointError(f'{fname}: {where}.hidden_act={act!r} is not '
                          "supported; only 'quick_gelu'")


def clip_model_config_from_hf(path: str) -> ClipModelConfig:
  """Reads a transformers CLIPModel config.json into a ClipModelConfig."""
  fname, d = loading.read_config_json(path)
  if 'vision_config' not in d or 'text_config' not in d:
    raise CheckpointError(
        f'{fname}: not a CLIPModel config (no text_config / vision_config); '
        'point at a full CLIP folder such as a local save of '
        'openai/clip-vit-large-patch14')
  tc, vc = d['text_config'] or {}, d['vision_config'] or {}
  _act(fname, 'text_config', tc)
  _act(fname, 'vision_config', vc)
  # pylint: disable=protected-access
  text = text_encoders._pick(fname, tc, dict(
      vocab_size='vocab_size', hidden_size='hidden_size',
      intermediate_size='intermediate_size', num_layers='num_hidden_layers',
      num_heads='num_attention_heads',
      max_position_embeddings='max_position_embeddings',
      layer_norm_eps='layer_norm_eps', eos_token_id='eos_token_id'),
                             text_encoders._CLIP_DEFAULTS)
  vision = text_encoders._pick(fname, vc, dict(
      hidden_size='hidden_size', intermediate_size='intermediate_size',
      num_layers='num_hidden_layers', num_heads='num_attention_heads',
      num_channels='num_channels', image_size='image_size',
      patch_size='patch_size', layer_norm_eps='layer_norm_eps'),
                               _VISION_DEFAULTS)
  proj = text_encoders._pick(fname, d, dict(projection_dim='projection_dim'),
                             dict(projection_dim=_PROJECTION_DIM_DEFAULT))
  # pylint: enable=protected-access
  try:
    return ClipModelConfig(text=ClipConfig(**text),
                           vision=ClipVisionConfig(**vision), **proj)
  except ValueError as e:
    raise CheckpointError(f'{fname}: {e}') from e


def _vision_layer_plan(cfg: ClipVisionConfig) -> dict[str, Entry]:
  """The vision layers' entries: the text tower's layer plan (same keys under
  encoder.layers.{i}) moved from text_model. to vision_model."""
  text_plan = text_encoders.clip_plan(cfg.layer_config(), {'text_model.'})
  out = {}
  for path, entry in text_plan.items():
    if path.startswith('layers_'):
      out[path] = dataclasses.replace(entry, sources=tuple(
          k.replace('text_model.', 'vision_model.', 1)
          for k in entry.sources))
  return out


def clip_model_plan(cfg: ClipModelConfig, keys: set[str]) -> dict[str, Entry]:
  """Our param path -> Entry for transformers' CLIPModel keys."""
  if not any(k.startswith('text_model.') for k in keys):
    raise CheckpointError('CLIPModel checkpoint: no text_model.* keys; is '
                          'this a CLIPTextModel or CLIPVisionModel folder?')
  plan = {f'text/{k}': e for k, e in text_encoders.clip_plan(
      cfg.text, keys).items()}
  v, vision = 'vision_model.', cfg.vision
  pos_src = (f'{v}embeddings.position_embedding.weight',)
  if f'{v}embeddings.position_ids' in keys:  # A buffer, consumed unused.
    pos_src += (f'{v}embeddings.position_ids',)
  p, d, c = vision.patch_size, vision.hidden_size, vision.num_channels

  def patch(w):
    if tuple(w.shape) != (d, c, p, p):
      raise ValueError(f'source shape {tuple(w.shape)}, expected '
                       f'{(d, c, p, p)}')
    return w.transpose(2, 3, 1, 0)  # [D, C, p, p] -> [p, p, C, D]

  plan.update({
      'vision/patch_embed/kernel': Entry(
          (f'{v}embeddings.patch_embedding.weight',), patch),
      'vision/class_embedding': same(f'{v}embeddings.class_embedding'),
      'vision/position_embedding': Entry(pos_src, lambda w, *_: w,
                                         any_dtype=pos_src[1:]),
      # transformers' attribute is spelled pre_layrnorm.
      'vision/pre_layernorm/scale': same(f'{v}pre_layrnorm.weight'),
      'vision/pre_layernorm/bias': same(f'{v}pre_layrnorm.bias'),
      'vision/post_layernorm/scale': same(f'{v}post_layernorm.weight'),
      'vision/post_layernorm/bias': same(f'{v}post_layernorm.bias'),
      'text_projection/kernel': linear('text_projection.weight'),
      'visual_projection/kernel': linear('visual_projection.weight'),
      'logit_scale': Entry(('logit_scale',), lambda w: np.reshape(w, ())),
  })
  plan.update({f'vision/{k}': e
               for k, e in _vision_layer_plan(vision).items()})
  return plan


def load_clip_model(path: str, dtype=None, shardings: Any = None, *,
                    nonfinite: str = 'warn') -> tuple[ClipModelConfig, dict]:
  """Loads a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14).

  Args:
    path: folder with config.json and model.safetensors (or shards).
    dtype: None keeps float32 params; otherwise params are cast to `dtype`
      and both towers' dtype / param_dtype are set to it.
    shardings: optional nested dict of jax Shardings like the param tree, or
      a callable (config, param_shapes) -> such a tree (e.g.
      `clip_vision.loading_shardings(mesh)`).
    nonfinite: 'warn', 'error' or 'ignore' (see loading.load_strict).
  Returns:
    (config, params) for `clip_vision.ClipModel(config)`.
  Raises:
    CheckpointError: naming the folder, file or keys.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: not a folder; load_clip_model reads a '
                          'transformers CLIPModel folder (config.json beside '
                          'model.safetensors)')
  loading.check_nonfinite_option(nonfinite)
  cfg = clip_model_config_from_hf(path)
  if dtype is not None:
    name = jnp.dtype(dtype).name
    kw = dict(dtype=name, param_dtype=name)
    cfg = cfg.replace(text=cfg.text.replace(**kw),
                      vision=cfg.vision.replace(**kw))
  target = clip_vision.param_shapes(cfg)
  if callable(shardings):
    shardings = shardings(cfg, target)
  source = open_tensors(path)
  try:
    params = load_strict(source, clip_model_plan(cfg, set(source)), target,
                         dtype=dtype, shardings=shardings, origin=path,
                         nonfinite=nonfinite)
  finally:
    source.close()
  return cfg, params


__all__ = ['load_clip_model', 'clip_model_config_from_hf', 'clip_model_plan']

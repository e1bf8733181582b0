"""CLIP's vision tower and the dual-tower CLIP model, matching transformers.

`ClipVisionModel` is `transformers.CLIPVisionModel` (ViT: a bias-free patch
conv, a learned CLS token and absolute positions, a pre-LayerNorm, the text
tower's pre-LN quick-GELU layers without a mask, and a post-LayerNorm on the
CLS state). `ClipModel` is `transformers.CLIPModel`: both towers, their
bias-free projections and the learned logit scale; it scores generated images
against their prompts (evaluate/clip_score.py). The encoder layers, the
attention and the fp32 LayerNorm are models.clip's, shared with the text
tower.

Images enter channels-last: pixel_values [B, H, W, 3], already resized,
cropped and normalised (evaluate.clip_score.preprocess).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanoflux_jax import parallel
from nanoflux_jax.configs import ClipModelConfig
from nanoflux_jax.configs import ClipVisionConfig
from nanoflux_jax.models import layers
from nanoflux_jax.models.clip import ClipLayer
from nanoflux_jax.models.clip import ClipTextModel
from nanoflux_jax.models.clip import LayerNorm

_RESIDUAL = ('act_batch', 'act_len', 'act_embed')


class ClipVisionModel(nn.Module):
  """CLIP ViT: patches + CLS -> pre-LN -> layers -> post-LN(CLS).

  Param tree: patch_embed/kernel [p, p, C, D], class_embedding [D],
  position_embedding [1 + (S/p)^2, D], pre_layernorm, layers_{i}/{layer_norm1,
  attn/{q,k,v,out}, layer_norm2, mlp/{fc1,fc2}} (models.clip.ClipLayer),
  post_layernorm.

  Attributes:
    config: the vision tower config.
  """
  config: ClipVisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes images.

    Args:
      pixel_values: [B, S, S, C] normalised pixels, S = config.image_size.
    Returns:
      last_hidden_state: [B, 1 + (S/p)^2, D] (CLS first), before post-LN.
      pooled: [B, D], the post-LayerNorm CLS state.
    """
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, h, w, c = pixel_values.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(
          f'ClipVisionModel: pixel_values of shape {pixel_values.shape}; '
          f'expected [B, {cfg.image_size}, {cfg.image_size}, '
          f'{cfg.num_channels}] (preprocess images first)')
    p, d = cfg.patch_size, cfg.hidden_size
    x = nn.Conv(
        d, (p, p), strides=(p, p), padding='VALID', use_bias=False,
        dtype=dtype, param_dtype=pdtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, None, 'embed')),
        name='patch_embed')(pixel_values.astype(dtype))  # [B, g, g, D]
    # Row-major over the patch grid: torch's flatten(2) of [B, D, g, g].
    x = x.reshape(b, -1, d)
    cls = self.param('class_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('embed',)), (d,), pdtype)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x], axis=1)
    pos = self.param('position_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, 'embed')), (x.shape[1], d),
                     pdtype)
    x = x + pos.astype(dtype)[None]
    norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name=name)
    x = nn.with_logical_constraint(norm('pre_layernorm')(x), _RESIDUAL)
    layer_cfg = cfg.layer_config()
    everywhere = jnp.ones((1, 1, 1, 1), bool)  # Bidirectional, no padding.
    for i in range(cfg.num_layers):
      x = ClipLayer(layer_cfg, name=f'layers_{i}')(x, everywhere)
    return x, norm('post_layernorm')(x[:, 0])


def _normalize(x: jax.Array) -> jax.Array:
  """x / ||x|| over the last axis, in fp32 (transformers' _get_vector_norm)."""
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipModel(nn.Module):
  """`transformers.CLIPModel`: text and image embeddings and their logits.

  Param tree: text/ (models.clip.ClipTextModel), vision/ (ClipVisionModel),
  text_projection/kernel [Dt, P], visual_projection/kernel [Dv, P],
  logit_scale [] (log of the temperature's inverse).

  Attributes:
    config: the dual-tower config.
  """
  config: ClipModelConfig

  def setup(self):
    cfg = self.config
    self.text = ClipTextModel(cfg.text)
    self.vision = ClipVisionModel(cfg.vision)

    def proj(name, tower):
      return layers.dense(cfg.projection_dim, ('embed', None), name=name,
                          dtype=jnp.dtype(tower.dtype),
                          param_dtype=jnp.dtype(tower.param_dtype),
                          use_bias=False)

    self.text_projection = proj('text_projection', cfg.text)
    self.visual_projection = proj('visual_projection', cfg.vision)
    # transformers' logit_scale_init_value: log(1 / 0.07).
    self.logit_scale = self.param(
        'logit_scale', nn.with_logical_partitioning(
            nn.initializers.constant(2.6592), ()), (), jnp.float32)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """[B, S, S, C] normalised pixels -> [B, P] projected, unnormalised
    (transformers' get_image_features)."""
    return self.visual_projection(self.vision(pixel_values)[1])

  def text_features(self, input_ids: jax.Array,
                    attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """[B, T] token ids (and optional [B, T] mask) -> [B, P] projected,
    unnormalised (transformers' get_text_features)."""
    return self.text_projection(self.text(input_ids, attention_mask)[1])

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> dict:
    """Both towers, as transformers' CLIPModel.forward.

    Args:
      input_ids: [Bt, T] token ids.
      pixel_values: [Bi, S, S, C] normalised pixels.
      attention_mask: optional [Bt, T], 1 for tokens, 0 for padding.
    Returns:
      dict of fp32 text_embeds [Bt, P] and image_embeds [Bi, P] (unit norm),
      logits_per_image [Bi, Bt] = exp(logit_scale) * cosine, and
      logits_per_text [Bt, Bi].
    """
    image = _normalize(self.image_features(pixel_values))
    text = _normalize(self.text_features(input_ids, attention_mask))
    logits_per_text = jnp.exp(self.logit_scale) * (text @ image.T)
    return dict(text_embeds=text, image_embeds=image,
                logits_per_text=logits_per_text,
                logits_per_image=logits_per_text.T)


def dummy_inputs(cfg: ClipModelConfig) -> tuple[jax.Array, jax.Array]:
  """(input_ids [1, 1], pixel_values [1, S, S, C]) that reach every param."""
  s = cfg.vision.image_size
  return (jnp.zeros((1, 1), jnp.int32),
          jnp.zeros((1, s, s, cfg.vision.num_channels), jnp.float32))


def param_shapes(cfg: ClipModelConfig) -> dict:
  """The unboxed param tree of ClipModel(cfg) as ShapeDtypeStructs."""
  variables = jax.eval_shape(ClipModel(cfg).init, jax.random.key(0),
                             *dummy_inputs(cfg))
  return nn.unbox(variables)['params']


def loading_shardings(mesh, rules=None):
  """`load_clip_model(path, shardings=loading_shardings(mesh))`: each CLIP
  tensor goes straight onto its shard by the logical-axis rules."""
  rules = parallel.RULES if rules is None else rules

  def shardings(cfg: ClipModelConfig, shapes):
    del shapes
    return parallel.variable_shardings(ClipModel(cfg), mesh, rules,
                                       *dummy_inputs(cfg))['params']
  return shardings


def image_embeddings(cfg: ClipModelConfig, params,
                     pixel_values: jax.Array) -> jax.Array:
  """Unit-norm image embeddings [B, P] (fp32) of normalised pixels."""
  return _normalize(ClipModel(cfg).apply({'params': params}, pixel_values,
                                         method='image_features'))


def text_embeddings(cfg: ClipModelConfig, params, input_ids: jax.Array
                    ) -> jax.Array:
  """Unit-norm text embeddings [B, P] (fp32) of token ids [B, T]."""
  return _normalize(ClipModel(cfg).apply({'params': params}, input_ids,
                                         method='text_features'))

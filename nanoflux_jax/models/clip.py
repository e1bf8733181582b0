"""The CLIP text transformer (FLUX.1's text_encoder), matching HF transformers.

FLUX reads only the pooled vector (the final-LayerNorm state at the EOS token)
of CLIP ViT-L/14's text tower. The model is a causal, pre-LN transformer with
learned absolute positions and a quick-GELU MLP, as in
`transformers.CLIPTextModel`.

Parameters carry logical axis names; attention kernels keep heads as their own
axis ([embed, heads, kv]) so that heads can be sharded and pruned.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanoflux_jax.configs import ClipConfig
from nanoflux_jax.models import layers

_RESIDUAL = ('act_batch', 'act_len', 'act_embed')


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x), CLIP's GELU approximation."""
  return x * jax.nn.sigmoid(1.702 * x)


class LayerNorm(nn.Module):
  """Affine LayerNorm computed in fp32 with the two-pass variance.

  flax's nn.LayerNorm defaults to the one-pass E[x^2] - E[x]^2 variance, which
  loses precision against torch's; we want exact parity.

  Attributes:
    eps: added to the variance.
    dtype: output dtype.
    param_dtype: dtype of scale and bias.
  """
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D]."""
    d = x.shape[-1]
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
        (d,), self.param_dtype)
    bias = self.param(
        'bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
        (d,), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)
                          + self.eps)
    x = x * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return x.astype(self.dtype)


class ClipAttention(nn.Module):
  """Multi-head self-attention with biases, scaled by 1/sqrt(head_dim).

  Attributes:
    config: the text model config.
  """
  config: ClipConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Self-attention.

    Args:
      x: [B, T, D] normalised hidden states.
      mask: [B or 1, 1, T, T] bool, True where a query may attend to a key.
    Returns:
      [B, T, D].
    """
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    heads = cfg.num_heads
    head_dim = cfg.hidden_size // heads
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

    def proj(name):
      return layers.dense((heads, head_dim), ('embed', 'heads', 'kv'),
                          name=name, dtype=dtype, param_dtype=pdtype,
                          kernel_init=init)(x)

    q, k, v = proj('q'), proj('k'), proj('v')  # [B, T, H, Dh]
    # transformers scales the logits (not q) by head_dim**-0.5; same order
    # here so fp32 results agree to rounding.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    logits = logits * (head_dim ** -0.5)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return layers.dense(cfg.hidden_size, ('heads', 'kv', 'embed'), name='out',
                        in_axes=2, dtype=dtype, param_dtype=pdtype,
                        kernel_init=init)(out)


class ClipMLP(nn.Module):
  """fc2(quick_gelu(fc1(x))).

  Attributes:
    config: the text model config.
  """
  config: ClipConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

    def dense(features, axes, name):
      return layers.dense(features, axes, name=name, dtype=dtype,
                          param_dtype=pdtype, kernel_init=init)

    h = quick_gelu(dense(cfg.intermediate_size, ('embed', 'mlp'), 'fc1')(x))
    return dense(cfg.hidden_size, ('mlp', 'embed'), 'fc2')(h)


class ClipLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)).

  Attributes:
    config: the text model config.
  """
  config: ClipConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T, D] and mask [B or 1, 1, T, T] -> [B, T, D]."""
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name=name)
    x = x + ClipAttention(cfg, name='attn')(norm('layer_norm1')(x), mask)
    x = nn.with_logical_constraint(x, _RESIDUAL)
    x = x + ClipMLP(cfg, name='mlp')(norm('layer_norm2')(x))
    return nn.with_logical_constraint(x, _RESIDUAL)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Where CLIPTextTransformer pools, [B] int32.

  transformers keeps a legacy rule: configs with eos_token_id == 2 (those
  written before PR #24773, FLUX's included) pool at argmax(input_ids), the
  EOT token having the largest id in the original vocabulary; other configs
  pool at the first occurrence of eos_token_id (0 when absent).

  Args:
    input_ids: [B, T] int token ids.
    eos_token_id: the config's eos_token_id.
  """
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32),
                    axis=-1).astype(jnp.int32)


class ClipTextModel(nn.Module):
  """CLIP text transformer: embeddings -> causal layers -> LN -> EOS pool.

  Param tree: token_embed/embedding [vocab, D], position_embedding [P, D],
  layers_{i}/{layer_norm1, attn/{q,k,v,out}, layer_norm2, mlp/{fc1,fc2}},
  final_layer_norm.

  Attributes:
    config: the text model config.
  """
  config: ClipConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, jax.Array]:
    """Encodes token ids.

    Args:
      input_ids: [B, T] int token ids, T <= max_position_embeddings.
      attention_mask: optional [B, T], 1 (or True) for tokens, 0 for padding;
        combined with the causal mask. None: causal mask only (what FLUX
        does).
    Returns:
      last_hidden_state: [B, T, D] after the final LayerNorm.
      pooled: [B, D], last_hidden_state at the EOS position.
    """
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t = input_ids.shape
    if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads:
      raise ValueError(f'ClipTextModel: hidden_size={cfg.hidden_size} is not '
                       f'divisible by num_heads={cfg.num_heads}')
    if t > cfg.max_position_embeddings:
      raise ValueError(f'ClipTextModel: sequence length {t} exceeds '
                       f'max_position_embeddings={cfg.max_position_embeddings}')
    tok = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ('vocab', 'embed')),
        name='token_embed')(input_ids)
    pos = self.param(
        'position_embedding',
        nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                     (None, 'embed')),
        (cfg.max_position_embeddings, cfg.hidden_size), pdtype)
    x = tok + pos[:t].astype(dtype)[None]
    x = nn.with_logical_constraint(x, _RESIDUAL)

    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, T]
    if attention_mask is not None:
      keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
      mask = mask & keep
    for i in range(cfg.num_layers):
      x = ClipLayer(cfg, name=f'layers_{i}')(x, mask)
    x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name='final_layer_norm')(x)
    pooled = x[jnp.arange(b), eos_positions(input_ids, cfg.eos_token_id)]
    return x, pooled

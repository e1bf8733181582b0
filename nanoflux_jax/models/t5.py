"""The T5 v1.1 encoder (FLUX.1's text_encoder_2), matching HF transformers.

T5 v1.1 differs from a textbook transformer encoder in ways that all matter
for parity with `transformers.T5EncoderModel`:
  * RMS layer norm (no mean subtraction, no bias), computed in fp32;
  * no biases anywhere, and no 1/sqrt(d) attention scaling (the scale is folded
    into the initialisation of q);
  * a learned relative position bias [num_buckets, heads] that lives in the
    first layer and is added to the attention logits of every layer;
  * a gated-GELU FFN: wo(gelu_tanh(wi_0 x) * wi_1 x).

Parameters carry logical axis names so that the 4.7B XXL encoder can be
sharded over heads / mlp / embed (see parallel.py). Attention kernels keep
heads as their own axis ([embed, heads, kv]) so that heads can be sharded and
pruned without reshaping.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax.configs import T5Config
from nanoflux_jax.models import layers

_RESIDUAL = ('act_batch', 'act_len', 'act_embed')


def _dtype(name: str):
  return jnp.dtype(name)


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets, exactly as transformers computes them.

  Computed with numpy in float32 at trace time (sequence lengths are static),
  so the bucket table is a constant: it never depends on the accelerator's
  `log` approximation, which could move a position across a bucket boundary.

  Args:
    relative_position: int array, memory_position - query_position.
    num_buckets: total number of buckets (half for each direction).
    max_distance: distances >= this share the last bucket.
  Returns:
    int32 array like `relative_position`, values in [0, num_buckets).
  """
  rel = np.asarray(relative_position, np.int64)
  num_buckets //= 2
  buckets = (rel > 0).astype(np.int64) * num_buckets
  rel = np.abs(rel)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  # The same float32 operations in the same order as transformers; log(0) for
  # the small positions is discarded by the `where` below.
  with np.errstate(divide='ignore', invalid='ignore'):
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    scaled = np.where(is_small, 0, scaled)
  large = max_exact + scaled.astype(np.int64)  # Truncation, like .to(long).
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
  """RMS norm without mean subtraction or bias, in fp32.

  Attributes:
    eps: added to the mean square.
    dtype: output dtype.
    param_dtype: dtype of the scale.
  """
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D]."""
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
        (x.shape[-1],), self.param_dtype)
    # fp32 accumulation: the mean square of a 4096-wide bf16 vector is
    # inaccurate in bf16, and T5 activations grow large in later layers.
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)
                          + self.eps)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)


class T5Attention(nn.Module):
  """Unscaled multi-head self-attention with an additive position bias.

  Attributes:
    config: the encoder config.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """Self-attention.

    Args:
      x: [B, T, d_model] normalised hidden states.
      bias: [B or 1, heads, T, T] fp32, relative position bias plus the
        padding mask (large negative at masked keys).
    Returns:
      [B, T, d_model].
    """
    cfg = self.config
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

    def proj(name):
      return layers.dense((cfg.num_heads, cfg.d_kv), ('embed', 'heads', 'kv'),
                          name=name, dtype=dtype, param_dtype=pdtype,
                          use_bias=False, kernel_init=init)(x)

    q, k, v = proj('q'), proj('k'), proj('v')  # [B, T, H, Dh]
    # No 1/sqrt(Dh): T5 folds that scale into q's initialisation.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return layers.dense(cfg.d_model, ('heads', 'kv', 'embed'), name='o',
                        in_axes=2, dtype=dtype, param_dtype=pdtype,
                        use_bias=False, kernel_init=init)(out)


class T5GatedFFN(nn.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x), no biases.

  Attributes:
    config: the encoder config.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model]."""
    cfg = self.config
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

    def dense(features, axes, name):
      return layers.dense(features, axes, name=name, dtype=dtype,
                          param_dtype=pdtype, use_bias=False, kernel_init=init)

    # transformers' 'gated-gelu' uses gelu_new, the tanh approximation.
    gate = jax.nn.gelu(dense(cfg.d_ff, ('embed', 'mlp'), 'wi_0')(x),
                       approximate=True)
    h = gate * dense(cfg.d_ff, ('embed', 'mlp'), 'wi_1')(x)
    return dense(cfg.d_model, ('mlp', 'embed'), 'wo')(h)


class T5Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)).

  Attributes:
    config: the encoder config.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """[B, T, d_model] and bias [B or 1, H, T, T] -> [B, T, d_model]."""
    cfg = self.config
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    norm = lambda name: T5LayerNorm(cfg.layer_norm_epsilon, dtype, pdtype,
                                    name=name)
    x = x + T5Attention(cfg, name='attn')(norm('attn_norm')(x), bias)
    x = nn.with_logical_constraint(x, _RESIDUAL)
    x = x + T5GatedFFN(cfg, name='ffn')(norm('ffn_norm')(x))
    return nn.with_logical_constraint(x, _RESIDUAL)


class T5Encoder(nn.Module):
  """T5 v1.1 encoder stack: embed -> blocks -> final RMS norm.

  Param tree: token_embed/embedding [vocab, d_model],
  relative_attention_bias [num_buckets, heads] (HF keeps it in block 0; it is
  shared by every layer), layers_{i}/{attn_norm, attn/{q,k,v,o}, ffn_norm,
  ffn/{wi_0, wi_1, wo}}, final_norm.

  Attributes:
    config: the encoder config.
  """
  config: T5Config

  def position_bias(self, length: int) -> jax.Array:
    """The shared relative position bias, [1, heads, T, T] in fp32."""
    cfg = self.config
    table = self.param(
        'relative_attention_bias',
        nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                     (None, 'heads')),
        (cfg.relative_attention_num_buckets, cfg.num_heads),
        _dtype(cfg.param_dtype))
    pos = np.arange(length)
    buckets = relative_position_bucket(
        pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance)  # [Tq, Tk], a constant.
    values = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [Tq,Tk,H]
    return values.transpose(2, 0, 1)[None]

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: [B, T] int token ids.
      attention_mask: optional [B, T], 1 (or True) for tokens, 0 for padding;
        padded keys are ignored. None: attend to every token.
    Returns:
      last_hidden_state: [B, T, d_model] in config.dtype.
    """
    cfg = self.config
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ('vocab', 'embed')),
        name='token_embed')
    x = nn.with_logical_constraint(embed(input_ids), _RESIDUAL)
    bias = self.position_bias(input_ids.shape[1])  # [1, H, T, T]
    if attention_mask is not None:
      # The same additive mask as transformers: the most negative fp32 value
      # at padded keys (finite, so a fully padded row does not produce NaN).
      keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
      bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(cfg.num_layers):
      x = T5Block(cfg, name=f'layers_{i}')(x, bias)
    return T5LayerNorm(cfg.layer_norm_epsilon, dtype, pdtype,
                       name='final_norm')(x)


class StudentTextEncoder(nn.Module):
  """A T5 encoder followed by a Dense projection to the teacher's width.

  The distilled text encoder (distill/t5_distill.py trains it); it lives
  here so that the pipeline and the exporter can run it without importing
  the training code.

  Param tree: t5/... (a T5Encoder tree), proj/{kernel [d_model, out_dim],
  bias [out_dim]}.

  Attributes:
    config: the student's T5 config.
    out_dim: the teacher's d_model (= the denoiser's context_in_dim).
  """
  config: T5Config
  out_dim: int

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """[B, T] int ids (+ optional [B, T] mask) -> [B, T, out_dim]."""
    cfg = self.config
    h = T5Encoder(cfg, name='t5')(input_ids, attention_mask)
    return nn.Dense(
        self.out_dim, dtype=_dtype(cfg.dtype),
        param_dtype=_dtype(cfg.param_dtype), name='proj',
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ('embed', None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               (None,)))(h)


def student_from_checkpoint(config, params, where: str,
                            dtype=None) -> tuple[T5Config, int, Any]:
  """checkpoint.load's (config, params) of a student text encoder ->
  (T5Config, out_dim, params).

  The config is the dict compress.text_encoder.save_student writes:
  {'t5': T5Config dict, 'out_dim': int}; `where` names the folder in errors.
  """
  if not isinstance(config, dict) or set(config) != {'t5', 'out_dim'}:
    raise ValueError(f'{where}: not a student text-encoder checkpoint '
                     f'(config {config!r})')
  cfg = T5Config.from_dict(config['t5'])
  if dtype is not None:  # As checkpoint.load records it for a T5Config.
    cfg = cfg.replace(param_dtype=np.dtype(dtype).name)
  return cfg, int(config['out_dim']), params

"""Analytic parameter and FLOP counts of a (possibly compressed) FluxConfig.

`count_params` equals the number of elements `flux.param_shapes(cfg)` holds;
`count_flops` counts matmul/conv FLOPs (2 * multiply-adds) of one forward,
attention scores and values included, elementwise work (norms, softmax, RoPE,
GELU) excluded; on small models it agrees with XLA's cost analysis within a
few percent (tests/test_compress.py).
"""
from __future__ import annotations

from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import downsample

_TIME_DIM = 256  # sinusoidal timestep embedding width.


def _mod_params(cfg: FluxConfig, n: int) -> int:
  d = cfg.hidden_size
  if cfg.modulation == 'static':
    return len(cfg.static_timesteps) * n * d
  return d * n * d + n * d


def _attn_params(cfg: FluxConfig, heads: int) -> int:
  d, hd = cfg.hidden_size, cfg.head_dim
  qkv = d * 3 * heads * hd + (3 * heads * hd if cfg.qkv_bias else 0)
  return qkv + 2 * hd + heads * hd * d + d   # + QK-norm scales + proj.


def count_params(cfg: FluxConfig) -> int:
  """Total number of parameters of `Flux(cfg)`."""
  d = cfg.hidden_size
  dense = lambda i, o: i * o + o
  n = dense(cfg.in_channels, d) + dense(cfg.context_in_dim, d)
  n += dense(d, cfg.out_dim) + _mod_params(cfg, 2)
  if cfg.modulation == 'adaln':
    emb = lambda i: dense(i, d) + dense(d, d)
    n += emb(_TIME_DIM) + emb(cfg.vec_in_dim)
    if cfg.guidance_embed:
      n += emb(_TIME_DIM)
  for i in range(cfg.depth):
    for m in (cfg.double_mlp_img[i], cfg.double_mlp_txt[i]):
      n += (_mod_params(cfg, 6) + _attn_params(cfg, cfg.double_heads[i]) +
            dense(d, m) + dense(m, d))
  for j in range(cfg.depth_single_blocks):
    m = cfg.single_mlp[j]
    n += (_mod_params(cfg, 3) + _attn_params(cfg, cfg.single_heads[j]) +
          dense(d, m) + m * d)
  return n + downsample.num_params(cfg)


def _block_tokens(cfg: FluxConfig, g: int, img_len: int) -> int:
  """Image tokens global block g sees (coarse inside the down-sampled range)."""
  if (cfg.downsample_start is not None and
      cfg.downsample_start <= g <= cfg.downsample_end):
    return img_len // cfg.downsample_factor ** 2
  return img_len


def count_flops(cfg: FluxConfig, img_len: int, txt_len: int,
                batch: int = 1) -> int:
  """Matmul FLOPs (2 * MACs) of one forward on [batch, img_len] image and
  [batch, txt_len] text tokens, attention (QK^T and PV) included."""
  if img_len <= 0 or txt_len < 0:
    raise ValueError(f'count_flops: bad token counts img_len={img_len}, '
                     f'txt_len={txt_len}')
  d, hd = cfg.hidden_size, cfg.head_dim
  macs = img_len * cfg.in_channels * d + txt_len * cfg.context_in_dim * d
  macs += img_len * d * cfg.out_dim
  n_mod = 2 + 12 * cfg.depth + 3 * cfg.depth_single_blocks
  if cfg.modulation == 'adaln':  # per sample, not per token.
    macs += n_mod * d * d + (_TIME_DIM + d) * d + (cfg.vec_in_dim + d) * d
    if cfg.guidance_embed:
      macs += (_TIME_DIM + d) * d
  for i in range(cfg.depth):
    li, h = _block_tokens(cfg, i, img_len), cfg.double_heads[i]
    tokens = li + txt_len
    macs += tokens * d * 3 * h * hd + tokens * h * hd * d   # qkv + proj
    macs += 2 * tokens * tokens * h * hd                     # QK^T, PV
    macs += 2 * d * (li * cfg.double_mlp_img[i] +
                     txt_len * cfg.double_mlp_txt[i])
  for j in range(cfg.depth_single_blocks):
    li, h = _block_tokens(cfg, cfg.depth + j, img_len), cfg.single_heads[j]
    tokens = li + txt_len
    macs += tokens * d * 3 * h * hd + tokens * h * hd * d
    macs += 2 * tokens * tokens * h * hd
    macs += 2 * tokens * d * cfg.single_mlp[j]
  return 2 * batch * macs + downsample.num_flops(cfg, img_len, batch)

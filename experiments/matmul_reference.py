"""The DiT forward's own GEMMs, alone: the practical matmul limit at a size.

benchmark_dit.py compares the forward's FLOP rate with one large jnp matmul,
[tokens, hidden] x [hidden, mlp]. At the shapes teacher's size (batch 8 x 88
tokens, hidden 128) the forward's GEMMs are small ([704, 128] x [128, 384],
[8, 128] x [128, 768] for the modulation, [32, 88, 32] x [32, 32, 88] for
attention scores...) and no program reaches the large-GEMM rate on them. This
module gives the second reference: exactly the GEMMs one `Flux(cfg)` forward
does (shapes and counts from the config), run back to back in one jitted
function, nothing else. Our forward's FLOP rate over that rate is how close
the forward is to the matmul limit at that size.

  gemms = forward_gemms(cfg, img_len, txt_len, batch)
  assert gemm_flops(gemms) == compress.count_flops(cfg, img_len, txt_len, batch)
  fn, *args = reference_fn(gemms)   # jax.block_until_ready(fn(*args))

Each GEMM instance gets its own right-hand operand (as every block has its
own weights), so XLA cannot merge repeated ones (CSE); instances with the
same left shape share one left operand. Nothing orders the products, so
XLA may run independent ones concurrently, as it runs the forward's two
streams: if anything, a stricter reference than a serial chain. Attention's
products are whole batched [B * H, L, L] ones: at 1,152 tokens those score
matrices leave the caches and the forward's per-head query chunks beat them
(ratio > 1 there), so this is the limit to quote at small sizes.

`time_interleaved` (also here, to keep benchmark_dit.py short) is the timer
both references and the forward are measured with.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from nanoflux_jax.configs import FluxConfig

_TIME_DIM = 256  # The timestep sinusoid's width (Flux's time_in input).


@dataclasses.dataclass(frozen=True)
class Gemm:
  """`count` products [batch, m, k] x [batch, k, n] (batch 0: plain 2-D)."""
  name: str
  batch: int
  m: int
  k: int
  n: int
  count: int = 1

  @property
  def flops(self) -> int:
    return 2 * max(self.batch, 1) * self.m * self.k * self.n * self.count


def forward_gemms(cfg: FluxConfig, img_len: int, txt_len: int,
                  batch: int = 1) -> list[Gemm]:
  """Every matmul of one `Flux(cfg)` forward on [batch, img_len] image and
  [batch, txt_len] text tokens, as the forward lays them out: a projection
  is [batch * tokens, in] x [in, out] (qkv one GEMM of width 3 * heads *
  head_dim, a block's adaLN modulation one [batch, D] x [D, n * D]), and
  attention is per (sample, head) [L, head_dim] x [head_dim, L] (scores)
  and [L, L] x [L, head_dim] (values)."""
  if cfg.downsample_start is not None:
    raise ValueError('forward_gemms: configs with the token down-sampler '
                     f'(downsample_start={cfg.downsample_start}) are not '
                     'covered (its convolutions are no GEMMs)')
  if img_len <= 0 or txt_len < 0 or batch <= 0:
    raise ValueError(f'forward_gemms: bad sizes img_len={img_len}, '
                     f'txt_len={txt_len}, batch={batch}')
  d, hd, b = cfg.hidden_size, cfg.head_dim, batch
  out: dict[tuple, int] = {}

  def add(name, m, k, n, bt=0):
    key = (name, bt, m, k, n)
    out[key] = out.get(key, 0) + 1

  li, lt, n_tok = b * img_len, b * txt_len, img_len + txt_len
  add('img_in', li, cfg.in_channels, d)
  if txt_len:
    add('txt_in', lt, cfg.context_in_dim, d)
  add('final_linear', li, d, cfg.out_dim)
  if cfg.modulation == 'adaln':
    add('time_in', b, _TIME_DIM, d)
    add('time_in', b, d, d)
    add('vector_in', b, cfg.vec_in_dim, d)
    add('vector_in', b, d, d)
    if cfg.guidance_embed:
      add('guidance_in', b, _TIME_DIM, d)
      add('guidance_in', b, d, d)
    add('modulation', b, d, 2 * d)
  for i in range(cfg.depth):
    h = cfg.double_heads[i]
    for tokens, mlp in ((li, cfg.double_mlp_img[i]),
                        (lt, cfg.double_mlp_txt[i])):
      if cfg.modulation == 'adaln':
        add('modulation', b, d, 6 * d)
      if not tokens:
        continue
      add('qkv', tokens, d, 3 * h * hd)
      add('proj', tokens, h * hd, d)
      add('mlp_in', tokens, d, mlp)
      add('mlp_out', tokens, mlp, d)
    add('attn_scores', n_tok, hd, n_tok, b * h)
    add('attn_values', n_tok, n_tok, hd, b * h)
  for j in range(cfg.depth_single_blocks):
    h, mlp, tokens = cfg.single_heads[j], cfg.single_mlp[j], b * n_tok
    if cfg.modulation == 'adaln':
      add('modulation', b, d, 3 * d)
    add('qkv', tokens, d, 3 * h * hd)
    add('proj', tokens, h * hd, d)
    add('mlp_in', tokens, d, mlp)
    add('mlp_out', tokens, mlp, d)
    add('attn_scores', n_tok, hd, n_tok, b * h)
    add('attn_values', n_tok, n_tok, hd, b * h)
  return [Gemm(name, bt, m, k, n, c) for (name, bt, m, k, n), c in out.items()]


def gemm_flops(gemms: list[Gemm]) -> int:
  return sum(g.flops for g in gemms)


def describe(gemms: list[Gemm], top: int = 4) -> str:
  """The `top` GEMM shapes by FLOPs, for a table header."""
  total = gemm_flops(gemms)
  rows = sorted(gemms, key=lambda g: -g.flops)[:top]
  return ', '.join(
      f'{g.count}x {"" if not g.batch else f"{g.batch}x"}[{g.m},{g.k}]x'
      f'[{g.k},{g.n}] ({g.name}, {g.flops / total:.0%})' for g in rows)


def reference_fn(gemms: list[Gemm], seed: int = 0):
  """(jitted fn, *args): fn(*args) computes every GEMM instance once.

  args are (left operands, right operands): one left operand per distinct left shape and one right operand
  per instance (float32, standard normal, scaled by 1/sqrt(k)); fn returns
  every product, so XLA drops none of them.
  """
  rng = np.random.default_rng(seed)
  lefts, plan, rights = {}, [], []
  for g in gemms:
    lead = (g.batch,) if g.batch else ()
    a_shape = lead + (g.m, g.k)
    if a_shape not in lefts:
      lefts[a_shape] = len(lefts)
    for _ in range(g.count):
      plan.append(lefts[a_shape])
      rights.append(rng.standard_normal(lead + (g.k, g.n), np.float32) *
                    np.float32(g.k ** -0.5))
  a_list = [rng.standard_normal(s, np.float32) for s in lefts]

  def fn(a_list, rights):
    return [jax.numpy.matmul(a_list[i], w) for i, w in zip(plan, rights)]

  return jax.jit(fn), jax.device_put(a_list), jax.device_put(rights)


def time_interleaved(fns: dict, repeats: int, warmup: int,
                     inner: dict | None = None, stat=statistics.median,
                     cpu: dict | None = None) -> dict:
  """name -> stat (median) of the seconds samples (`stat=None`: the
  samples). Each round runs every fn once (`inner[name]` times for short
  ones, all samples kept), so load drifts hit all alike. `cpu`, a dict, gets
  name -> process CPU seconds per call (all threads; waiting for a core
  does not count, so this survives a machine shared with other jobs)."""
  inner = inner or {}
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {k: [] for k in fns}
  cpu_s = {k: 0. for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      for _ in range(inner.get(k, 1)):
        c, t = time.process_time(), time.perf_counter()
        fn()
        times[k].append(time.perf_counter() - t)
        cpu_s[k] += time.process_time() - c
  if cpu is not None:
    cpu.update({k: v / len(times[k]) for k, v in cpu_s.items()})
  return times if stat is None else {k: stat(v) for k, v in times.items()}

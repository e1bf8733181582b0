r"""Where batched attention stops paying on CPU: per_head vs batched by size.

For every (sequence length, head count) cell, times the two exact CPU paths
'auto' chooses between, on q/k/v [batch, L, heads, head_dim] fp32 (jax.jit,
min ms over runs, all paths interleaved so machine load hits them alike):
  per_head  heads (in 2 concurrent chains) and query chunks one at a time;
  batched   the same math with the heads folded into the batch: one call
            on [B * H, L, D], the [B, H, L, L] scores in memory;
and, for information only, jax.nn.dot_product_attention(implementation=
'xla') (the GPU fallback, also all heads at once). Prints the ratio
per_head_ms / batched_ms (> 1: batched is faster), the size of one head's
scores [B, L, L] and of all of them, and what `attention_impl='auto'` picks
there (layers.resolve_impl, threshold layers.BATCHED_MAX_SCORE_BYTES on all
heads' scores). The last line is one JSON object with every cell.

  python experiments/benchmark_attention.py [--batch=1 --head_dim=64]
      [--lengths=64,128,...] [--heads=2,4,...] [--repeats=5]

Cells whose scores exceed --max_batched_mb are timed for per_head only
(batched and xla would need that much memory twice over).
"""
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from nanoflux_jax.models import layers

_LENGTHS = flags.DEFINE_list(
    'lengths', ['64', '128', '256', '512', '1152', '2304', '4608'],
    'Sequence lengths (text + image tokens).')
_HEADS = flags.DEFINE_list('heads', ['2', '4', '8', '12', '24'], 'Head counts.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Channels per head.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed runs per cell and path.')
_MAX_BATCHED_MB = flags.DEFINE_float(
    'max_batched_mb', 1024., 'Skip the batched path above this score size.')


def _time(fns: dict, repeats: int, budget_s: float = 20.) -> dict:
  """name -> min seconds; rounds interleave the fns. Short calls run
  several times per round (all samples kept); a round of slow ones stops
  early once `budget_s` is spent (at least 2 rounds). The minimum, not the
  median: on a machine shared with other jobs a sample is the intrinsic
  time plus a random wait, and the minimum estimates the former best."""
  for f in fns.values():  # Compile + warm up.
    f()
  one = {}
  for k, f in fns.items():
    t = time.perf_counter()
    f()
    one[k] = time.perf_counter() - t
  inner = {k: max(1, min(20, int(0.02 / max(v, 1e-6)))) for k, v in one.items()}
  times = {k: [] for k in fns}
  start = time.perf_counter()
  for r in range(repeats):
    for k, f in fns.items():
      for _ in range(inner[k]):
        t = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t)
    if r >= 1 and time.perf_counter() - start > budget_s:
      break
  return {k: min(v) for k, v in times.items()}


def main(argv):
  del argv
  b, d = _BATCH.value, _HEAD_DIM.value
  paths = {n: jax.jit(lambda *a, n=n: layers.attention(*a, impl=n))
           for n in ('per_head', 'batched', 'xla')}
  print(f'attention, batch {b}, head_dim {d}, fp32, jax {jax.__version__} '
        f'({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, load avg '
        f'{os.getloadavg()[0]:.2f}; auto threshold '
        f'{layers.BATCHED_MAX_SCORE_BYTES / 2**20:g} MiB of scores')
  print(f'{"L":>6s}{"heads":>6s}{"head KiB":>10s}{"all MiB":>10s}'
        f'{"per_head ms":>13s}'
        f'{"batched ms":>12s}{"xla ms":>10s}{"ratio":>8s}{"auto":>10s}'
        f'{"faster":>10s}')
  cells = []
  for l in (int(x) for x in _LENGTHS.value):
    for h in (int(x) for x in _HEADS.value):
      key = jax.random.split(jax.random.key(l * 100 + h), 3)
      q, k, v = (jax.random.normal(kk, (b, l, h, d), jnp.float32)
                 for kk in key)
      sb = layers.score_bytes(q.shape)  # The whole [B, H, L, L] matrix.
      hb = sb // h
      fns = {n: (lambda f=f: jax.block_until_ready(f(q, k, v)))
             for n, f in paths.items()
             if n == 'per_head' or sb <= _MAX_BATCHED_MB.value * 2**20}
      t = _time(fns, _REPEATS.value)
      auto = layers.resolve_impl('auto', backend='cpu', scores=sb)
      ratio = t['per_head'] / t['batched'] if 'batched' in t else None
      faster = None if ratio is None else (
          'batched' if ratio > 1 else 'per_head')
      ms = {n: round(t[n] * 1e3, 4) if n in t else None for n in paths}
      cells.append(dict(length=l, heads=h, head_score_bytes=hb,
                        score_bytes=sb, per_head_ms=ms['per_head'],
                        batched_ms=ms['batched'], xla_ms=ms['xla'],
                        ratio=None if ratio is None else round(ratio, 3),
                        auto=auto, faster=faster))
      print(f'{l:6d}{h:6d}{hb / 1024:10.1f}{sb / 2**20:10.3f}'
            f'{t["per_head"] * 1e3:13.3f}'
            + (f'{t["batched"] * 1e3:12.3f}{t["xla"] * 1e3:10.3f}'
               f'{ratio:8.2f}' if ratio else
               f'{"-":>12s}{"-":>10s}{"-":>8s}')
            + f'{auto:>10s}{faster or "-":>10s}', flush=True)
  # How much the auto choice gives up against the faster of per_head and
  # batched, per cell.
  loss = [max(c['per_head_ms'], c['batched_ms']) /
          min(c['per_head_ms'], c['batched_ms'])
          if c['auto'] != c['faster'] else 1.0
          for c in cells if c['ratio'] is not None]
  print(f'auto picked the faster path in {loss.count(1.0)} of {len(loss)} '
        f'cells; worst slowdown from its choice {max(loss):.2f}x')
  print(json.dumps({'batch': b, 'head_dim': d,
                    'threshold_bytes': layers.BATCHED_MAX_SCORE_BYTES,
                    'load_avg': round(os.getloadavg()[0], 2),
                    'auto_worst_slowdown': round(max(loss), 3),
                    'cells': cells}))


if __name__ == '__main__':
  app.run(main)

"""Latency / size of the compression ladder on FluxConfig.benchmark().

  python experiments/benchmark_compress.py [--repeats=5] [--criterion=taylor]

Rows: (a) the teacher, (b) 50% heads and 50% MLP channels pruned, (c) (b) +
static modulation, (d) (c) + token down-sampler over blocks 2..N-3. Batch 1,
1024 image + 128 text tokens, fp32, jitted forward; ms is the median of
`repeats` timed calls after one warm-up. The last line is a JSON summary.
"""
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import compress
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import flux

_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed forwards per model.')
_GRID = flags.DEFINE_integer('grid', 32, 'image token grid side (32 -> 1024).')
_TXT = flags.DEFINE_integer('txt_len', 128, 'text tokens.')
_CRITERION = flags.DEFINE_enum(
    'criterion', 'taylor', ['taylor', 'random'],
    'scores for pruning: taylor (one calibration sample) or random.')
_STEPS = (1.0, 0.75, 0.5, 0.25)  # schnell's 4-step schedule.


def _inputs(cfg, key):
  g, t = _GRID.value, _TXT.value
  k1, k2, k3 = jax.random.split(key, 3)
  return dict(img=jax.random.normal(k1, (1, g * g, cfg.in_channels)),
              img_ids=sampling.image_ids(1, g, g),
              txt=jax.random.normal(k2, (1, t, cfg.context_in_dim)),
              txt_ids=sampling.text_ids(1, t),
              timesteps=jnp.full((1,), 0.5),
              y=jax.random.normal(k3, (1, cfg.vec_in_dim)))


def _time(cfg, params, inputs):
  """Median ms of a jitted forward (compile + one warm-up excluded)."""
  x = {k: v for k, v in inputs.items()
       if not (k == 'y' and cfg.modulation == 'static')}
  grid = ((_GRID.value, _GRID.value) if cfg.downsample_start is not None
          else None)
  fwd = jax.jit(lambda p, x: flux.Flux(cfg).apply({'params': p}, **x,
                                                  img_grid=grid).velocity)
  fwd(params, x).block_until_ready()
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    fwd(params, x).block_until_ready()
    times.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(times)


def main(argv):
  del argv
  key = jax.random.key(0)
  cfg_a = FluxConfig.benchmark()
  params_a = flux.init_params(cfg_a, key)
  inputs = _inputs(cfg_a, jax.random.key(1))
  img_len, txt_len = _GRID.value ** 2, _TXT.value

  if _CRITERION.value == 'taylor':
    calib = {k: v for k, v in inputs.items()}
    scores = compress.sensitivity(cfg_a, params_a, calib, 'taylor')
  else:
    rng = np.random.default_rng(0)
    scores = jax.tree.map(lambda m: rng.random(m.shape),
                          compress.PruneMask.ones(cfg_a))
  mask = compress.select(cfg_a, scores, keep_heads=0.5, keep_mlp=0.5,
                         scope='block')
  cfg_b, params_b = compress.prune(cfg_a, params_a, mask)
  cfg_c, params_c = compress.to_static_modulation(
      cfg_b, params_b, _STEPS, inputs['y'])
  cfg_d, params_d = compress.add_downsampler(
      cfg_c, params_c, 2, cfg_c.num_blocks - 3, jax.random.key(2))

  rows = {}
  for name, cfg, params in (('a', cfg_a, params_a), ('b', cfg_b, params_b),
                            ('c', cfg_c, params_c), ('d', cfg_d, params_d)):
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == compress.count_params(cfg), (name, n)
    rows[name] = dict(params=n, gflops=compress.count_flops(
        cfg, img_len, txt_len) / 1e9, ms=_time(cfg, params, inputs))
  labels = {'a': 'teacher', 'b': '50% heads+MLP', 'c': '(b)+static mod',
            'd': '(c)+down-sampler'}
  print(f'device: {jax.devices()[0].device_kind}; {img_len} img + {txt_len} '
        f'txt tokens, batch 1, fp32')
  print(f'{"model":<20}{"params (M)":>12}{"GFLOPs":>10}{"ms":>10}')
  for k, r in rows.items():
    print(f'{k + ") " + labels[k]:<20}{r["params"] / 1e6:>12.2f}'
          f'{r["gflops"]:>10.1f}{r["ms"]:>10.1f}')
  print(json.dumps({
      'a_ms': round(rows['a']['ms'], 2), 'b_ms': round(rows['b']['ms'], 2),
      'c_ms': round(rows['c']['ms'], 2), 'd_ms': round(rows['d']['ms'], 2),
      'a_params': rows['a']['params'], 'd_params': rows['d']['params'],
      'd_vs_c_speedup': round(rows['c']['ms'] / rows['d']['ms'], 3),
      'd_vs_a_speedup': round(rows['a']['ms'] / rows['d']['ms'], 3)}))


if __name__ == '__main__':
  app.run(main)

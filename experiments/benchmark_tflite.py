r"""LiteRT (TFLite) latency of a phone-size student DiT vs JAX, fp32 and int8.

  python experiments/benchmark_tflite.py [--grid=32 --txt_len=128 --threads=2]

Model: variant (d) of the compression benchmark, built with
`nanoflux_jax.compress` from FluxConfig.benchmark() (hidden 768, 4 double + 8
single blocks, random weights): 50% of heads and MLP channels pruned per
block, static modulation (4 timesteps, no pooled vector) and the token
down-sampler over blocks 2..9. Batch 1, a 32x32 token grid (512 px) + 128
text tokens.

Measures the median ms per denoiser step under LiteRT (XNNPACK, --threads)
for the fp32 and int8 (dynamic-range) files, next to jax.jit fp32 in the same
run (runs interleaved so machine load hits all alike), and one 4-step image:
a T5 encoder file (d_model 512, 4 layers; a stand-in for a distilled T5) + 4
int8 denoiser steps + FLUX's VAE decoder (fp32) at 512 px.

The int8 file's achieved MAC rate (compress.count_flops / 2 over its ms per
step) is printed against the same interpreter's rate on one large
FULLY_CONNECTED op (int8 dynamic-range weights, [tokens, hidden] x [hidden,
4 hidden]): the machine's practical int8 limit. Below half of it, the op
types in the int8 graph (with counts, float ones marked) say where the rest
goes: dequantize / quantize round trips, float ops, transposes. The last line
is one JSON object.
"""
import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

import nanoflux_jax as nf
from nanoflux_jax.export import components
from nanoflux_jax.export import runner
from nanoflux_jax.export import tflite
from nanoflux_jax.models import flux
from nanoflux_jax.models import t5 as t5_lib
from nanoflux_jax.models import vae as vae_lib

_GRID = flags.DEFINE_integer('grid', 32, 'Token grid side (tokens = grid^2).')
_TXT_LEN = flags.DEFINE_integer('txt_len', 128, 'Text tokens.')
_THREADS = flags.DEFINE_integer('threads', 2, 'LiteRT threads.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per measurement.')
_IMAGE = flags.DEFINE_bool('image', True, 'Also time a whole 4-step image.')
_MAC_RATE = flags.DEFINE_bool('mac_rate', True, 'Also time one large int8 '
                              'FULLY_CONNECTED op and list the op types.')

STATIC_TS = (1.0, 0.75, 0.5, 0.25)


def student():
  """-> (cfg, params) of variant (d)."""
  from nanoflux_jax import compress  # pylint: disable=g-import-not-at-top
  cfg = nf.FluxConfig.benchmark()
  params = flux.init_params(cfg, jax.random.key(0))
  scores = jax.tree.map(lambda m: np.random.default_rng(0).random(m.shape),
                        compress.PruneMask.ones(cfg))
  mask = compress.select(cfg, scores, keep_heads=0.5, keep_mlp=0.5,
                         scope='block')
  cfg, params = compress.prune(cfg, params, mask)
  pooled = jax.random.normal(jax.random.key(1), (4, cfg.vec_in_dim))
  cfg, params = compress.to_static_modulation(cfg, params, STATIC_TS, pooled)
  return compress.add_downsampler(cfg, params, 2, cfg.num_blocks - 3,
                                  jax.random.key(2))


def op_counts(path: str) -> dict[str, int]:
  """{op type: how many} of a .tflite file, most frequent first."""
  interp = tflite._interpreter(path)  # pylint: disable=protected-access
  counts = {}
  for op in interp._get_ops_details():  # pylint: disable=protected-access
    counts[op['op_name']] = counts.get(op['op_name'], 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def fc_mac_rate(work: str, tokens: int, d: int, threads: int,
                repeats: int) -> tuple[float, dict]:
  """MAC/s of one int8 (dynamic-range) FULLY_CONNECTED [tokens, d] x
  [d, 4d] under LiteRT, and its op counts (one FULLY_CONNECTED expected)."""
  w = np.random.default_rng(3).standard_normal((d, 4 * d)).astype(np.float32)
  fn = lambda p, x: {'y': x['x'] @ p['w']}
  entry = tflite.convert(fn, {'w': w * 0.02}, {'x': ((tokens, d), np.float32)},
                         os.path.join(work, 'fc_int8.tflite'), quantize='int8')
  model = runner.TFLiteModel(work, entry, threads)
  x = np.random.default_rng(4).standard_normal((tokens, d)).astype(np.float32)
  model(x=x)
  ms = min(_time(lambda: model(x=x), 1) for _ in range(max(3, repeats)))
  return tokens * d * 4 * d / (ms / 1e3), op_counts(entry['file'] if
                                                   os.path.isabs(entry['file'])
                                                   else os.path.join(
                                                       work, entry['file']))


def _time(fn, repeats):
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(out)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  (cfg, params), g, t = student(), _GRID.value, _TXT_LEN.value
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f'student: {n / 1e6:.1f}M params, {g * g} image + {t} text tokens')
  work = tempfile.mkdtemp(prefix='bench_tflite_')
  fn, specs = components.denoiser_fn(cfg, g, g, t)
  files = {}
  for q in ('none', 'int8'):
    t0 = time.perf_counter()
    files[q] = tflite.convert(fn, params, specs,
                              os.path.join(work, f'denoiser_{q}.tflite'),
                              quantize=q)
    print(f'export {q}: {time.perf_counter() - t0:.1f} s, '
          f'{files[q]["bytes"] / 1e6:.1f} MB, peak RSS '
          f'{files[q]["peak_rss_mb"]:.0f} MB')
  models = {q: runner.TFLiteModel(work, e, _THREADS.value)
            for q, e in files.items()}
  rng = np.random.default_rng(0)
  x = {k: rng.standard_normal(s).astype(d) if d == np.float32
       else np.zeros(s, d) for k, (s, d) in specs.items()}

  # JAX: the library's fastest CPU path (attention 'auto': by score size).
  jfn = jax.jit(lambda p, x: flux.Flux(cfg).apply(
      {'params': p}, img=x['img'], img_ids=nf.sampling.image_ids(1, g, g),
      txt=x['txt'], txt_ids=nf.sampling.text_ids(1, t),
      timesteps=jax.numpy.take(jax.numpy.asarray(STATIC_TS), x['step']),
      img_grid=(g, g)).velocity)
  want = np.asarray(jfn(params, x))
  err = {q: float(np.abs(m(**x)['velocity'] - want).max() /
                  np.abs(want).max()) for q, m in models.items()}
  runs = {'jax': lambda: jfn(params, x).block_until_ready(),
          'none': lambda: models['none'](**x),
          'int8': lambda: models['int8'](**x)}
  for f in runs.values():
    f()
  ms = {k: [] for k in runs}
  for _ in range(_REPEATS.value):  # interleaved
    for k, f in runs.items():
      ms[k].append(_time(f, 1))
  ms = {k: statistics.median(v) for k, v in ms.items()}
  print(f'ms/step: jax fp32 {ms["jax"]:.0f}, litert fp32 {ms["none"]:.0f}, '
        f'litert int8 {ms["int8"]:.0f}; max rel err vs jax: '
        f'fp32 {err["none"]:.1e}, int8 {err["int8"]:.1e}')

  mac = {}
  if _MAC_RATE.value:
    from nanoflux_jax import compress  # pylint: disable=g-import-not-at-top
    macs = compress.count_flops(cfg, g * g, t) / 2
    fc_rate, fc_ops = fc_mac_rate(work, g * g + t, cfg.hidden_size,
                                  _THREADS.value, _REPEATS.value)
    rate = macs / (ms['int8'] / 1e3)
    path = files['int8']['file']
    ops = op_counts(path if os.path.isabs(path) else os.path.join(work, path))
    mac = dict(int8_gmacs=round(rate / 1e9, 2),
               fc_int8_gmacs=round(fc_rate / 1e9, 2),
               int8_fraction_of_fc=round(rate / fc_rate, 3))
    print(f'int8 student: {macs / 1e9:.2f} GMAC per step at '
          f'{rate / 1e9:.2f} GMAC/s; one int8 FULLY_CONNECTED '
          f'{g * g + t}x{cfg.hidden_size}x{4 * cfg.hidden_size} '
          f'({fc_ops}): {fc_rate / 1e9:.2f} GMAC/s; fraction '
          f'{rate / fc_rate:.3f}')
    print('int8 op types: ' + ', '.join(f'{k} {v}' for k, v in ops.items()))

  image_s = None
  if _IMAGE.value:
    t5_cfg = nf.T5Config(d_model=cfg.context_in_dim, d_kv=64, d_ff=1024,
                         num_layers=4, num_heads=8)
    t5_p = t5_lib.T5Encoder(t5_cfg).init(
        jax.random.key(1), np.zeros((1, t), np.int32))['params']
    vae_cfg = nf.VAEConfig.flux()
    z = np.zeros((1, 16, 16, vae_cfg.latent_channels), np.float32)
    vae_p = jax.jit(lambda: vae_lib.AutoencoderKL(vae_cfg).init(
        jax.random.key(2), z, method='decode'))()['params']
    tfn, tspecs = components.t5_fn(t5_cfg, t)
    e_t5 = tflite.convert(tfn, flax_unbox(t5_p), tspecs,
                          os.path.join(work, 't5.tflite'), quantize='int8')
    vfn, vspecs = components.vae_decoder_fn(vae_cfg, g, g, cfg.in_channels)
    e_vae = tflite.convert(vfn, flax_unbox(vae_p), vspecs,
                           os.path.join(work, 'vae.tflite'))
    m_t5 = runner.TFLiteModel(work, e_t5, _THREADS.value)
    m_vae = runner.TFLiteModel(work, e_vae, _THREADS.value)
    ids = np.zeros((1, t), np.int32)
    lat = x['img']

    def image():
      txt = m_t5(input_ids=ids)['t5_embeds']
      y = lat
      ts = np.asarray(nf.sampling.schedule_for(cfg, 4, g * g), np.float32)
      for i in range(4):
        v = models['int8'](img=y, txt=txt, step=np.array([i], np.int32))
        y = y + (ts[i + 1] - ts[i]) * v['velocity']
      return m_vae(latents=y)['image']

    image()
    image_s = _time(image, 2) / 1e3
    print(f'4-step image {16 * g}x{16 * g} (T5 int8 + 4 x DiT int8 + VAE '
          f'fp32): {image_s:.2f} s')
  print(json.dumps({
      'jax_ms': round(ms['jax'], 1), 'litert_fp32_ms': round(ms['none'], 1),
      'litert_int8_ms': round(ms['int8'], 1),
      'fp32_vs_jax': round(ms['none'] / ms['jax'], 3),
      'int8_vs_fp32': round(ms['int8'] / ms['none'], 3),
      'fp32_mb': round(files['none']['bytes'] / 1e6, 1),
      'int8_mb': round(files['int8']['bytes'] / 1e6, 1),
      'image_s': None if image_s is None else round(image_s, 2), **mac}))


def flax_unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.meta.unbox(tree)


if __name__ == '__main__':
  app.run(main)

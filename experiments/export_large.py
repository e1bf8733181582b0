r"""Exports a >2 GB (fp32) denoiser to TFLite, runs it, and reports sizes/RSS.

A check of the big-model paths that CI cannot afford: one file through the
converter's buffer offsets, and the same model chunked into <= --chunk_mb
files chained by the runner. Both are run with LiteRT and compared with the
JAX forward on the same inputs.

  python experiments/export_large.py --out_dir=/tmp/large --hidden=1536
"""
import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

import nanoflux_jax as nf
from nanoflux_jax.compress import count_params
from nanoflux_jax.export import bundle, runner, tflite
from nanoflux_jax.models import flux

_OUT = flags.DEFINE_string('out_dir', '/tmp/nanoflux_large', 'Output folder.')
_HIDDEN = flags.DEFINE_integer('hidden', 1536, 'Hidden size (heads of 128).')
_DOUBLE = flags.DEFINE_integer('double', 4, 'Double blocks.')
_SINGLE = flags.DEFINE_integer('single', 8, 'Single blocks.')
_GRID = flags.DEFINE_integer('grid', 8, 'Packed token grid side.')
_TXT = flags.DEFINE_integer('txt_len', 16, 'Text tokens.')
_CHUNK_MB = flags.DEFINE_integer('chunk_mb', 1024, 'Chunk limit (MB).')
_MODES = flags.DEFINE_list('modes', ['single_file', 'chunked'],
                           'Which exports to run (peak RSS is per process, '
                           'so run one mode per process to compare them).')


def random_params(cfg, seed=0):
  """Random params from shapes, one leaf at a time (no init compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (rng.standard_normal(s.shape, np.float32) /
                 np.sqrt(s.shape[0] if len(s.shape) > 1 else 1) * 0.5),
      flux.param_shapes(cfg))


def run_chain(directory, entries, inputs):
  state = dict(inputs)
  for e in entries:
    model = runner.TFLiteModel(directory, e, num_threads=2)
    state.update(model(**{k: state[k] for k in model.inputs if k in state}))
  return state['velocity']


def main(argv):
  del argv
  d = _HIDDEN.value
  cfg = nf.FluxConfig(hidden_size=d, num_heads=d // 128, head_dim=128,
                      depth=_DOUBLE.value, depth_single_blocks=_SINGLE.value,
                      context_in_dim=512, vec_in_dim=256)
  n = count_params(cfg)
  print(f'config: hidden {d}, {cfg.depth}+{cfg.depth_single_blocks} blocks, '
        f'{n / 1e6:.0f}M params = {n * 4 / 2**30:.2f} GiB fp32')
  params = random_params(cfg)
  g, t = _GRID.value, _TXT.value
  rng = np.random.default_rng(1)
  inputs = dict(img=rng.standard_normal((1, g * g, 64), np.float32),
                txt=rng.standard_normal((1, t, 512), np.float32),
                timesteps=np.asarray([0.75], np.float32),
                y=rng.standard_normal((1, 256), np.float32))
  want = np.asarray(flux.Flux(cfg).apply(
      {'params': params}, img=inputs['img'],
      img_ids=nf.sampling.image_ids(1, g, g), txt=inputs['txt'],
      txt_ids=nf.sampling.text_ids(1, t), timesteps=inputs['timesteps'],
      y=inputs['y']))
  report = {'params': n}
  modes = {'single_file': None, 'chunked': _CHUNK_MB.value * 2**20}
  for name in _MODES.value:
    chunk = modes[name]
    out = os.path.join(_OUT.value, name)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    entries = bundle.export_denoiser(cfg, params, out, g, g, t,
                                     max_chunk_bytes=chunk)
    secs = time.perf_counter() - start
    sizes = [os.path.getsize(os.path.join(out, e['file'])) for e in entries]
    start = time.perf_counter()
    got = run_chain(out, entries, inputs)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    report[name] = {'files': len(entries), 'mb': [round(s / 2**20) for s in sizes],
                    'export_s': round(secs), 'run_s': round(time.perf_counter() - start, 1),
                    'max_rel_err': err, 'peak_rss_gb': round(tflite.peak_rss_mb() / 1024, 2)}
    print(name, report[name], flush=True)
  print(json.dumps(report))


if __name__ == '__main__':
  app.run(main)

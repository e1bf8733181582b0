r"""Exports a FLUX pipeline to TFLite (LiteRT) files for phones.

  python experiments/export_tflite.py --model=/ckpt/FLUX.1-schnell \
    --out_dir=/tmp/flux_tflite --height=512 --width=512 --quantize=int8

--model is a diffusers FLUX pipeline folder or a folder written by
`FluxPipeline.save`. --quantize takes one option or a comma list
(none,fp16,int8,int4); with several, each goes to out_dir/<option>/ and a size
table compares them. Every folder is written to a temporary sibling and
renamed into place, so a failed export never replaces a good one. After
exporting, one image is generated with the LiteRT runner to report latency.
"""
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

import nanoflux_jax as nf
from nanoflux_jax import export

_MODEL = flags.DEFINE_string('model', None, 'Pipeline folder.', required=True)
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Output folder.', required=True)
_HEIGHT = flags.DEFINE_integer('height', 512, 'Image height (pixels).')
_WIDTH = flags.DEFINE_integer('width', 512, 'Image width (pixels).')
_QUANTIZE = flags.DEFINE_list('quantize', ['none'],
                              'none | fp16 | int8 | int4 (comma list).')
_QUANTIZE_VAE = flags.DEFINE_bool('quantize_vae', False,
                                  'Also quantize the VAE decoder.')
_STEPS = flags.DEFINE_integer('steps', 4, 'Euler steps baked in the manifest.')
_MAX_SEQ = flags.DEFINE_integer('max_sequence_length', 256, 'T5 tokens.')
_CHUNK_MB = flags.DEFINE_float(
    'max_chunk_mb', 1024, 'Split the denoiser into block chunks of at most '
    'this many MB of weights; 0: never chunk (buffer offsets above 2 GB).')
_THREADS = flags.DEFINE_integer('num_threads', 2, 'LiteRT threads for the '
                                'latency check.')
_CHECK = flags.DEFINE_bool('check', True, 'Generate one image with LiteRT.')


def _out(q: str) -> str:
  return (_OUT_DIR.value if len(_QUANTIZE.value) == 1 else
          os.path.join(_OUT_DIR.value, q))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TF's SavedModel chatter.
  # Arguments and output folders are checked before loading anything.
  if not _QUANTIZE.value:
    raise app.UsageError('--quantize: give at least one option')
  for q in _QUANTIZE.value:
    export.check_export_args(_out(q), _HEIGHT.value, _WIDTH.value,
                             num_steps=_STEPS.value,
                             max_sequence_length=_MAX_SEQ.value, quantize=q)
  if _CHUNK_MB.value < 0:
    raise app.UsageError(f'--max_chunk_mb={_CHUNK_MB.value} must be >= 0')
  t0 = time.perf_counter()
  pipe = nf.FluxPipeline.from_pretrained(_MODEL.value)
  print(f'load: {time.perf_counter() - t0:.1f} s')
  options = _QUANTIZE.value
  manifests = {}
  for q in options:
    out = _out(q)
    t0 = time.perf_counter()
    manifests[q] = export.export_pipeline(
        pipe, out, _HEIGHT.value, _WIDTH.value, num_steps=_STEPS.value,
        max_sequence_length=_MAX_SEQ.value, quantize=q,
        quantize_vae=_QUANTIZE_VAE.value,
        max_chunk_bytes=_CHUNK_MB.value * 1e6 if _CHUNK_MB.value else None)
    print(f'[{q}] exported to {out} in {time.perf_counter() - t0:.1f} s, '
          f'peak RSS {manifests[q]["export"]["peak_rss_mb"]:.0f} MB')
    if _CHECK.value:
      runner = export.TFLitePipeline(out, num_threads=_THREADS.value)
      runner(['warm-up'], seed=0)
      t0 = time.perf_counter()
      image = runner(['a photo of a cat'], seed=0)
      total = time.perf_counter() - t0
      stages = ', '.join(f'{k} {v * 1e3:.0f} ms'
                         for k, v in runner.last_timings.items())
      print(f'[{q}] LiteRT ({_THREADS.value} threads): {total:.2f} s per '
            f'image {image.shape} ({stages})')
  print('\nFile sizes (MB):')
  print(export.size_table(manifests))


if __name__ == '__main__':
  app.run(main)

r"""Exports a real-size denoiser to TFLite chunk by chunk, checks and times it.

  python experiments/export_large.py --preset=nanoflux --quantize=int8

--preset=nanoflux is FLUX.1-schnell compressed by the library's own calls
(export/student.py: half the heads, 31% of the MLP channels, 13 + 27
blocks, static modulation, the token down-sampler): 2.41B DiT parameters,
built from shapes and filled with seeded random weights one tensor at a
time. --preset=nanoflux_half keeps 6 + 13 blocks (1.22B); --preset=custom
is a plain DiT of --hidden / --double / --single.

1. Streaming export (export/streaming.py): each chunk of <= --chunk_mb
   (quantized bytes) is converted in its own process, from weights
   regenerated from the seed; no process holds more than one chunk.
2. Parity: the JAX forward of the same weights, chunk by chunk in a child
   process, in float32 and with int8 simulated (the stored int8 weights,
   and XNNPACK's dynamic int8 quantization of every int8 layer's input).
   --jitter=1e-7 also runs that simulation on inputs moved by float32
   rounding, which bounds how close any second implementation can get.
3. LiteRT: every file loaded as an app does (XNNPACK, --threads), one
   denoiser step at 512 x 512 px (--grid 32 -> 1024 image tokens) with
   --txt_len T5 tokens, run --litert_steps times in a child process.

Peak RSS (getrusage) of this process plus the largest child is reported
for the export + parity, and the LiteRT child's on its own. Ends with one
JSON line.
"""
import json
import os
import shutil
import sys
import time

from absl import app
from absl import flags
import numpy as np

import nanoflux_jax as nf
from nanoflux_jax.call_args import DEFAULT_GUIDANCE
from nanoflux_jax.compress import count_params
from nanoflux_jax.export import components, streaming, student, tflite
from nanoflux_jax.models import flux

_PRESET = flags.DEFINE_enum('preset', 'custom',
                            ['custom', 'nanoflux', 'nanoflux_half'],
                            'Model to export (see the module docstring).')
_QUANT = flags.DEFINE_enum('quantize', 'none', list(tflite.QUANTIZE_OPTIONS),
                           'Weight quantization.')
_OUT = flags.DEFINE_string('out_dir', '/tmp/nanoflux_large', 'Output folder.')
_HIDDEN = flags.DEFINE_integer('hidden', 1536, 'custom: hidden size.')
_DOUBLE = flags.DEFINE_integer('double', 4, 'custom: double blocks.')
_SINGLE = flags.DEFINE_integer('single', 8, 'custom: single blocks.')
_GRID = flags.DEFINE_integer('grid', None, 'Packed token grid side '
                             '(default: 32 for nanoflux presets = 512 px, '
                             '8 for custom).')
_TXT = flags.DEFINE_integer('txt_len', None, 'Text tokens (default: 256 '
                            'for nanoflux presets, 16 for custom).')
_CHUNK_MB = flags.DEFINE_integer('chunk_mb', 256, 'Chunk limit in MB of '
                                 'stored (quantized) weights, <= 1024; 0: '
                                 'one file.')
_SEED = flags.DEFINE_integer('seed', 0, 'Weight seed.')
_THREADS = flags.DEFINE_integer('threads', 2, 'LiteRT threads.')
_STEPS = flags.DEFINE_integer('litert_steps', 2, 'Timed LiteRT denoiser '
                              'steps (0: skip the LiteRT run).')
_PARITY = flags.DEFINE_bool('parity', True, 'Run the JAX references.')
_JITTER = flags.DEFINE_float(
    'jitter', 0.0, 'int8: also run the JAX int8 simulation on the inputs '
    'times (1 + jitter * N(0, 1)) and report its max relative error against '
    'the unperturbed one ("jax_int8_vs_jittered"): how far a second, exact '
    'implementation of the same int8 arithmetic lands when its float ops '
    'differ in the last bits (1e-7: float32 rounding). 0: skip.')


def _log(msg):
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def model():
  if _PRESET.value == 'custom':
    d = _HIDDEN.value
    cfg = nf.FluxConfig(hidden_size=d, num_heads=d // 128, head_dim=128,
                        depth=_DOUBLE.value,
                        depth_single_blocks=_SINGLE.value,
                        context_in_dim=512, vec_in_dim=256)
    return cfg, flux.param_shapes(cfg)
  recipe = {'nanoflux': student.NANOFLUX,
            'nanoflux_half': student.NANOFLUX_HALF}[_PRESET.value]
  return student.nanoflux_student(recipe)


def _references(cfg, source, chunks, grid, inputs, quantize, jitter=0.0):
  """Child process: JAX fp32 and quantization-simulated forwards."""
  out = {'fp32': streaming.run_jax_streaming(cfg, source, chunks, grid, grid,
                                             inputs)}
  if quantize == 'int8':
    int8 = lambda x: streaming.run_jax_streaming(
        cfg, source, chunks, grid, grid, x,
        transform=streaming.fake_quant_int8, quantize_inputs=True)
    out['int8'] = int8(inputs)
    if jitter:
      rng = np.random.default_rng(7)
      out['int8_jittered'] = int8({
          k: (v * (1 + jitter * rng.standard_normal(v.shape))).astype(v.dtype)
          if v.dtype == np.float32 else v for k, v in inputs.items()})
  out['peak_rss_mb'] = streaming.peak_rss_mb()
  return out


def main(argv):
  del argv
  nanoflux = _PRESET.value != 'custom'
  grid = _GRID.value or (32 if nanoflux else 8)
  txt_len = _TXT.value or (256 if nanoflux else 16)
  quantize = _QUANT.value
  if not 0 <= _CHUNK_MB.value <= 1024:
    raise ValueError(f'--chunk_mb={_CHUNK_MB.value} must be in [0, 1024]')
  cfg, shapes = model()
  n = count_params(cfg)
  _log(f'{_PRESET.value}: {n:,} params ({n / 1e9:.2f}B), {cfg.depth}+'
       f'{cfg.depth_single_blocks} blocks, hidden {cfg.hidden_size}, '
       f'modulation {cfg.modulation}, down-sampler {cfg.downsample_start}..'
       f'{cfg.downsample_end}; {grid * grid} image + {txt_len} text tokens')
  source = streaming.RandomSource(shapes, _SEED.value)
  rng = np.random.default_rng(1)
  inputs = {'img': rng.standard_normal((1, grid * grid, cfg.in_channels),
                                       np.float32),
            'txt': rng.standard_normal((1, txt_len, cfg.context_in_dim),
                                       np.float32)}
  if cfg.modulation == 'static':
    inputs['step'] = np.asarray([1], np.int32)
  else:
    inputs['timesteps'] = np.asarray([0.75], np.float32)
    inputs['y'] = rng.standard_normal((1, cfg.vec_in_dim), np.float32)
    if cfg.guidance_embed:
      inputs['guidance'] = np.asarray([DEFAULT_GUIDANCE], np.float32)

  out = os.path.join(_OUT.value, f'{_PRESET.value}_{quantize}')
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  chunk = _CHUNK_MB.value * 2**20 or None
  start = time.perf_counter()
  entries = streaming.export_denoiser_streaming(
      cfg, source, out, grid, grid, txt_len, quantize=quantize,
      max_chunk_bytes=chunk, processes=True, workdir=out, log=_log)
  export_s = time.perf_counter() - start
  total = sum(e['bytes'] for e in entries)
  child_peaks = [e['peak_rss_mb'] for e in entries]
  _log(f'export: {len(entries)} files, {total / 2**20:.0f} MiB, '
       f'{export_s:.0f} s, child peaks (GiB) '
       f'{[round(p / 1024, 2) for p in child_peaks]}')
  report = {'preset': _PRESET.value, 'quantize': quantize, 'params': n,
            'export_s': round(export_s), 'files': len(entries),
            'total_mb': round(total / 2**20, 1),
            'mb_per_file': [round(e['bytes'] / 2**20) for e in entries]}
  with open(os.path.join(out, 'entries.json'), 'w') as f:
    json.dump(entries, f, indent=1)

  if _PARITY.value:
    # The reference chunks hold at most --chunk_mb of float32 weights.
    ref_chunks = components.plan_chunks(cfg, shapes,
                                        chunk or 1 << 30, 4.0)
    t0 = time.perf_counter()
    refs = streaming.in_subprocess(_references, cfg, source, ref_chunks,
                                   grid, inputs, quantize, _JITTER.value)
    if 'int8_jittered' in refs:
      report['jax_int8_vs_jittered'] = streaming.max_rel_err(
          refs['int8_jittered']['velocity'], refs['int8']['velocity'])
    child_peaks.append(refs['peak_rss_mb'])
    _log(f'JAX references: {time.perf_counter() - t0:.0f} s, '
         f'peak {refs["peak_rss_mb"] / 1024:.2f} GiB')
  peak = streaming.peak_rss_mb() + max(child_peaks)
  report['peak_rss_gb'] = round(peak / 1024, 2)
  report['export_child_peak_rss_gb'] = round(
      max(e['peak_rss_mb'] for e in entries) / 1024, 2)
  report['parent_peak_rss_gb'] = round(streaming.peak_rss_mb() / 1024, 2)

  if _STEPS.value:
    t0 = time.perf_counter()
    lite = streaming.in_subprocess(streaming.run_litert, out, entries,
                                   inputs, _THREADS.value, _STEPS.value)
    _log(f'LiteRT: load {lite["load_s"]} s, steps {lite["step_s"]} s, '
         f'peak {lite["peak_rss_mb"] / 1024:.2f} GiB '
         f'({time.perf_counter() - t0:.0f} s)')
    report['litert_step_s'] = min(lite['step_s'])
    report['litert_steps_s'] = lite['step_s']
    report['litert_load_s'] = lite['load_s']
    report['litert_peak_rss_gb'] = round(lite['peak_rss_mb'] / 1024, 2)
    report['litert_4_steps_s'] = round(4 * min(lite['step_s']), 1)
    if _PARITY.value:
      got = lite['velocity']
      if 'int8' in refs:
        report['max_rel_err_vs_jax_int8'] = streaming.max_rel_err(
            got, refs['int8']['velocity'])
        report['jax_int8_psnr_vs_fp32'] = round(streaming.psnr(
            refs['int8']['velocity'], refs['fp32']['velocity']), 2)
      report['max_rel_err_vs_jax_fp32'] = streaming.max_rel_err(
          got, refs['fp32']['velocity'])
      report['psnr_vs_fp32'] = round(streaming.psnr(
          got, refs['fp32']['velocity']), 2)
  report['rusage_children_peak_gb'] = round(
      streaming.children_peak_rss_mb() / 1024, 2)
  print(json.dumps(report), flush=True)


if __name__ == '__main__':
  sys.setrecursionlimit(10000)
  app.run(main)

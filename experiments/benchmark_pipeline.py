r"""End-to-end text-to-image time: nf.FluxPipeline vs diffusers' FluxPipeline.

Both load the same random pipeline folder (built offline, sized so that the
denoiser dominates), generate from the same prompts and initial noise, fp32
on the CPU (torch with 2 threads). Our first call includes jit compilation
and is reported separately.

  python experiments/benchmark_pipeline.py --size=128 --steps=4
"""
import json
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import nanoflux_jax as nf
from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline

_SIZE = flags.DEFINE_integer('size', 128, 'Image side (pixels).')
_STEPS = flags.DEFINE_integer('steps', 4, 'Euler steps.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Prompts per call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls (median).')
_TXT = flags.DEFINE_integer('max_sequence_length', 64, 'T5 tokens.')

# Scaled up from the test fixture so denoising dominates: hidden 512,
# 2 double + 4 single blocks; VAE factor 2, so 128 px -> 32x32 = 1024 tokens.
SIZES = dict(num_layers=2, num_single_layers=4, num_attention_heads=8,
             attention_head_dim=64, axes_dims_rope=(8, 28, 28),
             t5_d_model=256, t5_d_kv=32, t5_d_ff=512, t5_num_layers=2,
             t5_num_heads=8, clip_hidden=128, clip_heads=4,
             clip_intermediate=256, vae_block_out_channels=(32, 64))


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  folder = tempfile.mkdtemp()
  ref = make_tiny_flux_pipeline(folder, sizes=SIZES)
  ours = nf.FluxPipeline.from_pretrained(folder)
  prompts = ['a small red circle on the left, on a blue background'] * _BATCH.value
  size, steps, n_txt = _SIZE.value, _STEPS.value, _TXT.value
  f = ours.latent_factor
  g = torch.Generator().manual_seed(0)
  noise = torch.randn((len(prompts), 16, 2 * (size // f), 2 * (size // f)),
                      generator=g)
  packed = ref._pack_latents(noise, *noise.shape)  # pylint: disable=protected-access

  def run_ours():
    return ours(prompts, height=size, width=size, num_steps=steps,
                latents=packed.numpy(), max_sequence_length=n_txt)

  def run_ref():
    with torch.no_grad():
      return ref(prompts, height=size, width=size, num_inference_steps=steps,
                 latents=packed, max_sequence_length=n_txt, output_type='np',
                 ).images

  start = time.perf_counter()
  run_ours()
  first = time.perf_counter() - start
  ours_s, img = _median_time(run_ours, _REPEATS.value)
  stages = dict(ours.last_timings)
  ref_s, ref_img = _median_time(run_ref, _REPEATS.value)
  diff = int(np.abs(img.astype(int) - np.round(ref_img * 255).astype(int)).max())
  tokens = (size // f) ** 2
  print(f'{len(prompts)} x {size}px, {tokens} image + {n_txt} text tokens, '
        f'{steps} steps, fp32, CPU')
  print(f'max pixel difference ours vs diffusers: {diff} (uint8 levels)')
  print(f'{"":12}{"seconds":>10}')
  print(f'{"ours":12}{ours_s:10.3f}   ' + ', '.join(
      f'{k} {v:.3f}' for k, v in stages.items()))
  print(f'{"diffusers":12}{ref_s:10.3f}')
  print(f'{"first call":12}{first:10.3f}   (ours, includes jit compilation)')
  print(f'speed ratio diffusers / ours: {ref_s / ours_s:.2f}')
  print(json.dumps({'ours_s': round(ours_s, 4), 'diffusers_s': round(ref_s, 4),
                    'speed_ratio': round(ref_s / ours_s, 3),
                    'compile_s': round(first - ours_s, 3)}))


if __name__ == '__main__':
  app.run(main)

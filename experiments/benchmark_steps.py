r"""End-to-end time of two pipeline folders, each at its own call defaults.

Made for the step-distillation rung: the same student before (8 Euler
steps) and after (4), or any two students. Both folders run on the same
prompts, batch and initial noise, interleaved call by call so that machine
load hits both alike; each is called as a user would, with prompts and a
seed only, so the steps, size and T5 length come from its
call_defaults.json.

  python experiments/benchmark_steps.py \
      --before=docs/shapes_full/pipeline --after=docs/shapes_steps/pipeline

Prints a table, the speed-ups (before / after), the ratio of the DiT's
FLOPs per image over the whole denoising loop (compress.count_flops x the
steps) and the denoise speed-up as a fraction of it, and one JSON line.
The teacher against a compressed student of the same steps:

  python experiments/benchmark_steps.py \
      --before=nanoflux_jax/shapes/assets/shapes_teacher \
      --after=docs/shapes_full/pipeline
"""
import json
import statistics
import time

from absl import app
from absl import flags

import nanoflux_jax as nf
from nanoflux_jax import compress
from nanoflux_jax.shapes import world as shapes

_BEFORE = flags.DEFINE_string('before', None, 'Pipeline folder (baseline).',
                              required=True)
_AFTER = flags.DEFINE_string('after', None, 'Pipeline folder (compared).',
                             required=True)
_BATCH = flags.DEFINE_integer('batch', 8, 'Prompts per call.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls of each.')


def _denoise_flops(pipe) -> int:
  """DiT FLOPs of one image's denoising loop at the folder's call defaults."""
  d, f = pipe.call_defaults, pipe.latent_factor
  return d.num_steps * compress.count_flops(
      pipe.flux_cfg, (d.height // f) * (d.width // f), d.max_sequence_length)


def main(argv):
  del argv
  prompts = [shapes.ShapesWorld(seed=1000).scene(i).caption
             for i in range(_BATCH.value)]
  pipes = {k: nf.FluxPipeline.from_pretrained(p)
           for k, p in (('before', _BEFORE.value), ('after', _AFTER.value))}
  times = {k: {'total': [], 'denoise': []} for k in pipes}
  for k, pipe in pipes.items():
    pipe(prompts, seed=0)  # Compile.
  for _ in range(_REPEATS.value):
    for k, pipe in pipes.items():
      t0 = time.perf_counter()
      pipe(prompts, seed=0)
      times[k]['total'].append(1e3 * (time.perf_counter() - t0))
      times[k]['denoise'].append(1e3 * pipe.last_timings['denoise'])
  per_img = {k: {m: statistics.median(v) / _BATCH.value
                 for m, v in t.items()} for k, t in times.items()}
  steps = {k: p.call_defaults.num_steps for k, p in pipes.items()}
  print(f'batch {_BATCH.value}, median of {_REPEATS.value} interleaved '
        'calls, ms per image')
  print('| pipeline | Euler steps | denoise ms | total ms |')
  print('|---|---:|---:|---:|')
  for k in pipes:
    print(f"| {k} | {steps[k]} | {per_img[k]['denoise']:.2f} | "
          f"{per_img[k]['total']:.2f} |")
  speedup = {m: per_img['before'][m] / per_img['after'][m]
             for m in ('denoise', 'total')}
  flop_ratio = _denoise_flops(pipes['before']) / _denoise_flops(
      pipes['after'])
  print(f"speed-up: denoise {speedup['denoise']:.2f}x, end to end "
        f"{speedup['total']:.2f}x; denoising FLOPs {flop_ratio:.2f}x fewer: "
        f"the denoise speed-up is {speedup['denoise'] / flop_ratio:.2f} of "
        'the FLOP ratio')
  print(json.dumps(dict(steps=steps, ms_per_image=per_img,
                        denoise_speedup=speedup['denoise'],
                        flop_ratio=flop_ratio,
                        speedup_of_flop_ratio=speedup['denoise'] / flop_ratio,
                        total_speedup=speedup['total'],
                        batch=_BATCH.value, repeats=_REPEATS.value)))


if __name__ == '__main__':
  app.run(main)

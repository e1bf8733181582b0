r"""Generates images with a FLUX pipeline and writes a PNG grid.

  python experiments/sample.py --model=/ckpt/FLUX.1-schnell \
    --prompt="a photo of a cat" --prompt="a red bicycle" \
    --height=512 --width=512 --steps=4 --seed=0 --out=grid.png

--model is a diffusers FLUX pipeline folder or a folder written by
`FluxPipeline.save`. --height, --width, --steps and --max_sequence_length
default to the folder's call_defaults.json (else 512, 512, 4, 256). Prints the time of each stage (encode, denoise, decode);
the first call includes jit compilation, so it is reported separately.
"""
import time

from absl import app
from absl import flags
import numpy as np

import nanoflux_jax as nf
from nanoflux_jax import images
from nanoflux_jax import pipeline

_MODEL = flags.DEFINE_string('model', None, 'Pipeline folder.', required=True)
_PROMPT = flags.DEFINE_multi_string('prompt', ['a photo of a cat'], 'Prompts.')
_HEIGHT = flags.DEFINE_integer('height', None, 'Image height (pixels); '
                               "default: the folder's.")
_WIDTH = flags.DEFINE_integer('width', None, "Image width (pixels); default: "
                              "the folder's.")
_STEPS = flags.DEFINE_integer('steps', None, "Euler steps; default: the "
                              "folder's.")
_MAX_SEQ = flags.DEFINE_integer('max_sequence_length', None, 'T5 tokens; '
                                "default: the folder's.")
_SEED = flags.DEFINE_integer('seed', 0, 'Noise seed.')
_GUIDANCE = flags.DEFINE_float('guidance', None, 'Guidance (dev models).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'Cast params (default: as stored).')
_OUT = flags.DEFINE_string('out', 'grid.png', 'Output PNG.')


def main(argv):
  del argv
  # Arguments are checked before loading the model or generating anything.
  kw = dict(height=_HEIGHT.value, width=_WIDTH.value, num_steps=_STEPS.value,
            seed=_SEED.value, guidance=_GUIDANCE.value,
            max_sequence_length=_MAX_SEQ.value)
  for name in ('height', 'width', 'num_steps', 'max_sequence_length'):
    if kw[name] is not None:  # None: the folder's call default.
      pipeline.check_int('sample.py', f'--{name}', kw[name])
  pipeline.check_int('sample.py', '--seed', kw['seed'], -2**63, 2**63 - 1)
  pipeline.check_prompts('sample.py --prompt', _PROMPT.value)
  images.check_writable(_OUT.value)
  t0 = time.perf_counter()
  pipe = nf.FluxPipeline.from_pretrained(
      _MODEL.value, dtype=np.dtype(_DTYPE.value) if _DTYPE.value else None)
  print(f'load: {time.perf_counter() - t0:.2f} s')
  pipe.check_call(_PROMPT.value, **kw)  # The exact resolution multiple.
  t0 = time.perf_counter()
  out = pipe(_PROMPT.value, **kw)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = pipe(_PROMPT.value, **kw)
  total = time.perf_counter() - t0
  print(f'first call (with jit compilation): {first:.2f} s')
  for stage, secs in pipe.last_timings.items():
    print(f'{stage:>8}: {secs * 1000:9.1f} ms')
  print(f'{"total":>8}: {total * 1000:9.1f} ms for {len(out)} image(s)')
  images.save_grid(out, _OUT.value)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)

r"""Converts a FLUX transformer checkpoint (BFL or diffusers) to nanoflux format.

  python experiments/convert_flux.py \
    --src=/ckpt/FLUX.1-schnell/flux1-schnell.safetensors \
    --out=/ckpt/schnell-nanoflux --dtype=bfloat16

--src may be a BFL .safetensors file, a diffusers transformer/ folder or a
whole diffusers pipeline folder. The output folder (orbax params + config
JSON) loads with `nf.convert.load_flux_transformer(out)`.

--nonfinite=error (the default) refuses a source with NaN / inf params:
the binary exits non-zero naming each such tensor and writes nothing;
--nonfinite=warn names them in a warning and converts anyway.
"""
import resource
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import checkpoint
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.errors import CheckpointError

_SRC = flags.DEFINE_string('src', None, 'BFL file, diffusers folder or '
                           'pipeline folder.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Output checkpoint folder.',
                           required=True)
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16',
                                                  'float16'], 'Param dtype.')
_NONFINITE = flags.DEFINE_enum(
    'nonfinite', 'error', ['warn', 'error'], 'A source tensor with NaN / inf '
    "values: 'error' exits naming it, writing nothing; 'warn' names it and "
    'converts anyway.')
_AXES_DIM = flags.DEFINE_list('axes_dim', None, 'RoPE axes split, only for BFL '
                              'files of non-FLUX head dims, e.g. 16,24,24.')


def main(argv):
  del argv
  # Refuse an --out that is not a checkpoint before converting anything.
  atomic.check_replaceable(_OUT.value, checkpoint.is_checkpoint,
                           'nanoflux checkpoint')
  start = time.perf_counter()
  axes = tuple(int(a) for a in _AXES_DIM.value) if _AXES_DIM.value else None
  try:
    cfg, params = convert_flux.load_flux_transformer(
        _SRC.value, np.dtype(_DTYPE.value), axes_dim=axes, progress=True,
        nonfinite=_NONFINITE.value)
  except CheckpointError as e:  # The user's file: one message, no traceback.
    sys.exit(f'convert_flux.py: {e}')
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  logging.info('converted %s: %d double + %d single blocks, %.3fB params',
               _SRC.value, cfg.depth, cfg.depth_single_blocks, n / 1e9)
  checkpoint.save(_OUT.value, cfg, params)
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f'wrote {_OUT.value}: {n:,} params ({_DTYPE.value}), '
        f'{time.perf_counter() - start:.1f} s, peak RSS {peak_gb:.2f} GiB')


if __name__ == '__main__':
  app.run(main)

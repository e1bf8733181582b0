r"""Distils a small T5 text encoder from the teacher T5 through the denoiser.

  python experiments/distill_text_encoder.py \
      --config=experiments/configs/distill_text_encoder_tiny.py \
      --workdir=/tmp/distill_te
Writes workdir/checkpoints (resumable) and, when done,
workdir/student_text_encoder (config {'t5': ..., 'out_dim': ...} + params).
One run per workdir (workdir/workdir.lock); when training stops on an
error, the last line printed names the cause.
"""
from absl import app
from absl import flags
from absl import logging
import jax

import config_flag  # experiments/config_flag.py, beside this binary.
from nanoflux_jax import parallel
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import stop_reason
from nanoflux_jax.distill import t5_distill as text_encoder
from nanoflux_jax.distill import workdir_lock

_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and the student.',
                               required=True)
_CONFIG = config_flag.define_config_file('config', 'Config file.')
_PROFILE = config_flag.profile_steps_flag()


def main(argv):
  del argv
  if _PROFILE.value:
    _CONFIG.value.profile_steps = config_flag.profile_steps(_PROFILE)
  try:  # The loop's fields, before loading the teacher T5 or denoiser.
    loop.check_loop_config(_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  parallel.maybe_initialize_distributed()
  logging.info('process %d/%d, %d devices', jax.process_index(),
               jax.process_count(), jax.device_count())
  try:
    with stop_reason.final_line():  # Why it stopped: the last line printed.
      text_encoder.train_text_encoder(_CONFIG.value, _WORKDIR.value)
  except workdir_lock.WorkdirLocked as e:
    raise app.UsageError(str(e)) from e  # The message, no traceback.


if __name__ == '__main__':
  app.run(main)

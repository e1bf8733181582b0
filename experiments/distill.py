r"""Distils a FLUX student from a teacher (or trains it from scratch).

  python experiments/distill.py --config=experiments/configs/distill_tiny.py \
      --workdir=/tmp/distill
Multi-host: launch the same command on every host; jax.distributed is
initialised only when the launcher says there are several processes.
One run per workdir (workdir/workdir.lock); when training stops on an
error, the last line printed names the cause.
"""

from absl import app
from absl import flags
from absl import logging
import jax

import config_flag  # experiments/config_flag.py, beside this binary.
from nanoflux_jax import parallel
from nanoflux_jax.distill import stop_reason
from nanoflux_jax.distill import trainer
from nanoflux_jax.distill import workdir_lock

_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and samples.',
                               required=True)
_INIT = flags.DEFINE_string('init', '', 'Student checkpoint to start from '
                            '(used only when workdir has no checkpoint).')
_CONFIG = config_flag.define_config_file('config', 'Config file.')
_PROFILE = config_flag.profile_steps_flag()

def main(argv):
  del argv
  c = _CONFIG.value
  if _INIT.value:
    c.init = _INIT.value
  if _PROFILE.value:
    c.profile_steps = config_flag.profile_steps(_PROFILE)
  try:  # Before touching devices, the teacher or the workdir.
    trainer.check_config(c)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  parallel.maybe_initialize_distributed()
  logging.info('process %d/%d, %d devices', jax.process_index(),
               jax.process_count(), jax.device_count())
  try:
    with stop_reason.final_line():  # Why it stopped: the last line printed.
      trainer.train(c, _WORKDIR.value)
  except workdir_lock.WorkdirLocked as e:
    raise app.UsageError(str(e)) from e  # The message, no traceback.


if __name__ == '__main__':
  app.run(main)

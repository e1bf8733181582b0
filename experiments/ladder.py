r"""Runs (or resumes) the NanoFLUX compression ladder.

  python experiments/ladder.py --config=experiments/configs/ladder_tiny.py \
      --workdir=/tmp/ladder
Rerunning the same command resumes: finished rungs are loaded, an
interrupted rung continues from its last trainer checkpoint. A rung trained
under other settings (options, distillation config, teacher) is refused,
naming each difference; --config.accept_changed_settings=True goes on and
records the change. One run per workdir (workdir/workdir.lock). Multi-host:
launch the same command on every host.
"""

from absl import app
from absl import flags
from absl import logging
import jax

import config_flag  # experiments/config_flag.py, beside this binary.
from nanoflux_jax import parallel
from nanoflux_jax.ladder import runner as ladder
from nanoflux_jax.ladder import provenance
from nanoflux_jax.ladder import report as report_lib
from nanoflux_jax.distill import stop_reason
from nanoflux_jax.distill import workdir_lock

_WORKDIR = flags.DEFINE_string('workdir', None, 'Ladder outputs; resumed.',
                               required=True)
_CONFIG = config_flag.define_config_file('config', 'Config file.')
_PROFILE = config_flag.profile_steps_flag()

def main(argv):
  del argv
  if _PROFILE.value:  # Every rung's trainer traces those steps.
    _CONFIG.value.distill.profile_steps = config_flag.profile_steps(_PROFILE)
  # Validate before touching devices or the teacher.
  ladder.check_config(_CONFIG.value)
  parallel.maybe_initialize_distributed()
  logging.info('process %d/%d, %d devices', jax.process_index(),
               jax.process_count(), jax.device_count())
  try:
    with stop_reason.final_line():  # Why it stopped: the last line printed.
      report = ladder.run_ladder(_CONFIG.value, _WORKDIR.value)
  except (provenance.SettingsChanged, workdir_lock.WorkdirLocked) as e:
    raise app.UsageError(str(e)) from e  # The message, no traceback.
  print(report_lib.report_markdown(report))
  print('ladder complete' if report['complete'] else
        'ladder stopped early; rerun to resume')


if __name__ == '__main__':
  app.run(main)

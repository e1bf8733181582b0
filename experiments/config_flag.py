"""The `--config` flag of the training binaries, with clear override errors.

ml_collections' config flag lets an override of a field the config does not
have (`--config.no_such_field=1`) escape flag parsing as a chained
AttributeError. `define_config_file` turns it into a flags error naming the
flag, which absl reports as a usage error, and makes `--config` required.
The config is locked (`lock_config=True`): code cannot add fields to it by
a typo either. `profile_steps_flag` is the shared `--profile_steps=a,b`.
"""
from absl import flags
from ml_collections import config_flags


def define_config_file(name: str = 'config', help_string: str = 'Config file.'):
  """DEFINE_config_file(name), required, with override errors named."""
  holder = config_flags.DEFINE_config_file(name, None, help_string,
                                           lock_config=True)
  flag = flags.FLAGS[name]
  parse = flag._parse  # pylint: disable=protected-access

  def _parse(argument):
    try:
      return parse(argument)
    except (AttributeError, KeyError) as e:
      field = str(e).strip('"\'')
      raise flags.IllegalFlagValueError(
          f'--{name}.{field}: the config {argument} has no field {field!r}'
          ' (check the spelling of the override)') from None

  flag._parse = _parse  # pylint: disable=protected-access
  flags.mark_flag_as_required(name)
  return holder


def profile_steps_flag():
  """--profile_steps=a,b: a jax.profiler trace of training steps a..b."""
  return flags.DEFINE_list(
      'profile_steps', None, 'first,last (1-based) training steps to trace '
      'with jax.profiler into <workdir>/profile (TensorBoard / Perfetto).')


def profile_steps(flag) -> tuple[int, int] | None:
  """The flag's (first, last), or None when unset."""
  if not flag.value:
    return None
  try:
    first, last = (int(v) for v in flag.value)
  except ValueError:
    raise flags.IllegalFlagValueError(
        f'--profile_steps={",".join(flag.value)}: expected two integers '
        'first,last') from None
  return first, last

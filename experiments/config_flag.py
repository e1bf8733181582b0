"""The `--config` flag of the training binaries, with clear override errors.

ml_collections' config flag lets an override of a field the config does not
have (`--config.no_such_field=1`) escape flag parsing as a chained
AttributeError. `define_config_file` turns it into a flags error naming the
flag, which absl reports as a usage error, and makes `--config` required.
"""
from absl import flags
from ml_collections import config_flags


def define_config_file(name: str = 'config', help_string: str = 'Config file.'):
  """DEFINE_config_file(name), required, with override errors named."""
  holder = config_flags.DEFINE_config_file(name, None, help_string)
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

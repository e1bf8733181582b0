"""`parse_arg`: the one parser of config-file arguments (big_vision style).

A config file's `get_config(arg)` receives what follows ':' in
`--config=experiments/configs/shapes.py:full,stop_after=2`. Every config
parses it the same way:

  a = parse_arg(arg, variants=('quick', 'full'), runlocal=False,
                stop_after=None)
  a.variant, a.runlocal, a.stop_after

Items are comma-separated: `key=value`, or a bare `key` for a flag (True).
With `variants`, the first item may be one of them (default: the first).
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections

_TRUE, _FALSE = ('', '1', 'true', 'yes'), ('0', 'false', 'no')


def _convert(key: str, value: str, default: Any):
  """value as the type of `default` (None: an int if it reads as one)."""
  try:
    if isinstance(default, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(value)
      return value.lower() in _TRUE
    if default is None:
      return int(value) if value.lstrip('-').isdigit() else value
    return type(default)(value)
  except ValueError:
    raise ValueError(f'config arg {key}={value!r}: expected a '
                     f'{type(default).__name__}') from None


def parse_arg(arg: str | None, *, variants: Sequence[str] = (),
              **spec) -> ml_collections.ConfigDict:
  """Parses a config argument against `spec` (every allowed key and its
  default); returns a ConfigDict of all of them (+ 'variant').

  Raises:
    ValueError: an unknown key or variant, a bare key that is not a flag, or
      a value of the wrong type, naming the item and the known keys.
  """
  out = dict(spec)
  items = [i.strip() for i in (arg or '').split(',') if i.strip()]
  if variants:
    out['variant'] = variants[0]
    if items and '=' not in items[0] and items[0] not in spec:
      if items[0] not in variants:
        raise ValueError(f'config arg: unknown variant {items[0]!r}; known: '
                         f'{list(variants)}')
      out['variant'] = items.pop(0)
  for item in items:
    key, eq, value = item.partition('=')
    if key not in spec:
      raise ValueError(f'config arg {item!r}: unknown option {key!r}; known: '
                       f'{sorted(spec)}')
    if not eq and not isinstance(spec[key], bool):
      raise ValueError(f'config arg {item!r}: {key} needs a value ({key}=...)')
    out[key] = _convert(key, value, spec[key])
  return ml_collections.ConfigDict(out)

"""Config field checks shared by the training binaries' `check_config`s:
each raises ValueError naming `config.<path>` and what was expected."""
from __future__ import annotations

import math
import numbers


def config_field(c, path: str):
  cur = c
  for part in path.split('.'):
    if cur is None or part not in cur:
      raise ValueError(f'config.{path} is missing')
    cur = cur[part]
  return cur


def check_int(c, path: str, low: int, optional: bool = False) -> None:
  v = config_field(c, path)
  if optional and v is None:
    return
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
    raise ValueError(f'config.{path}={v!r} must be an integer >= {low}')


def check_float(c, path: str, low: float, high: float = math.inf, *,
                 open_low: bool = False, optional: bool = False) -> None:
  v = config_field(c, path)
  if optional and v is None:
    return
  ok = (not isinstance(v, bool) and isinstance(v, numbers.Real) and
        math.isfinite(v) and (v > low if open_low else v >= low) and v < high)
  if not ok:
    rng = f'{"(" if open_low else "["}{low}, {high})'
    raise ValueError(f'config.{path}={v!r} must be a finite number in {rng}')

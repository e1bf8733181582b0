"""A TFLite bundle's manifest.json checked as a whole before any file loads.

What the runner (and a phone app) reads from the manifest drives every step:
a reversed schedule, `[1.0]`, `[]`, a NaN or a step index of -5 still gave
images (a NaN one all white) and no error; a string gave `could not convert
string to float` without the file's name. `check_manifest` refuses each, and
every error names the manifest file and the key (`schedule.timesteps[2]`).

No JAX, no TensorFlow: the runner's dependencies only.
"""
from __future__ import annotations

import math
import numbers
from typing import Any


class ManifestError(ValueError):
  """manifest.json is missing, malformed or disagrees with the files."""


_MISSING = object()


def get_entry(d: dict, path: str, where: str, default: Any = _MISSING):
  """d['a']['b'] for path 'a.b', or a ManifestError naming the missing key."""
  cur = d
  for part in path.split('.'):
    if not isinstance(cur, dict) or part not in cur:
      if default is not _MISSING:
        return default
      raise ManifestError(f'{where}: missing entry {path!r}')
    cur = cur[part]
  return cur


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, numbers.Real) and not isinstance(v, bool) and
          math.isfinite(v))


def _int(m: dict, key: str, where: str, low: int = 1,
         high: int | None = None) -> int:
  v = get_entry(m, key, where)
  if not _is_int(v) or v < low or (high is not None and v > high):
    rng = f'>= {low}' + ('' if high is None else f' and <= {high}')
    raise ManifestError(f'{where}: {key}={v!r} must be an integer {rng}')
  return int(v)


def _int_list(m: dict, key: str, where: str, length: int | None = None
              ) -> list[int]:
  v = get_entry(m, key, where)
  if not isinstance(v, list) or (length is not None and len(v) != length):
    want = 'a list' + ('' if length is None else f' of {length} integers')
    raise ManifestError(f'{where}: {key}={v!r} must be {want}')
  for i, x in enumerate(v):
    if not _is_int(x) or x < 1:
      raise ManifestError(f'{where}: {key}[{i}]={x!r} must be an integer '
                          '>= 1')
  return [int(x) for x in v]


def _schedule(m: dict, where: str, static: bool) -> None:
  """Timesteps: finite numbers in [0, 1], strictly decreasing (Euler from
  noise to image), num_steps + 1 of them; step indices within the static
  modulation table."""
  ts = get_entry(m, 'schedule.timesteps', where)
  key = 'schedule.timesteps'
  if not isinstance(ts, list):
    raise ManifestError(f'{where}: {key}={ts!r} must be a list of numbers')
  for i, t in enumerate(ts):
    if not _is_number(t) or not 0.0 <= t <= 1.0:
      raise ManifestError(f'{where}: {key}[{i}]={t!r} must be a finite '
                          'number in [0, 1]')
  if len(ts) < 2:
    raise ManifestError(f'{where}: {key}={ts!r} has {len(ts)} entries; it '
                        'needs num_steps + 1 >= 2 (from 1 to 0)')
  for i in range(len(ts) - 1):
    if not ts[i + 1] < ts[i]:
      raise ManifestError(
          f'{where}: {key} must decrease (noise at 1 to image at 0), but '
          f'[{i}]={ts[i]!r} is followed by [{i + 1}]={ts[i + 1]!r}')
  n = get_entry(m, 'schedule.num_steps', where, None)
  if n is not None:
    n = _int(m, 'schedule.num_steps', where)
    if len(ts) != n + 1:
      raise ManifestError(f'{where}: {key} has {len(ts)} entries, but '
                          f'schedule.num_steps={n} needs {n + 1}')
  if not static:
    return
  key = 'schedule.step_indices'
  idx = get_entry(m, key, where)
  if not isinstance(idx, list) or len(idx) != len(ts) - 1:
    raise ManifestError(f'{where}: {key}={idx!r} must be a list of '
                        f'{len(ts) - 1} integers (one per step)')
  table = get_entry(m, 'schedule.static_timesteps', where, None)
  size = len(table) if isinstance(table, list) else None
  for i, j in enumerate(idx):
    if not _is_int(j) or j < 0 or (size is not None and j >= size):
      rng = f'[0, {size - 1}]' if size else '>= 0'
      raise ManifestError(f'{where}: {key}[{i}]={j!r} must be an integer in '
                          f'{rng} (a row of the static modulation table)')


def check_manifest(m: dict, where: str) -> None:
  """Raises ManifestError naming `where` (the manifest file) and the key
  when a value the runner reads has the wrong type or range, or the
  schedule is not a valid Euler schedule."""
  _int(m, 'height', where)
  _int(m, 'width', where)
  modulation = get_entry(m, 'modulation', where)
  if modulation not in ('adaln', 'static'):
    raise ManifestError(f"{where}: modulation={modulation!r}; expected "
                        "'adaln' or 'static'")
  static = modulation == 'static'
  guidance_embed = get_entry(m, 'guidance_embed', where)
  if not isinstance(guidance_embed, bool):
    raise ManifestError(f'{where}: guidance_embed={guidance_embed!r} must be '
                        'true or false')
  g = m.get('default_guidance')
  if (g is not None or guidance_embed) and not _is_number(g):
    raise ManifestError(f'{where}: default_guidance={g!r} must be a finite '
                        'number' + ('' if guidance_embed else ' or null'))
  _int(m, 'max_sequence_length', where, 1, 512)
  if not static:
    _int(m, 'clip_length', where)
  _schedule(m, where, static)
  channels = _int(m, 'latent.channels', where)
  hw = _int_list(m, 'latent.latent_hw', where, 2)
  packed = _int_list(m, 'latent.packed_shape', where, 3)
  want = [packed[0], (hw[0] // 2) * (hw[1] // 2), 4 * channels]
  if packed != want or hw[0] % 2 or hw[1] % 2:
    raise ManifestError(f'{where}: latent.packed_shape={packed} does not '
                        f'pack latent.latent_hw={hw} x latent.channels='
                        f'{channels} into 2x2 patches (expected {want})')

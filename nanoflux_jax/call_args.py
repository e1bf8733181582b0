"""A pipeline call's arguments: validation, the folder's defaults, tokenizing.

Shared by `FluxPipeline` (JAX) and `TFLitePipeline` (LiteRT, no JAX), so both
refuse the same bad input with the same message and warn the same way about
truncated prompts. Base layer: numpy and absl only.

Call defaults. A pipeline folder may carry `call_defaults.json` beside its
components, the settings it was trained or distilled with:

  {"height": 64, "width": 64, "num_steps": 8, "max_sequence_length": 24,
   "guidance": null}

`pipe(prompts)` uses them; an explicit argument still overrides; a folder
without the file (e.g. a diffusers FLUX folder) keeps `CallDefaults()`,
diffusers' FLUX.1 defaults. It plays the part of transformers'
`generation_config.json`: diffusers ignores the extra file, so a
diffusers-layout folder may carry it too. `guidance` null means the model's
default (DEFAULT_GUIDANCE, 3.5, for guidance-distilled models, unused
otherwise).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Optional, Sequence

from absl import logging
import numpy as np

from nanoflux_jax import jsonfile
from nanoflux_jax.errors import CheckpointError

CALL_DEFAULTS_FILE = 'call_defaults.json'
# The guidance scale a guidance-distilled (dev-like) model gets when none is
# given: diffusers' FluxPipeline guidance_scale. The library's one copy.
DEFAULT_GUIDANCE = 3.5


# ---------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------
def check_int(where: str, name: str, value, low: int = 1,
              high: int | None = None, multiple: int = 1) -> int:
  """`value` as an int, or a ValueError naming the argument and the range."""
  ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)
        and value >= low and (high is None or value <= high) and
        value % multiple == 0)
  if not ok:
    want = f'an integer >= {low}' + (f' and <= {high}' if high is not None
                                     else '')
    if multiple > 1:
      want = f'a positive integer multiple of {multiple}'
    raise ValueError(f'{where}: {name}={value!r} must be {want}')
  return int(value)


def check_prompts(where: str, prompts) -> list[str]:
  """A prompt or a non-empty list of prompt strings -> list[str]."""
  if isinstance(prompts, str):
    return [prompts]
  if prompts is None or not isinstance(prompts, (list, tuple)):
    raise ValueError(f'{where}: prompts={prompts!r}; expected a string or a '
                     'list of strings')
  if not prompts:
    raise ValueError(f'{where}: the prompt list is empty')
  bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
  if bad:
    raise ValueError(f'{where}: prompts[{bad[0]}]={prompts[bad[0]]!r} is not '
                     'a string')
  return list(prompts)


def check_number(where: str, name: str, value) -> float:
  """A finite real number (not a bool), or a ValueError naming `name`."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or
      not math.isfinite(value)):
    raise ValueError(f'{where}: {name}={value!r} must be a finite number')
  return float(value)


def check_finite(where: str, name: str, x) -> None:
  """Refuses an array holding NaN or inf: a NaN in the initial noise gives
  an all-black image (or garbage from LiteRT) and no error otherwise.

  Args:
    x: a numpy or jax array (latents are small next to the models: one
      host copy costs nothing).
  """
  arr = np.asarray(x)
  finite = arr.dtype.kind not in 'fc' or bool(np.isfinite(arr).all())
  if not finite:
    bad = np.argwhere(~np.isfinite(arr))
    raise ValueError(f'{where}: {name} holds {len(bad)} non-finite value(s) '
                     f'(first: {arr[tuple(bad[0])]} at index '
                     f'{tuple(int(i) for i in bad[0])})')


# ---------------------------------------------------------------------------
# Tokenizing, with the truncation warning of diffusers.
# ---------------------------------------------------------------------------
def token_ids(tokenizer, prompts: Sequence[str], length: int,
              name: str) -> np.ndarray:
  """int32 [B, length] ids, padded to `length`; a longer prompt is truncated
  with a warning naming the encoder (`name`: 'T5' or 'CLIP'), as diffusers
  does."""
  prompts = list(prompts)
  full = tokenizer(prompts, truncation=False)['input_ids']
  for p, f in zip(prompts, full):
    if len(f) > length:
      logging.warning('%s: prompt truncated to %d tokens (it has %d): %r',
                      name, length, len(f), p)
  return np.asarray(tokenizer(prompts, padding='max_length', max_length=length,
                              truncation=True)['input_ids'], np.int32)


# ---------------------------------------------------------------------------
# A folder's call defaults.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CallDefaults:
  """What `pipe(prompts)` uses for the arguments it is not given.

  The defaults are diffusers' for FLUX.1-schnell: 512 x 512, 4 steps, 256 T5
  tokens; guidance None: DEFAULT_GUIDANCE for guidance-distilled models.
  """
  height: int = 512
  width: int = 512
  num_steps: int = 4
  max_sequence_length: int = 256
  guidance: Optional[float] = None

  def __post_init__(self):
    where = 'CallDefaults'
    for name in ('height', 'width', 'num_steps'):
      check_int(where, name, getattr(self, name))
    check_int(where, 'max_sequence_length', self.max_sequence_length, 1, 512)
    if self.guidance is not None:
      object.__setattr__(self, 'guidance',
                         check_number(where, 'guidance', self.guidance))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def replace(self, **kw) -> 'CallDefaults':
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: dict, where: str = 'CallDefaults') -> 'CallDefaults':
    """Raises CheckpointError naming `where` and the key on an unknown key or
    a bad value."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise CheckpointError(f'{where}: unknown key(s) {unknown}; known: '
                            f'{sorted(fields)}')
    try:
      return cls(**d)
    except ValueError as e:
      raise CheckpointError(f'{where}: {e}') from e


def read_call_defaults(folder: str) -> CallDefaults:
  """folder/call_defaults.json, or `CallDefaults()` when the file is absent.

  Raises:
    CheckpointError: the file is corrupt, has an unknown key or a bad value
      (names the file and the key).
  """
  path = os.path.join(os.fspath(folder), CALL_DEFAULTS_FILE)
  if not os.path.exists(path):
    return CallDefaults()
  return CallDefaults.from_dict(
      jsonfile.read_object(path, CheckpointError, 'call defaults'), path)


def write_call_defaults(folder: str, defaults: CallDefaults) -> None:
  """Writes folder/call_defaults.json (callers write into a temporary folder
  that is renamed into place, so this need not be atomic itself)."""
  with open(os.path.join(os.fspath(folder), CALL_DEFAULTS_FILE), 'w') as f:
    json.dump(defaults.to_dict(), f, indent=2)
    f.write('\n')

"""Strict, streaming assembly of a flax param tree from a TensorSource.

A converter describes each of our parameters as an `Entry`: the source keys it
is built from and a numpy function that builds it (transpose, reshape, split,
concatenate). `load_strict` then
  1. checks, before reading any tensor, that every key the plan needs exists
     and that the plan consumes every key the checkpoint has, raising one
     error listing all missing and unexpected keys;
     and that every source tensor is floating point (an integer or bool
     tensor is never cast to a float parameter silently);
  2. builds parameters one at a time, casting and (optionally) placing each
     onto its sharding immediately, so host memory holds the converted params
     plus one source tensor; a parameter with NaN or infinite values is
     named in a warning (nonfinite='warn') or an error (nonfinite='error');
  3. collects every shape mismatch and raises them together.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
import tqdm

from nanoflux_jax import jsonfile
from nanoflux_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Entry:
  """How to build one of our params: fn(*[source[k] for k in sources]).

  `any_dtype` lists sources exempt from the floating-point check (e.g. an
  integer buffer that is consumed but not used).
  """
  sources: tuple[str, ...]
  fn: Callable[..., np.ndarray]
  any_dtype: tuple[str, ...] = ()


NONFINITE_OPTIONS = ('warn', 'error', 'ignore')
_FLOATS = {np.dtype(t) for t in (
    np.float64, np.float32, np.float16, ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}


def _check_dtypes(source, plan: dict[str, Entry], paths, origin: str) -> None:
  """Raises one CheckpointError naming every non-float source tensor."""
  if not hasattr(source, 'dtype'):
    return
  bad = sorted({f'{k} ({source.dtype(k)})' for path in paths
                for k in plan[path].sources
                if k not in plan[path].any_dtype and
                np.dtype(source.dtype(k)) not in _FLOATS})
  if bad:
    raise CheckpointError(
        f'{origin}: {len(bad)} tensors are not floating point, but the model '
        f'reads them as float parameters: {bad[:20]}')


def check_nonfinite_option(nonfinite: str) -> None:
  if nonfinite not in NONFINITE_OPTIONS:
    raise ValueError(f'nonfinite={nonfinite!r}; expected one of '
                     f'{NONFINITE_OPTIONS}')


def linear(key: str) -> Entry:
  """torch Linear weight [out, in] -> flax kernel [in, out]."""
  return Entry((key,), lambda w: w.T)


def same(key: str) -> Entry:
  """A tensor taken as it is (biases, norm scales, embeddings)."""
  return Entry((key,), lambda w: w)


def conv(key: str) -> Entry:
  """torch Conv2d weight [out, in, kh, kw] -> flax kernel [kh, kw, in, out]."""
  return Entry((key,), lambda w: w.transpose(2, 3, 1, 0))


def _leaf_dtype(x, dtype):
  return np.dtype(dtype) if dtype is not None else np.dtype(x.dtype)


def load_strict(source: Mapping[str, np.ndarray], plan: dict[str, Entry],
                target: Any, *, dtype=None, shardings: Any = None,
                origin: str = '', progress: bool = False,
                nonfinite: str = 'warn') -> dict:
  """Builds the param tree `target` (a pytree of shapes) from `source`.

  Args:
    source: key -> array mapping (a TensorSource reads lazily).
    plan: '/'-joined param path -> Entry; must cover every leaf of `target`.
    target: nested dict of jax.ShapeDtypeStruct (e.g. from jax.eval_shape).
    dtype: cast every param to this dtype (None: the target's dtype).
    shardings: optional nested dict of jax.sharding.Sharding like `target`;
      each param is put onto its sharding as soon as it is built.
    origin: file or folder named in errors.
    progress: show a tqdm bar.
    nonfinite: a param holding NaN / inf: 'warn' (log its name and keys),
      'error' (raise CheckpointError naming them all) or 'ignore'.
  Returns:
    Nested dict of jax arrays with `target`'s structure.
  """
  check_nonfinite_option(nonfinite)
  origin = origin or getattr(source, 'origin', '<checkpoint>')
  flat_target = traverse_util.flatten_dict(target, sep='/')
  flat_shard = (traverse_util.flatten_dict(shardings, sep='/')
                if shardings is not None else {})
  no_plan = sorted(set(flat_target) - set(plan))
  if no_plan:  # A bug in a converter, not in the user's file.
    raise AssertionError(f'converter has no entry for params {no_plan}')
  needed = {k for path in flat_target for k in plan[path].sources}
  available = set(source)
  missing, unexpected = sorted(needed - available), sorted(available - needed)
  if missing or unexpected:
    raise CheckpointError(
        f'{origin}: checkpoint keys do not match the model.\n'
        f'  missing ({len(missing)}): {missing}\n'
        f'  unexpected ({len(unexpected)}): {unexpected}')
  paths = list(flat_target)
  _check_dtypes(source, plan, paths, origin)
  if progress:
    paths = tqdm.tqdm(paths, desc=f'converting {origin}', unit='tensor')
  out, errors, nonfinite_params = {}, [], []
  for path in paths:
    entry, want = plan[path], flat_target[path]
    try:
      value = np.asarray(entry.fn(*[source[k] for k in entry.sources]))
    except ValueError as e:  # e.g. a reshape that does not fit.
      errors.append(f'{path} <- {list(entry.sources)}: {e}')
      continue
    if tuple(value.shape) != tuple(want.shape):
      shapes = [tuple(source.shape(k)) if hasattr(source, 'shape')
                else None for k in entry.sources]
      errors.append(f'{path} <- {list(entry.sources)} {shapes}: built shape '
                    f'{value.shape}, model expects {tuple(want.shape)}')
      continue
    value = value.astype(_leaf_dtype(want, dtype))
    if nonfinite != 'ignore' and not np.isfinite(value).all():
      where = f'{path} <- {list(entry.sources)}'
      nonfinite_params.append(where)
      if nonfinite == 'warn':
        logging.warning('%s: %s holds NaN or infinite values', origin, where)
    out[path] = jax.device_put(value, flat_shard.get(path))
    del value
  if errors:
    raise CheckpointError(f'{origin}: {len(errors)} tensors have the wrong '
                          'shape:\n  ' + '\n  '.join(errors))
  if nonfinite_params and nonfinite == 'error':
    raise CheckpointError(f'{origin}: {len(nonfinite_params)} params hold '
                          'NaN or infinite values:\n  ' +
                          '\n  '.join(nonfinite_params))
  return traverse_util.unflatten_dict(out, sep='/')


def read_config_json(path: str) -> tuple[str, dict[str, Any]]:
  """Reads a model folder's config.json (or that file) -> (file name, dict).

  Raises CheckpointError naming the file when it is missing or corrupt.
  """
  fname = os.fspath(path)
  if os.path.isdir(fname):
    fname = os.path.join(fname, 'config.json')
  if not os.path.isfile(fname):
    raise CheckpointError(f'{fname}: no such file (a model folder needs '
                          'config.json beside its *.safetensors)')
  return fname, jsonfile.read_object(fname, CheckpointError, 'config')

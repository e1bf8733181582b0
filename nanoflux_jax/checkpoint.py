"""Params checkpoints: an orbax tree plus the config as JSON, written atomically.

Layout of a checkpoint folder:
  nanoflux_config.json   {"class": "FluxConfig", "config": {...}}
  params/                orbax StandardCheckpointer tree

`save` writes into a hidden temporary sibling folder and renames it into
place, so a crash mid-save never replaces a good checkpoint with a half-written
one; it replaces only a checkpoint (or an empty folder), never other files,
and removes temporary folders that interrupted saves left behind.
(Training checkpoints with resume live in `distill.trainer`, which uses an
orbax CheckpointManager.)
"""
from __future__ import annotations

import json
import os
import shutil

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from nanoflux_jax import atomic
from nanoflux_jax import configs
from nanoflux_jax import jsonfile
from nanoflux_jax.atomic import replace_dir  # pylint: disable=unused-import
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.errors import OverwriteError  # pylint: disable=unused-import
from nanoflux_jax.models import scan_blocks
from nanoflux_jax.models import flux

CONFIG_FILE = 'nanoflux_config.json'
EMPTY_KEY = 'empty_params'  # In CONFIG_FILE: saved from an empty params tree.
_CLASSES = {c.__name__: c for c in (configs.FluxConfig, configs.T5Config,
                                    configs.ClipConfig, configs.VAEConfig)}


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save(path: str, config, params) -> None:
  """Saves (config, params) to folder `path`, replacing it atomically.

  `config` is one of the config dataclasses, or a JSON-able dict.
  Raises:
    OverwriteError: `path` exists and is neither a checkpoint nor an empty
      folder (nothing is written or deleted).
  """
  path = os.path.abspath(os.fspath(path))
  bad = [jax.tree_util.keystr(k) for k, v in
         jax.tree_util.tree_leaves_with_path(params)
         if not isinstance(v, (jax.Array, np.ndarray, np.generic))]
  if bad:  # Fail before touching the disk.
    raise TypeError(f'checkpoint.save({path}): params leaves {bad[:5]} are '
                    'not arrays')
  atomic.check_replaceable(path, is_checkpoint, 'nanoflux checkpoint')
  # Multi-process (pod hosts): every process writes its shards into the
  # same temporary folder (process 0 names it); process 0 alone writes the
  # config and renames the folder into place.
  primary = jax.process_index() == 0
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  if primary:
    atomic.remove_stale(path)
  tmp = _shared_tmp_sibling(path)
  empty = not jax.tree.leaves(params)
  ckptr = ocp.StandardCheckpointer()
  try:
    if not empty:
      ckptr.save(os.path.join(tmp, 'params'), params)
      ckptr.wait_until_finished()
    elif primary:  # A parameter-free component (e.g. a pixel-shuffle codec).
      os.makedirs(tmp)
    if primary:
      with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
        json.dump(dict(_config_json(config), **({EMPTY_KEY: True} if empty
                                                 else {})),
                  f, indent=2, sort_keys=True)
      atomic.check_replaceable(path, is_checkpoint, 'nanoflux checkpoint')
      atomic.replace_dir(tmp, path)
  finally:
    try:  # Let a failed async write stop before removing its folder.
      ckptr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
  _sync(f'nanoflux_checkpoint_save:{path}')


def _shared_tmp_sibling(path: str) -> str:
  """atomic.tmp_sibling(path), the same one in every process."""
  tmp = atomic.tmp_sibling(path)
  if jax.process_count() == 1:
    return tmp
  raw = np.frombuffer(tmp.encode().ljust(4096, b'\0')[:4096], np.uint8)
  raw = np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)
  return raw.tobytes().rstrip(b'\0').decode()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _config_json(config) -> dict:
  if isinstance(config, dict):  # e.g. a small evaluation model's settings.
    return {'class': 'dict', 'config': config}
  return {'class': type(config).__name__, 'config': config.to_dict()}


def _read_config_file(path: str) -> dict:
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise CheckpointError(f'{path}: not a nanoflux checkpoint (no {CONFIG_FILE})')
  return jsonfile.read_object(file, CheckpointError, 'config')


def load_config(path: str):
  """Reads the config stored in checkpoint folder `path`.

  Raises:
    CheckpointError: naming the file when it is missing, not JSON, or holds
      an unknown class or field, or a value out of range.
  """
  file = os.path.join(path, CONFIG_FILE)
  d = _read_config_file(path)
  try:
    if d['class'] == 'dict':
      return d['config']
    return _CLASSES[d['class']].from_dict(d['config'])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f'{file}: corrupt config: {e!r}') from e


def _param_free(config) -> bool:
  """Configs whose model has no parameters (saved without params/)."""
  return isinstance(config, configs.VAEConfig) and config.kind == 'pixel'


def load(path: str, *, dtype=None, shardings=None, **config_overrides):
  """Loads (config, params) saved by `save`.

  Args:
    dtype: cast params to this dtype (also recorded as the config's
      param_dtype).
    shardings: pytree of Shardings matching the params, or a callable
      (config, param_shapes) -> such a pytree; orbax reads each array straight
      onto its sharding.
    **config_overrides: fields to replace in the stored config.
  """
  path = os.path.abspath(os.fspath(path))
  config = stored = load_config(path)
  if dtype is not None and not isinstance(config, dict):
    config = config.replace(param_dtype=np.dtype(dtype).name)
  if config_overrides:
    config = config.replace(**config_overrides)
  if (isinstance(config, configs.FluxConfig) and
      config.scan_blocks != stored.scan_blocks):
    return _load_relayout(path, stored, config, dtype, shardings)
  if not os.path.isdir(os.path.join(path, 'params')):
    if _read_config_file(path).get(EMPTY_KEY) or _param_free(config):
      return config, {}  # Saved from an empty params tree.
    raise CheckpointError(f'{os.path.join(path, "params")}: missing (the '
                          f'checkpoint has a {type(config).__name__} but no '
                          'params)')
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(os.path.join(path, 'params'))
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  shapes = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype), tree)
  if callable(shardings):
    shardings = shardings(config, shapes)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  target = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
  try:
    params = ckptr.restore(os.path.join(path, 'params'), target)
  except Exception as e:  # orbax raises many types; name the folder.
    raise CheckpointError(f'{path}: cannot restore params: {e}') from e
  return config, params


def _load_relayout(path: str, stored, config, dtype, shardings):
  """A Flux checkpoint saved with the other `scan_blocks` layout: restored
  as saved, then its runs stacked (or split) into `config`'s layout."""
  if shardings is not None and not callable(shardings):
    raise ValueError(
        f'{path}: saved with scan_blocks={stored.scan_blocks}; loading it '
        f'with scan_blocks={config.scan_blocks} needs shardings as a '
        'callable (config, param_shapes) -> shardings, e.g. '
        'models.sharding.loading_shardings(mesh)')
  _, params = load(path, dtype=dtype, shardings=shardings)
  params = (scan_blocks.scan_params(config, params) if config.scan_blocks else
            scan_blocks.unscan_params(stored, params))
  if shardings is not None:
    params = jax.device_put(params, shardings(config,
                                              flux.param_shapes(config)))
  return config, params

"""FLUX transformer import from BFL and diffusers checkpoints (and export to BFL).

Formats (auto-detected):
  * BFL: one `.safetensors` file keyed like `double_blocks.0.img_attn.qkv.weight`;
  * diffusers: a `transformer/` folder (possibly sharded, with an index json)
    keyed like `transformer_blocks.0.attn.to_q.weight`, or a whole pipeline
    folder containing one;
  * nanoflux: a folder written by `nanoflux_jax.checkpoint.save`.
The config is inferred from tensor shapes (`flux_config`), so pruned students
(per-block widths) load like the teacher; the key maps live in `flux_keys`.
Conversion streams one tensor at a time.
"""
from __future__ import annotations

import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from nanoflux_jax import checkpoint
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert import flux_config
from nanoflux_jax.convert import loading
from nanoflux_jax.convert.flux_config import CONFIG_METADATA_KEY
from nanoflux_jax.convert.flux_keys import bfl_plan
from nanoflux_jax.convert.flux_keys import diffusers_plan
from nanoflux_jax.convert.flux_keys import to_bfl_state_dict
from nanoflux_jax.convert.safetensors_io import open_tensors
from nanoflux_jax.convert.safetensors_io import save_file
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.models import scan_blocks
from nanoflux_jax.models import flux as flux_model


def _resolve(path: str) -> tuple[str, str]:
  """-> (format, path of the transformer's file or folder)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such file or folder')
  if os.path.isdir(path):
    if checkpoint.is_checkpoint(path):
      return 'nanoflux', path
    if os.path.exists(os.path.join(path, 'model_index.json')):
      sub = os.path.join(path, 'transformer')
      if not os.path.isdir(sub):
        raise CheckpointError(f'{path}: pipeline folder has no transformer/')
      return _resolve(sub)
  return 'sniff', path


def load_flux_transformer(path: str, dtype=None, *, shardings=None,
                          axes_dim=None, progress: bool = False,
                          nonfinite: str = 'warn', **config_overrides):
  """Loads a FLUX transformer checkpoint into (FluxConfig, params).

  Args:
    path: a BFL `.safetensors` file, a diffusers `transformer/` folder
      (sharded or not), a diffusers pipeline folder, or a nanoflux checkpoint.
    dtype: cast params to this dtype (also becomes the config's param_dtype);
      None keeps the stored dtype.
    shardings: a pytree of jax Shardings matching the params, or a callable
      (config, param_shapes) -> such a pytree; each tensor is placed onto its
      sharding as soon as it is converted.
    axes_dim: RoPE axes split, needed for BFL files of non-FLUX head dims.
    progress: show a progress bar.
    nonfinite: a param with NaN / inf values: 'warn' (names it in the log),
      'error' (CheckpointError) or 'ignore'.
    **config_overrides: e.g. attention_impl='xla', remat=True, dtype='bfloat16'.
  Returns:
    (config, params) with params a nested dict of jax arrays.
  Raises:
    CheckpointError: the path, keys, dtypes or shapes are wrong, or the
      tensors disagree with a stored config (BFL metadata, config.json);
      names the file/keys.
  """
  loading.check_nonfinite_option(nonfinite)
  fmt, path = _resolve(path)
  if fmt == 'nanoflux':
    return checkpoint.load(path, dtype=dtype, shardings=shardings,
                           **config_overrides)
  source = open_tensors(path)
  try:
    fmt, cfg = _source_config(source, path, axes_dim)
    if dtype is not None:
      cfg = cfg.replace(param_dtype=np.dtype(dtype).name)
    if config_overrides:
      cfg = cfg.replace(**config_overrides)
    # Files hold one tensor per block: load unrolled, then stack the runs
    # a scan_blocks config scans (each stacked array on its sharding).
    flat = cfg.replace(scan_blocks=False)
    target = flux_model.param_shapes(flat)
    if callable(shardings):
      shardings = shardings(cfg, flux_model.param_shapes(cfg))
    plan = bfl_plan(flat) if fmt == 'bfl' else diffusers_plan(flat)
    params = loading.load_strict(
        source, plan, target, dtype=dtype, origin=path, progress=progress,
        nonfinite=nonfinite, shardings=None if shardings is None else
        scan_blocks.unscan_params(cfg, shardings, take=_layer_sharding))
  finally:
    source.close()
  if cfg.scan_blocks:
    params = scan_blocks.scan_params(cfg, params)
    if shardings is not None:
      params = jax.device_put(params, shardings)
  return cfg, params


def _source_config(source, path: str, axes_dim) -> tuple[str, FluxConfig]:
  """-> ('bfl' | 'diffusers', the config) of an open tensor source."""
  keys = set(source)
  if 'img_in.weight' in keys:
    fmt = 'bfl'
  elif 'x_embedder.weight' in keys:
    fmt = 'diffusers'
  else:
    raise CheckpointError(
        f'{path}: not a FLUX transformer checkpoint (no img_in.weight or '
        f'x_embedder.weight; first keys: {sorted(keys)[:5]})')
  return fmt, flux_config.source_config(source, fmt, path, axes_dim)


def transformer_config(path: str, axes_dim=None) -> FluxConfig:
  """The FluxConfig `load_flux_transformer(path)` would return, read from
  the stored config and the tensors' headers only (no tensor is read): a
  pipeline checks its parts against each other before loading any."""
  fmt, path = _resolve(path)
  if fmt == 'nanoflux':
    return checkpoint.load_config(path)
  source = open_tensors(path)
  try:
    return _source_config(source, path, axes_dim)[1]
  finally:
    source.close()


def _layer_sharding(s, i):
  """The sharding of one layer of a stacked param: its spec minus the
  leading 'layers' entry (other shardings are whole-array already)."""
  del i
  if not isinstance(s, NamedSharding):
    return s
  return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))


def save_bfl(path: str, cfg: FluxConfig, params) -> None:
  """Writes a BFL-format .safetensors file (config kept in its metadata)."""
  save_file(to_bfl_state_dict(cfg, params), path,
            metadata={CONFIG_METADATA_KEY: cfg.to_json()})


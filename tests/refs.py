"""Access to the PyTorch reference implementations used by parity tests.

Locally a missing reference skips the test; in CI (`NANOFLUX_REQUIRE_REFERENCE=1`,
set by .ci/run) it fails, so parity tests can never silently not run.
"""
import importlib
import os

import pytest


def require(module: str):
  """Imports `module` (torch, diffusers, transformers, ...) or skips/fails."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    if os.environ.get('NANOFLUX_REQUIRE_REFERENCE') == '1':
      pytest.fail(f'reference {module!r} is required but missing: {e}')
    pytest.skip(f'reference {module!r} not installed')


def to_numpy(t):
  """A torch tensor -> float64 numpy array."""
  return t.detach().double().cpu().numpy()


def max_rel_err(ours, ref):
  """max |ours - ref| / max |ref| (a scale-aware max error)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / (np.max(np.abs(ref)) + 1e-30))


def resave_hf_folder(src, dst, edit):
  """Copies an HF model folder to dst with its tensors passed through
  edit(dict) (to plant missing, extra or mis-shaped tensors)."""
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.convert.safetensors_io import open_tensors, save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(dst)
  shutil.copy(os.path.join(src, 'config.json'), dst)
  source = open_tensors(src)
  tensors = {k: np.array(source[k]) for k in source}
  source.close()
  edit(tensors)
  save_file(tensors, os.path.join(dst, 'model.safetensors'))
  return dst

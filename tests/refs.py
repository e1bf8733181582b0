"""Access to the PyTorch reference implementations used by parity tests.

Locally a missing reference skips the test; in CI (`NANOFLUX_REQUIRE_REFERENCE=1`,
set by .ci/run) it fails, so parity tests can never silently not run.
"""
import importlib
import os
import zlib

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


def name_seed(name: str, seed: int = 0) -> int:
  """A seed that depends on a tensor's name (crc32) and a base seed."""
  return (zlib.crc32(name.encode()) + 1_000_003 * seed) % 2**63


def fill_unique(model, seed=0):
  """Refills every parameter of a torch module with seeded random values
  keyed by its name, so no two tensors hold the same values.

  Initialisers give same-shaped tensors identical contents (norm scales all
  ones, biases all zeros); a converter that swaps two of them (query/key
  norm, img/txt stream) would then pass a parity test. Here a constant
  tensor c becomes c + N(0, 0.3) (ones) or N(0, 0.05) (zeros), and a random
  tensor becomes N(0, 1.5 * its init std), each from its own generator.
  """
  torch = require('torch')
  with torch.no_grad():
    for name, p in model.named_parameters():
      g = torch.Generator().manual_seed(name_seed(name, seed))
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      flat = p.detach().reshape(-1).float()
      if flat.numel() < 2 or bool((flat == flat[0]).all()):
        c = float(flat[0]) if flat.numel() else 0.0
        new = c + (0.3 if c else 0.05) * noise
      else:
        new = noise * 1.5 * float(flat.std())
      p.copy_(new.to(p.dtype))
  return model


def unique_array(name: str, shape, dtype='float32', seed=0, period=8191):
  """numpy values for a tensor `name`: a seeded random vector of length
  `period` (prime, so transposes and reshapes show) keyed by the name,
  tiled to `shape`. Cheap at the 0.5B elements of a full-width block."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(name_seed(name, seed))
  base = rng.standard_normal(min(period, max(int(np.prod(shape)), 1)))
  return np.resize(base.astype(dtype), shape)

"""Smoke tests of the absl binaries on a tiny pipeline folder."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', script), *args],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_convert_then_sample(tmp_path):
  make_tiny_flux_pipeline(tmp_path / 'pipe')
  out = _run('convert_flux.py', f'--src={tmp_path / "pipe"}',
             f'--out={tmp_path / "converted"}', '--dtype=float32')
  assert 'peak RSS' in out
  import nanoflux_jax as nf
  cfg, _ = nf.convert.load_flux_transformer(str(tmp_path / 'converted'))
  assert cfg.depth == 2 and cfg.in_channels == 64

  grid = tmp_path / 'grid.png'
  out = _run('sample.py', f'--model={tmp_path / "pipe"}', '--prompt=a red cat',
             '--prompt=a blue dog', '--height=16', '--width=32', '--steps=2',
             f'--out={grid}')
  for stage in ('encode', 'denoise', 'decode', 'first call'):
    assert stage in out, out
  img = np.asarray(Image.open(grid))
  assert img.shape == (2 + 16 + 2, 2 + 2 * (32 + 2), 3)  # 1 row x 2 cols.

"""Image grids for sample outputs and reports."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, cols: int | None = None,
              pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'make_grid: expected [N, H, W, 3], got {images.shape}')
  n, h, w, _ = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255,
                 np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + c * (w + pad)
    grid[y:y + h, x:x + w] = img
  return grid


def check_writable(path: str) -> None:
  """Raises ValueError naming `path` when a file cannot be written there.

  Call it before expensive work whose result goes to `path`: the path must
  not be a folder, and its nearest existing ancestor must be a writable
  folder (missing folders below it are created on writing).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise ValueError(f'{path}: is a folder, expected a file path')
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f'{path}: cannot be written: {parent} is a file, not a '
                     'folder')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'{path}: cannot be written: folder {parent} is not '
                     'writable')


def save_grid(images: np.ndarray, path: str, cols: int | None = None) -> None:
  """Writes `make_grid(images)` as a PNG (atomically)."""
  check_writable(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp.png'
  Image.fromarray(make_grid(images, cols)).save(tmp)
  os.replace(tmp, path)

"""A toy-GenEval judge that reads a shapes-world image from its geometry.

Nothing is learned, so there is nothing to train, ship or reproduce: every
world (`data.shapes.WORLDS`) states where its objects sit and how large they
are, and `GeometryJudge` reads each position back from that alone:

  1. every pixel takes the nearest palette colour; the background is the
     most frequent one;
  2. at each position, the object's colour is the most frequent
     non-background colour of a small core disc around the position's
     centre (every shape, at either size, covers it); the position is
     empty when that colour covers less than half of the disc;
  3. its shape and size are the template (each shape at each size, drawn by
     the world's own renderer) whose mask best overlaps (IoU) the pixels of
     that colour in a window around the centre, the template moved onto the
     mask's centroid first, so a slightly misplaced object still reads.

It has the classifier's interface (`__call__(images) -> (predictions,
features)`, `.resolution`, `.world`) and its class indices
(`classifier.SHAPE_CLASSES`, `COLOUR_CLASSES`, the world's sizes), so
`metrics.geneval` and `toy.scores` take either. Its features (per position:
the colour fractions of the window and the best IoU of each shape; the
background colour) stand in for the classifier's in toy-FID.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from nanoflux_jax.shapes import world as shapes
_PALETTE = np.array(list(shapes.COLOURS.values()), np.float32)   # [K, 3]
_SUPERSAMPLE = 4
_CORE = 0.35      # core disc radius / the small size's half-extent.
_WINDOW = 1.3     # window half-side / the large size's half-extent.
_MAX_SHIFT = 4    # pixels a template may move onto the mask's centroid.
_MIN_CORE = 0.5   # of the core disc one colour must cover for an object.
_MAX_OFF_SEGMENT = 60.0  # RGB distance off the background-object blend.


def _coverage(shape: str, cx: float, cy: float, r: float, resolution: int
              ) -> np.ndarray:
  """float [R, R] in [0, 1]: the fraction of each pixel the renderer covers
  with this shape (drawn as `shapes.render` draws it, supersampled)."""
  size = resolution * _SUPERSAMPLE
  img = Image.new('L', (size, size), 0)
  shapes.draw_shape(ImageDraw.Draw(img), shape, cx * size, cy * size,
                    r * size, 255)
  return np.asarray(img, np.float32).reshape(
      resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean((1, 3)) / 255


def _centroid(m: np.ndarray) -> np.ndarray:
  """The (y, x) centre of mass of a non-negative map (zeros: (0, 0))."""
  total = m.sum()
  if total <= 0:
    return np.zeros(2)
  ys, xs = np.mgrid[0:m.shape[0], 0:m.shape[1]]
  return np.array([(ys * m).sum(), (xs * m).sum()]) / total


def _objectness(x: np.ndarray, obj: np.ndarray, bg: np.ndarray
                ) -> np.ndarray:
  """float [..] in [0, 1]: where each pixel x [.., 3] lies between the
  background colour (0) and the object's (1), as anti-aliased edges do;
  0 for pixels far off that segment (another object's colour)."""
  d = obj - bg
  a = np.clip(((x - bg) @ d) / max(float(d @ d), 1.0), 0.0, 1.0)
  off = np.linalg.norm(x - (bg + a[..., None] * d), axis=-1)
  return np.where(off < _MAX_OFF_SEGMENT, a, 0.0)


class GeometryJudge:
  """Reads objects back by the world's geometry (see the module docstring).

  Args:
    world: a `shapes.WORLDS` name.
    resolution: image side in pixels; None: the world's.
  """

  def __init__(self, world: str = 'shapes', resolution: int | None = None):
    self.spec = shapes.world_spec(world)
    self.world = self.spec.name
    self.resolution = r = int(resolution or self.spec.resolution)
    small = min(h for _, h in self.spec.sizes)
    large = max(h for _, h in self.spec.sizes)
    half = int(np.ceil(_WINDOW * large * r))
    pad, w = _MAX_SHIFT, 2 * half + 1
    # Per position: the window's top-left pixel, the core disc in window
    # coordinates, and padded templates [S, Z, w + 2 pad, w + 2 pad].
    self._windows, self._cores, self._templates, self._centroids = (
        [], [], [], [])
    yy, xx = np.mgrid[0:r, 0:r] + 0.5
    for _, (fx, fy) in self.spec.positions:
      cy, cx = int(round(fy * r)), int(round(fx * r))
      top, left = cy - half, cx - half
      self._windows.append((top, left))
      core = (yy - fy * r) ** 2 + (xx - fx * r) ** 2 <= (_CORE * small * r) ** 2
      self._cores.append(self._crop(core, top, left, w))
      temps, cents = [], []
      for shape in shapes.SHAPES:
        row_t, row_c = [], []
        for _, h in self.spec.sizes:
          t = self._crop(_coverage(shape, fx, fy, h, r), top, left, w)
          row_c.append(_centroid(t))
          row_t.append(np.pad(t, pad))
        temps.append(row_t)
        cents.append(row_c)
      self._templates.append(np.array(temps))
      self._centroids.append(np.array(cents))
    self._w = w

  @staticmethod
  def _crop(a: np.ndarray, top: int, left: int, w: int) -> np.ndarray:
    """a[top:top+w, left:left+w], zero outside the image."""
    out = np.zeros((w, w) + a.shape[2:], a.dtype)
    r = a.shape[0]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + w, r), min(left + w, r)
    out[y0 - top:y1 - top, x0 - left:x1 - left] = a[y0:y1, x0:x1]
    return out

  def _read(self, labels: np.ndarray, x: np.ndarray, background: int,
            p: int):
    """-> (shape class, colour, size, features [K + S]) at position p of
    one image: palette labels [R, R], pixels x float [R, R, 3]."""
    k, n_shapes = len(_PALETTE), len(shapes.SHAPES)
    win = self._crop(labels, *self._windows[p], self._w)
    counts = np.bincount(win.ravel(), minlength=k + 1)[:k].astype(np.float32)
    feats = np.zeros(k + n_shapes, np.float32)
    feats[:k] = counts / win.size
    core = win[self._cores[p]]
    core_counts = np.bincount(core, minlength=k + 1)[:k]
    core_counts[background] = 0
    colour = int(core_counts.argmax())
    if core_counts[colour] < _MIN_CORE * len(core):
      return 0, -1, -1, feats
    # Soft match: the object's coverage of each pixel against each
    # template's, both in [0, 1] (anti-aliased edges count partly).
    m = _objectness(self._crop(x, *self._windows[p], self._w),
                    _PALETTE[colour], _PALETTE[background])
    base = np.round(_centroid(m)[None, None] - self._centroids[p]
                    ).astype(int)                              # [S, Z, 2]
    pad, w = _MAX_SHIFT, self._w
    score = np.zeros(self._templates[p].shape[:2])
    for i in range(score.shape[0]):
      for j in range(score.shape[1]):
        best = 0.0
        for ddy in (-1, 0, 1):   # The rounded centroid is +-1 px off.
          for ddx in (-1, 0, 1):
            dy, dx = np.clip(base[i, j] + (ddy, ddx), -pad, pad)
            t = self._templates[p][i, j, pad - dy:pad - dy + w,
                                   pad - dx:pad - dx + w]
            best = max(best, np.minimum(t, m).sum() /
                       max(np.maximum(t, m).sum(), 1e-6))
        score[i, j] = best
    feats[k:] = score.max(1)
    i, j = np.unravel_index(score.argmax(), score.shape)
    return 1 + int(i), colour, int(j), feats

  def __call__(self, images: np.ndarray):
    """uint8 [B, R, R, 3] -> (predictions, features [B, P * (K + S) + K]).

    predictions: 'shape' [B, P] (0 = none, else 1 + shapes.SHAPES index),
    'colour' and 'size' [B, P] (-1 where empty), 'background' [B].
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.resolution,) * 2 + (3,):
      raise ValueError(f'GeometryJudge({self.world!r}): images '
                       f'{images.shape} are not [B, {self.resolution}, '
                       f'{self.resolution}, 3]')
    b, n_pos, k = len(images), len(self.spec.positions), len(_PALETTE)
    x = images.astype(np.float32)
    labels = ((x[..., None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    preds = {'shape': np.zeros((b, n_pos), np.int64),
             'colour': np.full((b, n_pos), -1, np.int64),
             'size': np.full((b, n_pos), -1, np.int64),
             'background': np.zeros(b, np.int64)}
    feats = []
    for n in range(b):
      bg = int(np.bincount(labels[n].ravel(), minlength=k).argmax())
      preds['background'][n] = bg
      f = []
      for p in range(n_pos):
        (preds['shape'][n, p], preds['colour'][n, p], preds['size'][n, p],
         fp) = self._read(labels[n], x[n], bg, p)
        f.append(fp)
      f.append(np.eye(k, dtype=np.float32)[bg])
      feats.append(np.concatenate(f))
    return preds, np.stack(feats)

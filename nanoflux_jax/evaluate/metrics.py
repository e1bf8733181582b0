"""Toy-world metrics: toy-GenEval, toy-FID and PSNR."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.linalg

from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.shapes import classifier as clf_lib
def geneval_per_image(clf: clf_lib.Classifier, images: np.ndarray,
                      scenes: Sequence[shapes.Scene]) -> np.ndarray:
  """bool [N]: is every prompted object read back from image i?

  An object counts when the classifier sees, at its prompted position, its
  prompted shape and colour.

  Args:
    images: uint8 [N, R, R, 3] generations for `scenes`' captions.
  """
  if len(images) != len(scenes):
    raise ValueError(f'geneval: {len(images)} images for {len(scenes)} scenes')
  preds, _ = clf(images)
  labels = clf_lib.batch_labels(scenes)
  present = labels['shape'] > 0
  ok = ((preds['shape'] == labels['shape']) &
        (preds['colour'] == labels['colour'])) | ~present
  return ok.all(axis=1)


def geneval(clf: clf_lib.Classifier, images: np.ndarray,
            scenes: Sequence[shapes.Scene]) -> float:
  """toy-GenEval: the fraction of images in which every prompted object is
  read back (see `geneval_per_image`)."""
  return float(geneval_per_image(clf, images, scenes).mean())


def wilson_interval(successes: int, n: int, z: float = 1.96
                    ) -> tuple[float, float]:
  """95% (z = 1.96) Wilson score interval of a proportion successes / n.

  Unlike the normal approximation it stays inside [0, 1] and is not empty
  at 0 or n successes, where toy-GenEval scores often sit.
  """
  if n <= 0:
    raise ValueError(f'wilson_interval: n={n} must be positive')
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def geneval_summary(ok: np.ndarray, scenes: Sequence[shapes.Scene]
                    ) -> dict[str, dict]:
  """toy-GenEval with 95% CIs, overall and by number of objects.

  Args:
    ok: bool [N] from `geneval_per_image`.
  Returns:
    {'all' | '1_object' | '2_objects': {'score', 'ci', 'n'}}.
  """
  ok = np.asarray(ok, bool)
  counts = np.array([len(s.objects) for s in scenes])
  out = {}
  for name, sel in (('all', np.ones_like(ok)), ('1_object', counts == 1),
                    ('2_objects', counts == 2)):
    n = int(sel.sum())
    if n:
      k = int(ok[sel].sum())
      out[name] = {'score': k / n, 'ci': wilson_interval(k, n), 'n': n}
  return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to features a [N, F], b [M, F]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
  if np.iscomplexobj(covmean):  # numerical noise on a singular product.
    covmean = covmean.real
  return float(np.sum((mu_a - mu_b) ** 2) +
               np.trace(cov_a + cov_b - 2 * covmean))


def toy_fid(clf: clf_lib.Classifier, images: np.ndarray,
            reference: np.ndarray) -> float:
  """Fréchet distance of classifier features: generations vs real renderings."""
  return frechet_distance(clf(images)[1], clf(reference)[1])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over images of PSNR (dB) between uint8 [N, H, W, C] batches."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
  return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))

"""Toy-world metrics: toy-GenEval, toy-FID and PSNR."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.linalg

from nanoflux_jax.data import shapes
from nanoflux_jax.evaluate import classifier as clf_lib


def geneval(clf: clf_lib.Classifier, images: np.ndarray,
            scenes: Sequence[shapes.Scene]) -> float:
  """Fraction of images in which every prompted object is read back.

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
  return float(ok.all(axis=1).mean())


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

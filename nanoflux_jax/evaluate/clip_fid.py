"""CLIP-space FID: the Fréchet distance between Gaussians fitted to CLIP
image embeddings of generated images and of reference images (the teacher's
images from the same prompts and noise, or a user's folder).

  d = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

The trace of the matrix square root is computed without a non-symmetric
sqrtm: tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), and both
square roots are of symmetric PSD matrices, taken by eigendecomposition in
float64 with eigenvalues clipped at zero. This stays real and finite when
the covariances are singular, as they are whenever there are fewer images
than embedding dimensions (a few hundred prompts against CLIP-L's 768).
"""
from __future__ import annotations

import numpy as np


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  """The symmetric PSD square root of a symmetric matrix (eigenvalues < 0,
  rounding noise, clipped to 0)."""
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
  """tr((cov_a cov_b)^(1/2)) for symmetric PSD cov_a, cov_b [F, F]."""
  r = _psd_sqrt(np.asarray(cov_a, np.float64))
  m = r @ np.asarray(cov_b, np.float64) @ r
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0, None))))


def frechet_distance_stats(mu_a, cov_a, mu_b, cov_b) -> float:
  """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

  Args:
    mu_a, mu_b: [F] means. cov_a, cov_b: [F, F] symmetric PSD covariances.
  """
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  f = mu_a.shape[0]
  if (mu_a.shape != (f,) or mu_b.shape != (f,) or cov_a.shape != (f, f) or
      cov_b.shape != (f, f)):
    raise ValueError(f'frechet_distance: means {mu_a.shape}, {mu_b.shape} '
                     f'and covariances {cov_a.shape}, {cov_b.shape} do not '
                     'describe two Gaussians of one dimension')
  d = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
       - 2 * trace_sqrt_product(cov_a, cov_b))
  # Rounding can take a distance of identical sets a hair below zero.
  return float(max(d, 0.0))


def clip_fid(features: np.ndarray, reference: np.ndarray) -> float:
  """CLIP-space FID of embeddings [N, F] against reference embeddings [M, F].

  Raises:
    ValueError: fewer than 2 rows on either side, or different widths.
  """
  a, b = np.asarray(features, np.float64), np.asarray(reference, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f'clip_fid: features {a.shape} and reference '
                     f'{b.shape}; expected [N, F] and [M, F]')
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f'clip_fid: needs >= 2 images on each side, got '
                     f'{len(a)} and {len(b)}')
  return frechet_distance_stats(a.mean(0), np.cov(a, rowvar=False),
                                b.mean(0), np.cov(b, rowvar=False))

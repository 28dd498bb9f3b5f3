"""Diversity measures that do not go through the digits classifier (ALGORITHMS.md section 8).

A classifier's features are invariant to much of what makes two digits differ
(stroke width, slant, position), so a student can match the real digits there
while its pixels are less varied than its teacher's. These figures look at the
pixels themselves:

- a pixel-space PCA of the real digits (the 8x8 digit, i.e. the centre crop of
  the classifier's 16x16 layout, `NUM_COMPONENTS` components fitted once on the
  train split): the Frechet distance and KID there;
- the kernel inception distance (KID, Binkowski et al. 2018): the unbiased
  estimate of the squared MMD with the cubic polynomial kernel
  `k(a, b) = (a.b / F + 1)^3`, in any feature space; unlike FD it has no bias
  in the number of samples, so sets of different sizes compare;
- per-pixel standard deviation (mean over the 64 pixels) and its ratio to the
  real digits', and the distance between the mean image and the real mean image.

Everything in float64 numpy.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_COMPONENTS = 32
CROP = (4, 12)  # the 8x8 digit inside the 16x16 classifier layout


def digit_pixels(images16: np.ndarray) -> np.ndarray:
  """`[N, 16, 16, 1]` classifier-layout images -> `[N, 64]` pixels of the centred 8x8 digit."""
  x = np.asarray(images16, np.float64)
  lo, hi = CROP
  return x[:, lo:hi, lo:hi, :].reshape(len(x), -1)


def kid(features_a: np.ndarray, features_b: np.ndarray, max_points: int = 4000) -> float:
  """Unbiased squared MMD between two feature sets `[N, F]`, `[M, F]` (cubic polynomial kernel).

  Uses at most `max_points` points of each set (the first ones). Can be slightly
  negative when the sets come from one distribution.
  """
  a = np.asarray(features_a, np.float64)[:max_points]
  b = np.asarray(features_b, np.float64)[:max_points]
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"KID needs at least 2 points per set, got {len(a)} and {len(b)}")
  f = a.shape[1]
  k_aa = (a @ a.T / f + 1.0) ** 3
  k_bb = (b @ b.T / f + 1.0) ** 3
  k_ab = (a @ b.T / f + 1.0) ** 3
  n, m = len(a), len(b)
  t_aa = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
  t_bb = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
  return float(t_aa + t_bb - 2.0 * k_ab.mean())


class PixelPCA:
  """PCA of real pixels: `transform(pixels [N, 64]) -> [N, k]` (centred on the real mean, not whitened)."""

  def __init__(self, real_pixels: np.ndarray, num_components: int = NUM_COMPONENTS):
    x = np.asarray(real_pixels, np.float64)
    self.mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
    self.components = vt[:num_components]  # [k, 64]
    self.real_std = x.std(axis=0, ddof=1).mean()
    self.real_features = self.transform(x)

  def transform(self, pixels: np.ndarray) -> np.ndarray:
    return (np.asarray(pixels, np.float64) - self.mean) @ self.components.T


@functools.lru_cache(maxsize=4)
def real_pixel_pca(split: str = "train", layout: str = "pad", resolution: int = 16) -> PixelPCA:
  """The PCA of the real digits of `split`, after the same round trip as generated images."""
  from emd_jax.data import digits_tfds, pipeline
  from emd_jax.evaluators import digits_classifier

  images, _ = digits_tfds.digits_arrays(split)
  x = pipeline.preprocess_images(images, resolution, layout).numpy()
  return PixelPCA(digit_pixels(np.asarray(digits_classifier.to_classifier_input(x, layout))))


def pixel_metrics(images16: np.ndarray, pca: PixelPCA) -> dict[str, float]:
  """Pixel-space figures of classifier-layout images `[N, 16, 16, 1]` against the real digits of `pca`."""
  from emd_jax.evaluators.frechet import frechet_distance_features

  px = digit_pixels(images16)
  feats = pca.transform(px)
  std = px.std(axis=0, ddof=1).mean()
  return {
    "fd_pixel": frechet_distance_features(feats, pca.real_features),
    "kid_pixel": kid(feats, pca.real_features),
    "pixel_std": float(std),
    "pixel_std_ratio_real": float(std / pca.real_std),
    "mean_image_dist": float(np.linalg.norm(px.mean(axis=0) - pca.mean)),
  }

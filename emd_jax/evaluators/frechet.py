"""Frechet distance between Gaussians fitted to two feature sets (no evaluator, no model).

  FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}),
with `tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i(S_a^{1/2} S_b S_a^{1/2}))`, both
square roots taken by `eigh` of symmetric PSD matrices in float64 (no scipy,
no complex parts to discard). FD is biased by the number of samples: compare
runs at the same sample count (`diversity.kid` is the unbiased alternative).

This module is the maths only and imports nothing from the other evaluators
(the digits, Inception and pixel-space evaluators all import it).
"""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[F]` and covariance `[F, F]` (unbiased) of features `[N, F]`, float64."""
  x = np.asarray(features, np.float64).reshape(len(features), -1)
  mu = x.mean(axis=0)
  sigma = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
  return mu, np.atleast_2d(sigma)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
  """Frechet (2-Wasserstein) distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
  root_a = _sqrt_psd(sigma_a)
  inner = root_a @ sigma_b @ root_a
  w = np.linalg.eigvalsh((inner + inner.T) / 2.0)
  tr_cross = np.sqrt(np.clip(w, 0.0, None)).sum()
  d = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_cross
  return float(max(d, 0.0))


def frechet_distance_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FD between Gaussians fitted to features `[N, F]` and `[M, F]`."""
  return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))

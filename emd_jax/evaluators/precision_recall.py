"""Improved precision and recall (Kynkaanniemi et al., 2019) in a feature space.

Each set's manifold is approximated by the union of balls around its points,
the radius of a ball being the distance to the point's k-th nearest neighbour
in the same set (k = 3 in the paper). Precision is the fraction of generated
samples inside the real manifold (quality); recall is the fraction of real
samples inside the generated manifold (coverage of the data). Computed in
float64 numpy, in blocks, so a few thousand points per set are cheap.
"""

from __future__ import annotations

import numpy as np


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances `[len(a), len(b)]`."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
  """Distance `[N]` from each point to its k-th nearest neighbour in its own set (not itself)."""
  x = np.asarray(features, np.float64)
  if len(x) <= k:
    raise ValueError(f"need more than k={k} points, got {len(x)}")
  out = np.empty(len(x))
  for i in range(0, len(x), block):
    d = _sq_dists(x[i : i + block], x)  # [b, N]; the self-distance 0 is the smallest
    out[i : i + block] = np.sqrt(np.partition(d, k, axis=1)[:, k])
  return out


def _inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> np.ndarray:
  """Whether each query lies in at least one ball (centre, radius). `[len(queries)]` bool."""
  out = np.empty(len(queries), bool)
  r2 = radii**2
  for i in range(0, len(queries), block):
    d = _sq_dists(queries[i : i + block], centres)
    out[i : i + block] = (d <= r2[None, :]).any(axis=1)
  return out


def precision_recall(
  real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, block: int = 1024
) -> dict[str, float]:
  """Returns {'precision', 'recall'} of `fake_features [M, F]` against `real_features [N, F]`."""
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  precision = _inside(fake, real, knn_radii(real, k, block), block).mean()
  recall = _inside(real, fake, knn_radii(fake, k, block), block).mean()
  return {"precision": float(precision), "recall": float(recall)}

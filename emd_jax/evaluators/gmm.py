"""Exact quality figures for a Gaussian-mixture teacher (ALGORITHMS.md section 8).

- mode_mass_tv: total variation between the fraction of samples nearest each
  mode and the true weights;
- inside_fraction: samples within 4 component stds of their nearest mean;
- dropped_modes: modes holding under 10% of their true weight;
- spread_ratio: RMS per-coordinate distance to the nearest mean of inside
  samples, over the component std (1 is exact; < 1 under-dispersed);
- off_mode_fraction: samples farther than `OFF_MODE_STDS` component stds from
  every mean (for an exact isotropic 2-D mixture 0.1%): the mass on the
  bridges between modes;
- basin_spread_ratio: the same RMS distance over each mode's whole basin (the
  ball of half the distance to the nearest other mean) instead of its 4-std
  core, so a long tail counts (1 is exact; > 1 tails, < 1 a sharp core);
- sliced_wasserstein: SW-1 to the same number of exact samples (64 projections);
- mean_log_prob: exact teacher log-density of the samples.

`GMMEvaluator` is the registered `gmm` evaluator (`registry`): built from the
teacher (context), called as `evaluator(samples [N, D], labels=None)`.
"""

from __future__ import annotations

import numpy as np

from emd_jax.evaluators import registry
from emd_jax.teachers import gmm

OFF_MODE_STDS = 3.7


def gmm_metrics(samples: np.ndarray, params: dict, seed: int = 0, num_projections: int = 64) -> dict:
  """The figures above for samples `[N, D]` of a mixture with `params` (means `[K, D]`, stds `[K]`, log_weights `[K]`).

  `seed` draws the exact reference samples and the projections of the sliced
  Wasserstein distance. Returns `gmm/*` scalars and `gmm_detail/mass_mode{k}`.
  """
  samples = np.asarray(samples, np.float64)
  means = np.asarray(params["means"], np.float64)
  stds = np.asarray(params["stds"], np.float64)
  weights = np.exp(np.asarray(params["log_weights"], np.float64))
  k = means.shape[0]
  d = np.linalg.norm(samples[:, None, :] - means[None], axis=-1)  # [N, K]
  nearest = d.argmin(axis=1)
  mass = np.bincount(nearest, minlength=k) / len(samples)
  dist = d[np.arange(len(samples)), nearest]
  inside = dist < 4.0 * stds[nearest]
  if inside.any():
    spread = np.sqrt(np.mean((dist[inside] / stds[nearest[inside]]) ** 2) / samples.shape[1])
  else:
    spread = 0.0
  mean_gaps = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.diag(np.full(k, np.inf))
  basin = dist < 0.5 * mean_gaps.min(axis=1)[nearest]
  ratio = dist / stds[nearest]
  basin_spread = np.sqrt(np.mean(ratio[basin] ** 2) / samples.shape[1]) if basin.any() else 0.0
  off_mode = (d / stds[None, :]).min(axis=1) > OFF_MODE_STDS
  rng = np.random.default_rng(seed)
  ref_k = rng.choice(k, size=len(samples), p=weights / weights.sum())
  ref = means[ref_k] + stds[ref_k, None] * rng.standard_normal(samples.shape)
  proj = rng.standard_normal((samples.shape[1], num_projections))
  proj /= np.linalg.norm(proj, axis=0, keepdims=True)
  sw = np.mean(np.abs(np.sort(samples @ proj, axis=0) - np.sort(ref @ proj, axis=0)))
  import jax.numpy as jnp

  logp = np.asarray(gmm.log_prob(params, jnp.asarray(samples, jnp.float32)))
  out = {
    "gmm/mode_mass_tv": 0.5 * float(np.abs(mass - weights).sum()),
    "gmm/inside_fraction": float(inside.mean()),
    "gmm/dropped_modes": int(np.sum(mass < 0.1 * weights)),
    "gmm/spread_ratio": float(spread),
    "gmm/off_mode_fraction": float(off_mode.mean()),
    "gmm/basin_spread_ratio": float(basin_spread),
    "gmm/sliced_wasserstein": float(sw),
    "gmm/mean_log_prob": float(np.mean(logp)),
  }
  for i, m in enumerate(mass):
    out[f"gmm_detail/mass_mode{i}"] = float(m)
  return out


@registry.register("gmm", context=("teacher",))
class GMMEvaluator:
  """The `gmm` evaluator: `evaluator(samples [N, D], labels=None) -> gmm_metrics(samples, teacher params)`.

  `teacher`: the analytic Gaussian-mixture teacher (its `params` are fetched to
  the host once, here); `seed`, `num_projections`: as `gmm_metrics`.
  """

  name = "gmm"
  kind = "samples"

  def __init__(self, teacher, seed: int = 0, num_projections: int = 64):
    import jax

    spec_kind = (getattr(teacher, "spec", None) or {}).get("kind")
    params = getattr(teacher, "params", None)
    if spec_kind != "gmm" or not isinstance(params, dict) or not {"means", "stds", "log_weights"} <= set(params):
      raise ValueError(f"scores samples against a Gaussian-mixture teacher; this teacher is {spec_kind!r}")
    self.params = jax.device_get(params)
    self.seed, self.num_projections = seed, num_projections

  def __call__(self, samples: np.ndarray, labels: np.ndarray | None = None) -> dict:
    del labels
    return gmm_metrics(np.asarray(samples), self.params, self.seed, self.num_projections)


def scatter_image(samples: np.ndarray, extent: float = 1.5, size: int = 256) -> np.ndarray:
  """A 2-D histogram of the first two coordinates as a uint8 image `[size, size, 1]`."""
  x = np.asarray(samples)[:, :2]
  h, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=size, range=[[-extent, extent], [-extent, extent]])
  h = np.log1p(h[::-1])
  h = h / max(h.max(), 1e-12)
  return (255 * (1.0 - h)).astype(np.uint8)[..., None]

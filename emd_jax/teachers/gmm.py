"""Analytic Gaussian-mixture teacher: exact denoiser, score and density.

Data `x ~ sum_k w_k N(mu_k, s_k^2 I)`. In the EDM frame `x_sigma = x + sigma n`
has density `p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)` and the exact
posterior mean (the ideal denoiser) is

  D(x, sigma) = sum_k r_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],

with responsibilities `r_k` under `p_sigma`. Everything is closed form, so
this teacher has no approximation error at any noise level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.teachers.base import Teacher

Array = jax.Array


def make_params(
  dim: int = 2,
  num_modes: int = 8,
  radius: float = 1.0,
  std: float | Sequence[float] = 0.05,
  weights: Sequence[float] | None = None,
) -> dict:
  """Mixture parameters: means on a circle in the first two coordinates.

  Mode k sits at angle `2 pi k / num_modes` and radius `radius` in the plane of
  the first two coordinates (zero elsewhere). `weights` default to
  `(k + 1) / sum(k + 1)`; they are normalised here.
  """
  if dim < 1 or num_modes < 1:
    raise ValueError(f"need dim >= 1 and num_modes >= 1, got dim={dim}, num_modes={num_modes}")
  angles = 2 * np.pi * np.arange(num_modes) / num_modes
  means = np.zeros((num_modes, dim), np.float32)
  means[:, 0] = radius * np.cos(angles)
  if dim > 1:
    means[:, 1] = radius * np.sin(angles)
  if weights is None:
    weights = np.arange(1, num_modes + 1, dtype=np.float64)
  weights = np.asarray(weights, np.float64)
  if weights.shape != (num_modes,) or np.any(weights <= 0):
    raise ValueError(f"teacher.weights must be {num_modes} positive numbers, got {weights.tolist()}")
  stds = np.broadcast_to(np.asarray(std, np.float32), (num_modes,))
  if np.any(stds <= 0):
    raise ValueError(f"teacher.std must be positive, got {std}")
  return {
    "means": jnp.asarray(means),  # [K, D]
    "stds": jnp.asarray(stds),  # [K]
    "log_weights": jnp.asarray(np.log(weights / weights.sum()), jnp.float32),  # [K]
  }


def _component_logits(params: dict, x: Array, sigma: Array) -> tuple[Array, Array]:
  """Log of `w_k N(x; mu_k, v_k I)` per component, and the variances `v_k`.

  x: [B, D], sigma: [B] -> logits [B, K], var [B, K].
  """
  dim = x.shape[-1]
  var = params["stds"][None, :] ** 2 + sigma[:, None] ** 2  # [B, K]
  sq = jnp.sum((x[:, None, :] - params["means"][None]) ** 2, axis=-1)  # [B, K]
  logits = params["log_weights"][None] - 0.5 * sq / var - 0.5 * dim * jnp.log(2 * jnp.pi * var)
  return logits, var


def denoise(params: dict, x: Array, sigma: Array, labels=None) -> Array:
  """Exact posterior mean `E[x_0 | x_sigma = x]`. x: [B, D], sigma: [B] or scalar."""
  del labels
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  logits, var = _component_logits(params, x, sigma)
  r = jax.nn.softmax(logits, axis=-1)  # [B, K]
  shrink = params["stds"][None, :] ** 2 / var  # [B, K]
  comp_mean = params["means"][None] + shrink[..., None] * (x[:, None, :] - params["means"][None])
  return jnp.einsum("bk,bkd->bd", r, comp_mean)


def log_prob(params: dict, x: Array, sigma: Array | float = 0.0) -> Array:
  """Exact `log p_sigma(x)`, `[B]`."""
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  logits, _ = _component_logits(params, x, sigma)
  return jax.nn.logsumexp(logits, axis=-1)


def score(params: dict, x: Array, sigma: Array) -> Array:
  """Exact score `grad log p_sigma(x) = (D - x) / sigma^2`."""
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  return (denoise(params, x, sigma) - x) / sigma[:, None] ** 2


def sample(params: dict, rng: Array, num: int) -> tuple[Array, Array]:
  """Exact samples `[num, D]` and their component indices `[num]`."""
  rng_k, rng_n = jax.random.split(rng)
  k = jax.random.categorical(rng_k, params["log_weights"], shape=(num,))
  dim = params["means"].shape[-1]
  n = jax.random.normal(rng_n, (num, dim))
  return params["means"][k] + params["stds"][k][:, None] * n, k


def gmm_teacher(
  dim: int = 2,
  num_modes: int = 8,
  radius: float = 1.0,
  std: float | Sequence[float] = 0.05,
  weights: Sequence[float] | None = None,
  sigma_data: float = 0.5,
) -> Teacher:
  """The analytic mixture as a `Teacher`."""
  params = make_params(dim, num_modes, radius, std, weights)
  spec = {
    "kind": "gmm",
    "dim": dim,
    "num_modes": num_modes,
    "radius": float(radius),
    "std": np.asarray(params["stds"]).tolist(),
    "weights": np.exp(np.asarray(params["log_weights"], np.float64)).tolist(),
  }
  return Teacher(apply=denoise, params=params, data_shape=(dim,), sigma_data=sigma_data, spec=spec)


def data_std(params: dict) -> float:
  """Per-coordinate standard deviation of the mixture, averaged over coordinates."""
  w = np.exp(np.asarray(params["log_weights"], np.float64))
  means = np.asarray(params["means"], np.float64)
  mu = w @ means
  second = w @ (means**2) + w @ (np.asarray(params["stds"], np.float64) ** 2)[:, None]
  return float(math.sqrt(np.mean(second - mu**2)))

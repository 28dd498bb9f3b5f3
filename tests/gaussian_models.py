"""Closed-form Gaussian teachers and linear generators shared by the tests."""

import jax.numpy as jnp
import numpy as np


def gaussian_denoiser_apply(params, x, sigma, labels=None):
  """Exact denoiser of N(mean, cov): `m + C (C + sigma^2 I)^-1 (x - m)`. x: [B, D]."""
  del labels
  m, c = params["mean"], params["cov"]
  dim = m.shape[0]
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  a = c[None] + sigma[:, None, None] ** 2 * jnp.eye(dim)[None]  # [B, D, D]
  sol = jnp.linalg.solve(a, (x - m)[..., None])[..., 0]
  return m + sol @ c.T


def linear_generator_marginal(a_mat, b, sigma_z):
  """`g(z) = A z + b`, `z ~ N(0, sigma_z^2 I)` has marginal N(b, sigma_z^2 A A^T)."""
  return {"mean": jnp.asarray(b), "cov": jnp.asarray(sigma_z**2 * a_mat @ a_mat.T)}


def joint_posterior_moments(mu_t, cov_t, a_mat, b, sigma_z, alpha, sigma):
  """Moments of (eps, z) under p_T,t(x_t) p_theta(z | x_t), x_t = alpha g(z) + sigma eps.

  Returns (mean [D + Dz], cov [D + Dz, D + Dz]) in float64.
  """
  a_mat, b, mu_t, cov_t = (np.asarray(v, np.float64) for v in (a_mat, b, mu_t, cov_t))
  d, dz = a_mat.shape
  # x_t under the teacher's noisy marginal.
  m1 = alpha * mu_t
  c1 = alpha**2 * cov_t + sigma**2 * np.eye(d)
  # z | x_t under the generator's linear-Gaussian model.
  s_xx = alpha**2 * sigma_z**2 * a_mat @ a_mat.T + sigma**2 * np.eye(d)
  k = sigma_z**2 * alpha * a_mat.T @ np.linalg.inv(s_xx)  # [Dz, D]
  s_post = sigma_z**2 * np.eye(dz) - k @ (alpha * a_mat) * sigma_z**2
  # Joint of (x_t, z).
  mean_xz = np.concatenate([m1, k @ (m1 - alpha * b)])
  cov_xz = np.block([[c1, c1 @ k.T], [k @ c1, k @ c1 @ k.T + s_post]])
  # (eps, z) = L (x_t, z) + l0 with eps = (x_t - alpha A z - alpha b) / sigma.
  lin = np.block([[np.eye(d) / sigma, -alpha * a_mat / sigma], [np.zeros((dz, d)), np.eye(dz)]])
  off = np.concatenate([-alpha * b / sigma, np.zeros(dz)])
  return lin @ mean_xz + off, lin @ cov_xz @ lin.T

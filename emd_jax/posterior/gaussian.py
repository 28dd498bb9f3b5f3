"""The exact case: a Gaussian prior, its EDM denoiser and the Gaussian posterior.

With a prior `x ~ N(mu, Sigma)` on flattened images (`d = H*W*C`, small) and a
linear measurement `y = A x + n`, `n ~ N(0, sigma_y^2 I)`, everything the
restorers need is closed form (ALGORITHMS.md section 7, "Exact test"):

  denoiser   D(x, sigma) = E[x0 | x0 + sigma n = x] = mu + Sigma (Sigma + sigma^2 I)^{-1} (x - mu)
  posterior  p(x | y) = N(m_y, C_y),  K = Sigma A^T (A Sigma A^T + sigma_y^2 I)^{-1}
             m_y = mu + K (y - A mu),  C_y = Sigma - K A Sigma

The posterior is itself Gaussian, so `gaussian_denoise(m_y, C_y, x_t, sigma)`
is the exact conditional denoiser `E[x0 | x_t, y]`. Any operator of
`operators.py` becomes a dense matrix with `dense_matrix`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.diffusion import expand_to

Array = jax.Array


def dense_matrix(fn: Callable[[Array], Array], in_shape: Sequence[int]) -> Array:
  """The matrix `[m, d]` of a linear map on batches, built from the identity basis.

  `fn` maps `[B, *in_shape] -> [B, *out_shape]`; `d = prod(in_shape)`.
  """
  d = int(np.prod(in_shape))
  basis = jnp.eye(d, dtype=jnp.float32).reshape(d, *in_shape)
  out = fn(basis).reshape(d, -1)  # row i = A e_i
  return out.T


def gaussian_denoise(mean: Array, cov: Array, x: Array, sigma: Array, eig: tuple[Array, Array] | None = None) -> Array:
  """Exact denoiser of `N(mean, cov)`: `mean + cov (cov + sigma^2 I)^{-1} (x - mean)`.

  `x` `[B, ...]` (flattened internally to `[B, d]`), `mean` `[d]` or `[B, d]`,
  `cov` `[d, d]`, `sigma` scalar or `[B]`. Uses an eigendecomposition of `cov`
  (pass a precomputed `eig = jnp.linalg.eigh(cov)` to skip it), so `sigma -> 0`
  is exact (`D(x, 0) = x` for full-rank `cov`).
  """
  b = x.shape[0]
  xf = x.reshape(b, -1).astype(jnp.float32)
  evals, evecs = jnp.linalg.eigh(cov) if eig is None else eig
  evals = jnp.clip(evals, 0.0)
  s2 = expand_to(jnp.asarray(sigma, jnp.float32) ** 2, xf)  # [B, 1] or scalar
  z = (xf - mean) @ evecs  # [B, d] in the eigenbasis
  shrink = evals / (evals + s2)  # [B, d]; sigma = 0 gives 1 for evals > 0
  shrink = jnp.where(evals + s2 > 0, shrink, 0.0)
  out = mean + (shrink * z) @ evecs.T
  return out.reshape(x.shape).astype(x.dtype)


def gaussian_posterior(mean: Array, cov: Array, a: Array, y: Array, sigma_y: float | Array) -> tuple[Array, Array]:
  """Posterior `N(m_y, C_y)` of `x ~ N(mean, cov)` given `y = a x + sigma_y n`.

  `a` `[m, d]`; `y` `[B, ...]` flattened to `[B, m]`. Returns `(m_y [B, d], C_y [d, d])`.
  Kalman form (no inverse of `cov`), so singular priors and `sigma_y = 0` with a
  full-row-rank `a` are fine.
  """
  yf = y.reshape(y.shape[0], -1)
  s = a @ cov @ a.T + jnp.asarray(sigma_y) ** 2 * jnp.eye(a.shape[0])  # [m, m]
  gain = jnp.linalg.solve(s, a @ cov).T  # [d, m] = cov a^T s^{-1} (s symmetric)
  m_y = mean + (yf - mean @ a.T) @ gain.T
  c_y = cov - gain @ a @ cov
  return m_y, 0.5 * (c_y + c_y.T)


@dataclasses.dataclass(frozen=True)
class GaussianPrior:
  """`N(mean, cov)` over images of `image_shape`, flattened in NHWC order.

  `denoise` has the denoiser-closure signature `(x [B,H,W,C], sigma [B], labels) -> D`,
  so it plugs into every sampler of the project as an exact teacher.
  """

  mean: Array  # [d]
  cov: Array  # [d, d]
  image_shape: tuple[int, ...]

  @property
  def dim(self) -> int:
    return int(np.prod(self.image_shape))

  def __post_init__(self):
    # Cached eigendecomposition: the denoiser is called inside sampler loops.
    object.__setattr__(self, "_eig", jnp.linalg.eigh(self.cov))

  def denoise(self, x: Array, sigma: Array, labels=None) -> Array:
    del labels
    return gaussian_denoise(self.mean, self.cov, x, sigma, self._eig)

  def sample(self, rng: Array, num: int) -> Array:
    """`[num, *image_shape]` exact samples."""
    chol = jnp.linalg.cholesky(self.cov + 1e-9 * jnp.eye(self.dim))
    z = jax.random.normal(rng, (num, self.dim))
    return (self.mean + z @ chol.T).reshape(num, *self.image_shape)

  def posterior(self, a: Array, y: Array, sigma_y: float | Array) -> tuple[Array, Array]:
    """Exact `p(x | y)`: `(mean [B, d], cov [d, d])` for a dense operator `a` `[m, d]`."""
    return gaussian_posterior(self.mean, self.cov, a, y, sigma_y)

  def posterior_denoiser(self, a: Array, y: Array, sigma_y: float | Array):
    """The exact conditional denoiser `(x_t, sigma) -> E[x0 | x_t, y]` as a closure."""
    m_y, c_y = self.posterior(a, y, sigma_y)
    eig = jnp.linalg.eigh(c_y)
    return lambda x, sigma, labels=None: gaussian_denoise(m_y, c_y, x, sigma, eig)


def smooth_prior(
  image_shape: Sequence[int],
  length_scale: float = 1.5,
  std: float = 0.5,
  channel_corr: float = 0.5,
  mean: float | Array = 0.0,
  jitter: float = 1e-3,
) -> GaussianPrior:
  """A stationary Gaussian-process image prior: squared-exponential in space.

  `cov[(i,j,c), (k,l,e)] = std^2 exp(-|(i,j)-(k,l)|^2 / (2 ls^2)) * R[c, e]` with
  `R = (1 - rho) I + rho 1 1^T`, plus `jitter * std^2 * I` to keep it full rank.
  """
  h, w, c = image_shape
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  pos = np.stack([yy.ravel(), xx.ravel()], axis=-1).astype(np.float64)  # [H*W, 2]
  d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
  spatial = np.exp(-d2 / (2 * length_scale**2))
  chan = (1 - channel_corr) * np.eye(c) + channel_corr * np.ones((c, c))
  cov = std**2 * np.kron(spatial, chan)  # NHWC order: pixel-major, channel-minor
  cov += jitter * std**2 * np.eye(h * w * c)
  mean_vec = jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (h * w * c,))
  return GaussianPrior(mean_vec, jnp.asarray(cov, jnp.float32), tuple(image_shape))

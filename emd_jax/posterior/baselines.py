"""Zero-shot restorers in the same framework as the unfolded sampler.

Every restorer has the signature
`restore(denoise, operator, y, rng, *, sigma_y, labels=None, ...) -> x0 [B, H, W, C]`
with `denoise(x, sigma [B], labels) -> D` in the EDM frame (data in [-1, 1]).

(a) `unfolded_zero_shot`: UD2M's N x K structure with hand-set `lam` / `t_delta`
    (`default_unfolded_params`) and the plain, un-adapted denoiser.
(b) `diffpir_sample`: DiffPIR (Zhu et al., CVPR-W 2023) at a given NFE. Per step,
    in the EDM frame with DDPM sigmas:
      x0 = D(x_t, sigma_t)                                  (one NFE)
      x0 = argmin ||y - A x||^2 + rho_t ||x - x0||^2,   rho_t = lambda sigma_y^2 / sigma_t^2
         = prox(x0; y, lam = sigma_t^2 / lambda, sigma_y)   (independent of sigma_y)
      eps_hat = (x_t - x0) / sigma_t
      x_{t'} = x0 + sigma_t' (sqrt(1 - zeta) eps_hat + sqrt(zeta) n)
    The last step returns `x0`. `lambda` and `zeta` are config; `DIFFPIR_DEFAULTS`
    holds per-task values in the range the DiffPIR paper reports
    (zeta ~ 0.3-1.0, lambda ~ 1-10); they were not re-derived here: tune them
    on a validation split before quoting baseline numbers.
(c) `ddrm_sample`: DDRM (Kawar et al., NeurIPS 2022) in the operator's SVD basis
    (`operator.spectral`, `singular_values`, `spectral_y`), eta = 0.85, eta_b = 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.diffusion import DenoiseFn
from emd_jax.posterior.operators import LinearOperator
from emd_jax.posterior.unfolded import (
  DEFAULT_TIMESTEPS,
  ddpm_sigmas,
  default_unfolded_params,
  unfolded_sample,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DiffPIRConfig:
  """DiffPIR hyperparameters. `nfe` steps over the 1000-step DDPM scale."""

  lam: float = 7.0  # lambda: prior/data trade-off of the prox step
  zeta: float = 0.3  # fraction of fresh noise in the re-noising step
  nfe: int = 50
  t_start: int = 999  # first DDPM time (DiffPIR can start later than T)


DIFFPIR_DEFAULTS: dict[str, DiffPIRConfig] = {
  "gaussian_blur": DiffPIRConfig(lam=7.0, zeta=0.3),
  "motion_blur": DiffPIRConfig(lam=7.0, zeta=0.3),
  "downsample": DiffPIRConfig(lam=6.0, zeta=0.3),
  "inpaint_random": DiffPIRConfig(lam=7.0, zeta=1.0),
  "inpaint_box": DiffPIRConfig(lam=7.0, zeta=1.0),
}


def diffpir_timesteps(nfe: int, t_start: int = 999) -> np.ndarray:
  """`nfe` DDPM times uniformly from `t_start` down to 0 (`[nfe]`, int, decreasing)."""
  if nfe < 1:
    raise ValueError("nfe must be >= 1")
  return np.round(np.linspace(t_start, 0, nfe)).astype(np.int64)


def diffpir_sample(
  denoise: DenoiseFn,
  operator: LinearOperator,
  y: Array,
  rng: Array,
  *,
  sigma_y: float | Array,
  labels=None,
  config: DiffPIRConfig = DiffPIRConfig(),
  timesteps: np.ndarray | None = None,
) -> Array:
  """DiffPIR posterior sampling; exactly `config.nfe` denoiser calls (`lax.scan`)."""
  ts = diffpir_timesteps(config.nfe, config.t_start) if timesteps is None else np.asarray(timesteps)
  sigmas = jnp.asarray(ddpm_sigmas(ts))
  sigmas_next = jnp.concatenate([sigmas[1:], jnp.zeros((1,), sigmas.dtype)])
  shape = operator.backproject(y).shape
  batch = shape[0]
  rng_init, rng_loop = jax.random.split(rng)
  x = jnp.sqrt(1.0 + sigmas[0] ** 2) * jax.random.normal(rng_init, shape, y.dtype)

  def step(x_t, inputs):
    i, s_t, s_next = inputs
    x0 = denoise(x_t, jnp.full((batch,), s_t, x_t.dtype), labels)
    x0 = operator.prox(x0, y, s_t**2 / config.lam, sigma_y)
    eps_hat = (x_t - x0) / s_t
    noise = jax.random.normal(jax.random.fold_in(rng_loop, i), x_t.shape, x_t.dtype)
    mix = jnp.sqrt(1.0 - config.zeta) * eps_hat + jnp.sqrt(config.zeta) * noise
    x_next = jnp.where(s_next > 0, x0 + s_next * mix, x0)
    return x_next, None

  x, _ = jax.lax.scan(step, x, (jnp.arange(len(ts)), sigmas, sigmas_next))
  return x


def unfolded_zero_shot(
  denoise: DenoiseFn,
  operator: LinearOperator,
  y: Array,
  rng: Array,
  *,
  sigma_y: float | Array,
  labels=None,
  num_outer: int = 3,
  num_inner: int = 3,
  params: dict[str, Array] | None = None,
  timesteps=DEFAULT_TIMESTEPS,
  eta: float = 0.8,
) -> Array:
  """UD2M's structure without training: hand-set block parameters, plain denoiser."""
  params = default_unfolded_params(num_outer, num_inner) if params is None else params
  return unfolded_sample(denoise, operator, y, rng, params, num_outer, num_inner, sigma_y, timesteps, eta, labels)


@dataclasses.dataclass(frozen=True)
class DDRMConfig:
  """DDRM hyperparameters (the paper's defaults: eta = 0.85, eta_b = 1, 20 NFE)."""

  eta: float = 0.85
  eta_b: float = 1.0
  nfe: int = 20
  t_start: int = 999
  s_min: float = 0.0  # singular values below this are treated as the null space


def _ddrm_update(xb_t, xb0, yb, s, s_t, s_next, sigma_y, eps, cfg: DDRMConfig):
  """One DDRM transition per spectral coordinate (EDM frame, all arrays broadcast).

  s = 0:                    x0 + sqrt(1 - eta^2) s' (x_t - x0) / s_t + eta s' eps
  s > 0, s' < sigma_y / s:  x0 + sqrt(1 - eta^2) s' (ybar - x0) s / sigma_y + eta s' eps
  s > 0, s' >= sigma_y / s: (1 - eta_b) x0 + eta_b ybar + sqrt(s'^2 - eta_b^2 sigma_y^2 / s^2) eps
  """
  c = jnp.sqrt(1.0 - cfg.eta**2)
  null = xb0 + c * s_next * (xb_t - xb0) / s_t + cfg.eta * s_next * eps
  observed = s > 0
  sy_over_s = jnp.where(observed, sigma_y / jnp.where(observed, s, 1.0), jnp.inf)
  noisy_branch = s_next < sy_over_s  # data noisier than the target level
  ratio = jnp.where(noisy_branch & observed, s_next / jnp.where(noisy_branch, sy_over_s, 1.0), 0.0)
  low = xb0 + c * ratio * (yb - xb0) + cfg.eta * s_next * eps
  rest = jnp.sqrt(jnp.clip(s_next**2 - cfg.eta_b**2 * jnp.where(observed, sy_over_s, 0.0) ** 2, 0.0))
  high = (1.0 - cfg.eta_b) * xb0 + cfg.eta_b * yb + rest * eps
  return jnp.where(observed, jnp.where(noisy_branch, low, high), null)


def ddrm_sample(
  denoise: DenoiseFn,
  operator: LinearOperator,
  y: Array,
  rng: Array,
  *,
  sigma_y: float,
  labels=None,
  config: DDRMConfig = DDRMConfig(),
  timesteps: np.ndarray | None = None,
) -> Array:
  """DDRM restoration; exactly `config.nfe` denoiser calls (`lax.scan`).

  `sigma_y` is a scalar here (one noise level per batch). Initialised at the
  top level as in the paper: observed coordinates at `ybar + sqrt(s_T^2 -
  sigma_y^2/s^2) eps`, the null space at `s_T eps`.
  """
  ts = diffpir_timesteps(config.nfe, config.t_start) if timesteps is None else np.asarray(timesteps)
  sigmas = jnp.asarray(ddpm_sigmas(ts))
  sigmas_next = jnp.concatenate([sigmas[1:], jnp.zeros((1,), sigmas.dtype)])
  x_bp = operator.backproject(y)
  batch = x_bp.shape[0]
  s = operator.singular_values()
  s = jnp.where(s > config.s_min, s, 0.0)
  yb = jnp.where(s > 0, operator.spectral_y(y), 0.0)
  noise_b = lambda r: operator.spectral(jax.random.normal(r, x_bp.shape, x_bp.dtype))
  rng_init, rng_loop = jax.random.split(rng)
  # A first "step" from level infinity: zero weight on x_t - x0 (null) and x0 = 0.
  zeros = jnp.zeros_like(yb)
  init_cfg = dataclasses.replace(config, eta=1.0)
  xb = _ddrm_update(zeros, zeros, yb, s, jnp.inf, sigmas[0], sigma_y, noise_b(rng_init), init_cfg)
  x = operator.inverse_spectral(xb)

  def step(x_t, inputs):
    i, s_t, s_next = inputs
    x0 = denoise(x_t, jnp.full((batch,), s_t, x_t.dtype), labels)
    eps = noise_b(jax.random.fold_in(rng_loop, i))
    xb = _ddrm_update(operator.spectral(x_t), operator.spectral(x0), yb, s, s_t, s_next, sigma_y, eps, config)
    return operator.inverse_spectral(xb).astype(x_t.dtype), None

  x, _ = jax.lax.scan(step, x, (jnp.arange(len(ts)), sigmas, sigmas_next))
  return x


BASELINES = {
  "diffpir": diffpir_sample,
  "ddrm": ddrm_sample,
  "unfolded_zero_shot": unfolded_zero_shot,
}

"""EDM diffusion conventions (ALGORITHMS.md section 1).

Everything here is a pure function of arrays. Noise levels are EDM sigmas
(noise-to-signal ratio in data units); a `Schedule` maps such a sigma to the
explicit `(alpha, sigma_t)` of the forward process
`x_t = alpha * x + sigma_t * eps`: VE has `alpha = 1, sigma_t = sigma`, VP has
`alpha = 1/sqrt(1 + sigma^2)`, `sigma_t = sigma * alpha` (so
`alpha^2 + sigma_t^2 = 1`). Denoisers are always evaluated in the EDM (VE)
frame, `D(x_t / alpha, sigma_t / alpha)`, which is how a VP process reuses a
VE-trained network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
# A denoiser closure: (x [B, ...], sigma [B], labels [B, C] or None) -> D [B, ...].
DenoiseFn = Callable[[Array, Array, Any], Array]


def edm_precond(sigma: Array, sigma_data: float = 0.5) -> tuple[Array, Array, Array, Array]:
  """EDM preconditioning coefficients `(c_skip, c_out, c_in, c_noise)`."""
  sigma = jnp.asarray(sigma)
  s2 = sigma**2 + sigma_data**2
  c_skip = sigma_data**2 / s2
  c_out = sigma * sigma_data / jnp.sqrt(s2)
  c_in = 1.0 / jnp.sqrt(s2)
  c_noise = jnp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: Array, sigma_data: float = 0.5) -> Array:
  """EDM denoising-loss weight `lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2`."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def expand_to(v: Array, x: Array) -> Array:
  """Reshapes a per-example vector `[B]` to broadcast against `x` `[B, ...]`."""
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


# ----------------------------------------------------------------------------
# Forward process.


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Maps an EDM sigma to the forward process' explicit `(alpha, sigma_t)`."""

  kind: str = "ve"  # "ve" or "vp"

  def __post_init__(self):
    if self.kind not in ("ve", "vp"):
      raise ValueError(f"schedule kind must be 've' or 'vp', got {self.kind!r}")

  def alpha_sigma(self, sigma: Array) -> tuple[Array, Array]:
    sigma = jnp.asarray(sigma)
    if self.kind == "ve":
      return jnp.ones_like(sigma), sigma
    alpha = 1.0 / jnp.sqrt(1.0 + sigma**2)
    return alpha, sigma * alpha


def denoise_xt(denoise: DenoiseFn, x_t: Array, alpha: Array, sigma_t: Array, labels=None) -> Array:
  """Evaluates a denoiser on `x_t = alpha x + sigma_t eps` in the EDM frame."""
  return denoise(x_t / expand_to(alpha, x_t), sigma_t / alpha, labels)


# ----------------------------------------------------------------------------
# Noise-level distributions.


@dataclasses.dataclass(frozen=True)
class NoiseDist:
  """A distribution over EDM sigmas.

  kind:
    "lognormal":   `log sigma ~ N(p_mean, p_std^2)`, clipped to [sigma_min, sigma_max].
    "loguniform":  `log sigma ~ U(log sigma_min, log sigma_max)`.
    "edm_steps":   uniform over the EDM Heun discretisation with `num_steps` levels.
  """

  kind: str = "lognormal"
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  num_steps: int = 18
  rho: float = 7.0

  def __post_init__(self):
    if self.kind not in ("lognormal", "loguniform", "edm_steps"):
      raise ValueError(f"unknown noise distribution {self.kind!r}")
    if not 0 < self.sigma_min <= self.sigma_max:
      raise ValueError(f"need 0 < sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")

  def sample(self, rng: Array, shape: tuple[int, ...]) -> Array:
    if self.kind == "lognormal":
      n = jax.random.normal(rng, shape)
      sigma = jnp.exp(self.p_mean + self.p_std * n)
      return jnp.clip(sigma, self.sigma_min, self.sigma_max)
    if self.kind == "loguniform":
      return self.quantile(jax.random.uniform(rng, shape))
    grid = karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)[:-1]
    return grid[jax.random.randint(rng, shape, 0, self.num_steps)]

  def quantile(self, u: Array) -> Array:
    """The sigma at probability `u` in (0, 1) (the inverse CDF; `sample` of a uniform `u`)."""
    if self.kind == "lognormal":
      sigma = jnp.exp(self.p_mean + self.p_std * jax.scipy.special.ndtri(u))
      return jnp.clip(sigma, self.sigma_min, self.sigma_max)
    if self.kind == "loguniform":
      lo, hi = jnp.log(self.sigma_min), jnp.log(self.sigma_max)
      return jnp.exp(lo + (hi - lo) * u)
    grid = karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)[:-1]
    return grid[jnp.clip(jnp.floor(u * self.num_steps).astype(jnp.int32), 0, self.num_steps - 1)]


def noise_dist_from_config(cfg) -> NoiseDist:
  """Builds a `NoiseDist` from an ml_collections section with the same fields."""
  fields = {f.name for f in dataclasses.fields(NoiseDist)}
  return NoiseDist(**{k: v for k, v in dict(cfg).items() if k in fields})


def dsm_loss(
  denoise: DenoiseFn,
  x: Array,
  rng: Array,
  dist: NoiseDist,
  labels=None,
  sigma_data: float = 0.5,
) -> tuple[Array, Array]:
  """EDM denoising loss `lambda(sigma) ||D(x + sigma n) - x||^2`, per example.

  Returns `(loss [B], sigma [B])`; the loss is a per-example mean over dims.
  """
  rng_sigma, rng_noise = jax.random.split(rng)
  sigma = dist.sample(rng_sigma, (x.shape[0],))
  noise = jax.random.normal(rng_noise, x.shape, x.dtype)
  return dsm_loss_at(denoise, x, sigma, noise, labels, sigma_data), sigma


def dsm_loss_at(denoise: DenoiseFn, x: Array, sigma: Array, noise: Array, labels=None, sigma_data: float = 0.5):
  """`dsm_loss` at given noise levels `[B]` and standard-normal noise `[B, ...]`; returns `[B]`."""
  d = denoise(x + expand_to(sigma, x) * noise, sigma, labels)
  err = jnp.mean(jnp.reshape((d - x) ** 2, (x.shape[0], -1)), axis=-1)
  return edm_loss_weight(sigma, sigma_data) * err


# ----------------------------------------------------------------------------
# EDM Heun sampler.


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
  """EDM time steps `sigma_0 > ... > sigma_{N-1}`, followed by a final 0 (`[N + 1]`)."""
  i = jnp.arange(num_steps, dtype=jnp.float32)
  inv = 1.0 / rho
  t = (sigma_max**inv + i / max(num_steps - 1, 1) * (sigma_min**inv - sigma_max**inv)) ** rho
  return jnp.concatenate([t, jnp.zeros((1,), t.dtype)])


def heun_sample(
  denoise: DenoiseFn,
  noise: Array,
  labels=None,
  num_steps: int = 18,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
) -> Array:
  """Deterministic EDM Heun sampler (2 * num_steps - 1 network evaluations).

  `noise` is standard normal `[B, ...]`; it is scaled by `sigma_max` here.
  The loop is a `lax.scan`, the last step is Euler (sigma_next = 0).
  """
  sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
  batch = noise.shape[0]

  def step(x, ts):
    t_cur, t_next = ts
    d_cur = (x - denoise(x, jnp.full((batch,), t_cur), labels)) / t_cur
    x_euler = x + (t_next - t_cur) * d_cur

    def correct(_):
      t = jnp.maximum(t_next, 1e-12)
      d_next = (x_euler - denoise(x_euler, jnp.full((batch,), t), labels)) / t
      return x + (t_next - t_cur) * 0.5 * (d_cur + d_next)

    x_new = jax.lax.cond(t_next > 0, correct, lambda _: x_euler, None)
    return x_new, None

  x0 = noise * sigmas[0]
  x, _ = jax.lax.scan(step, x0, (sigmas[:-1], sigmas[1:]))
  return x


# ----------------------------------------------------------------------------
# Few-step students (generator.num_steps; docs/algorithms.md "Few-step students").


def student_sigmas(num_steps: int, sigma_init: float, sigma_min: float, rho: float = 7.0) -> tuple[float, ...]:
  """The default student grid: `num_steps` Karras levels from `sigma_init` down to `sigma_min`, then 0.

  `(sigma_init, 0.0)` for one step, so the one-step generator is the N = 1 case. Python floats
  (the grid is static: it is part of the step's configuration and of the export).
  """
  if num_steps == 1:
    return (float(sigma_init), 0.0)
  inv = 1.0 / rho
  lo, hi = sigma_min**inv, sigma_init**inv
  t = [(hi + i / (num_steps - 1) * (lo - hi)) ** rho for i in range(1, num_steps - 1)]
  return (float(sigma_init), *(float(s) for s in t), float(sigma_min), 0.0)  # both ends exact


def sub_grid(sigmas: tuple[float, ...], num_steps: int) -> tuple[float, ...]:
  """`num_steps` of a trained grid's `N = len(sigmas) - 1` levels, evenly spaced by index, then 0.

  Always the first level (the generator's input from pure noise) and, for two or more steps,
  the last trained one: `sub_grid(g, N) == g`, `sub_grid(g, 1) == (g[0], 0.0)`.
  """
  n = len(sigmas) - 1
  if not 1 <= num_steps <= n:
    raise ValueError(f"num_steps must be in [1, {n}] (the trained grid has {n} steps), got {num_steps}")
  if num_steps == 1:
    return (sigmas[0], 0.0)
  idx = sorted({round(i * (n - 1) / (num_steps - 1)) for i in range(num_steps)})
  return (*(sigmas[i] for i in idx), 0.0)


def student_sample(denoise: DenoiseFn, z: Array, sigmas: tuple[float, ...], noise: Array | None = None, labels=None):
  """The few-step student sampler: `len(sigmas) - 1` denoiser passes (its NFE).

  `z` `[B, ...]` is the first input, `sigma_0 * N(0, I)`. Step n predicts the clean image
  `x0_n = D(x_n, sigma_n)`; unless it is the last step, it re-noises with fresh noise,
  `x_{n+1} = x0_n + sigma_{n+1} * noise[n]` (`noise`: `[N - 1, B, ...]` standard normal, unused
  for one step). Returns the last prediction `[B, ...]`. One step is exactly `D(z, sigma_0)`.
  """
  b = z.shape[0]
  n = len(sigmas) - 1
  x = z
  for i in range(n):
    x0 = denoise(x, jnp.full((b,), sigmas[i]), labels)
    if i + 1 < n:
      x = x0 + sigmas[i + 1] * noise[i]
  return x0

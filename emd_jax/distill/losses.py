"""Generator losses (ALGORITHMS.md sections 4-6), each a function of `x0 = g(z)`.

Every loss here depends on the generator's parameters only through `x0`, so
the train step computes `dL/dx0` with `jax.value_and_grad` over `x0` and pulls
it back with the one generator VJP it already holds: no second generator
forward, no backprop into teacher or fake parameters.

Conventions: `x_t = alpha x0 + sigma eps` (per-example `alpha`, `sigma` `[B]`),
`y = D_psi(x_t) - D_T(x_t)` in denoiser units. Losses are sums over data
dimensions and means over the batch. Weights `w(t)` are per example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from emd_jax.diffusion import denoise_xt, edm_loss_weight, expand_to
from emd_jax.distill.distances import DISTANCES, make_direction
from emd_jax.distill.estep import EStepResult

Array = jax.Array
LOSSES = ("emd", "sim", "sid", "di", "dmd")
WEIGHTS = ("one", "sigma2", "inv_sigma2", "edm")


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """A resolved generator loss.

  name: "emd" (M-step on E-step samples), "sim", "sid", "di", "dmd".
  distance: SIM distance; for "emd", "linear" is EMD's own linear M-step and any
    other distance the normalised EMD + SIM direction of section 6.
  huber_c: pseudo-Huber `c` per sqrt(dimension): the constant used is
    `huber_c * sqrt(D)`, so one value serves 2-D points and images alike.
  """

  name: str = "emd"
  distance: str = "pseudo_huber"
  weight: str = "one"
  huber_c: float = 0.03
  huber_delta: float = 0.1
  power: int = 4
  sid_alpha: float = 1.2

  def __post_init__(self):
    problem = unknown_name(self.name, self.distance, self.weight)
    if problem:
      raise ValueError(": ".join(problem))

  def direction_fn(self, dim: int) -> Callable[[Array], Array]:
    c = self.huber_c * float(dim) ** 0.5
    return make_direction(self.distance, c=c, power=self.power, delta=self.huber_delta)


def unknown_name(name: str, distance: str, weight: str) -> tuple[str, str] | None:
  """The first of `loss.name`, `loss.distance`, `loss.weight` not in its table, as (field, message), else None.

  The one home of these rules: config validation reports them as a `ConfigError` naming the field, and a
  `LossSpec` built by hand raises the same message.
  """
  for field, what, value, known in (
    ("loss.name", "loss", name, LOSSES),
    ("loss.distance", "distance", distance, DISTANCES),
    ("loss.weight", "weight", weight, WEIGHTS),
  ):
    if value not in known:
      return field, f"unknown {what} {value!r}; known: {known}"
  return None


def loss_weight(kind: str, alpha: Array, sigma: Array, sigma_data: float = 0.5) -> Array:
  """`w(t)` per example `[B]`; 'sigma2' is `sigma^2 / alpha^2`."""
  if kind == "one":
    return jnp.ones_like(sigma)
  if kind == "sigma2":
    return (sigma / alpha) ** 2
  if kind == "inv_sigma2":
    return (alpha / sigma) ** 2
  if kind == "edm":
    return edm_loss_weight(sigma / alpha, sigma_data)
  raise ValueError(f"unknown loss.weight {kind!r}; known: {WEIGHTS}")


def _inner(a: Array, b: Array) -> Array:
  """Per-example inner product `[B]`."""
  return jnp.sum(jnp.reshape(a * b, (a.shape[0], -1)), axis=-1)


def _sqnorm(a: Array) -> Array:
  return _inner(a, a)


def emd_direction(
  spec: LossSpec, estep: EStepResult, alpha: Array, sigma: Array, gamma_eps: float, num_steps: int
) -> Array:
  """The fixed M-step direction `c` with `loss = -w <c, g(z_K)>` (section 4 and 6).

  linear:   c = (alpha / sigma) eps_nc
  distance: v = (sigma / alpha) eps_nc / (1 - (1 - gamma_eps)^K),  c = d'(v)
  """
  eps_nc = estep.eps_nc
  if spec.distance == "linear":
    return expand_to(alpha / sigma, eps_nc) * eps_nc
  scale = 1.0 / (1.0 - (1.0 - gamma_eps) ** num_steps)
  v = expand_to(sigma / alpha, eps_nc) * eps_nc * scale
  return spec.direction_fn(eps_nc[0].size)(v)


def _denoise_pair(teacher_fn: Callable, fake_fn: Callable, x_t: Array, alpha: Array, sigma: Array):
  """`(D_T(x_t), D_psi(x_t))`, both float32: the score gap is formed in float32 from networks of one dtype."""
  d_t = denoise_xt(teacher_fn, x_t, alpha, sigma).astype(jnp.float32)
  d_f = denoise_xt(fake_fn, x_t, alpha, sigma).astype(jnp.float32)
  return d_t, d_f


def generator_loss(
  spec: LossSpec,
  x0: Array,
  *,
  teacher_fn: Callable,
  fake_fn: Callable,
  alpha: Array,
  sigma: Array,
  eps: Array,
  estep: EStepResult | None = None,
  gamma_eps: float = 0.0,
  num_estep: int = 0,
  sigma_data: float = 0.5,
) -> tuple[Array, dict]:
  """Scalar generator loss as a function of `x0` `[B, ...]`, and scalar metrics.

  `eps` is the noise of `x_t` for the losses that evaluate the denoisers here
  (sim, sid, di, dmd; for sim after an E-step, pass the chain's final eps).
  """
  w = loss_weight(spec.weight, alpha, sigma, sigma_data)  # [B]
  metrics = {}
  if spec.name == "emd":
    if estep is None:
      raise ValueError("loss 'emd' needs an E-step: set estep.num_steps >= 1")
    c = jax.lax.stop_gradient(emd_direction(spec, estep, alpha, sigma, gamma_eps, num_estep))
    per_example = -w * _inner(c, x0)
    metrics["loss/direction_norm"] = jnp.mean(jnp.sqrt(_sqnorm(c)))
    return jnp.mean(per_example), metrics

  if spec.name in ("di", "dmd"):
    x_t = expand_to(alpha, x0) * jax.lax.stop_gradient(x0) + expand_to(sigma, x0) * eps
    d_t, d_f = _denoise_pair(teacher_fn, fake_fn, x_t, alpha, sigma)
    if spec.name == "dmd":
      norm = jnp.mean(jnp.abs(jnp.reshape(x0 - d_t, (x0.shape[0], -1))), axis=-1)
      w = w / jnp.maximum(norm, 1e-8)
    c = jax.lax.stop_gradient(expand_to(w, x0) * (d_t - d_f))
    metrics["loss/score_gap"] = jnp.mean(jnp.sqrt(_sqnorm(d_t - d_f)))
    return -jnp.mean(_inner(c, x0)), metrics

  # sim / sid: gradient through x0 and through x_t into both denoisers' inputs.
  x_t = expand_to(alpha, x0) * x0 + expand_to(sigma, x0) * eps
  d_t, d_f = _denoise_pair(teacher_fn, fake_fn, x_t, alpha, sigma)
  y = d_f - d_t
  metrics["loss/score_gap"] = jax.lax.stop_gradient(jnp.mean(jnp.sqrt(_sqnorm(y))))
  if spec.name == "sim":
    per_example = -_inner(spec.direction_fn(x0[0].size)(y), d_f - x0)
  else:  # SiD: (1 - alpha)||D_T - D_psi||^2 + <D_T - D_psi, D_psi - x0>
    per_example = (1.0 - spec.sid_alpha) * _sqnorm(y) - _inner(y, d_f - x0)
  return jnp.mean(w * per_example), metrics

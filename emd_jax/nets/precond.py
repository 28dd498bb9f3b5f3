"""EDM's preconditioning wrappers (EDMPrecond, VPPrecond, VEPrecond) as Flax modules.

Each wraps a raw network `F` as a denoiser `D(x, sigma) = c_skip x + c_out F(c_in x,
c_noise)` in EDM's frame (data in [-1, 1], `sigma` the EDM noise level). The raw
network is the child named `model`, as in EDM, so parameter paths line up with
EDM's `model.*` state-dict keys. The output is float32 whatever the network's
compute dtype.

Call: `module.apply({'params': p}, x [B, H, W, C], sigma [B] or scalar,
labels [B, label_dim] or None, train=False, augment_labels=None)`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class _Precond(nn.Module):
  """Shared call logic; subclasses define `coefficients(sigma)`."""

  model: nn.Module
  label_dim: int = 0

  def coefficients(self, sigma: Array) -> tuple[Array, Array, Array, Array]:
    raise NotImplementedError

  def __call__(
    self,
    x: Array,
    sigma: Array,
    labels: Array | None = None,
    train: bool = False,
    augment_labels: Array | None = None,
  ) -> Array:
    x = x.astype(jnp.float32)
    b = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (b,))
    if self.label_dim:
      labels = jnp.zeros((b, self.label_dim)) if labels is None else labels
      labels = jnp.asarray(labels, jnp.float32).reshape(b, self.label_dim)
    else:
      labels = None
    c_skip, c_out, c_in, c_noise = self.coefficients(sigma)  # each [B]
    col = lambda c: jnp.asarray(c, jnp.float32).reshape(-1, 1, 1, 1)
    dtype = self.model.dtype
    f = self.model((col(c_in) * x).astype(dtype), c_noise, labels, train=train, augment_labels=augment_labels)
    return col(c_skip) * x + col(c_out) * f.astype(jnp.float32)


class EDMPrecond(_Precond):
  """EDM's own preconditioning (ALGORITHMS.md section 1)."""

  sigma_data: float = 0.5
  sigma_min: float = 0.0
  sigma_max: float | None = None  # None: unbounded

  def coefficients(self, sigma):
    sd = self.sigma_data
    s2 = sigma**2 + sd**2
    return sd**2 / s2, sigma * sd / jnp.sqrt(s2), 1.0 / jnp.sqrt(s2), jnp.log(sigma) / 4


class VPPrecond(_Precond):
  """Variance-preserving preconditioning of Song et al. (DDPM++ 'VP' teachers)."""

  beta_d: float = 19.9
  beta_min: float = 0.1
  M: int = 1000
  epsilon_t: float = 1e-5

  def sigma_of_t(self, t):
    return np.sqrt(np.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1)

  def sigma_inv(self, sigma: Array) -> Array:
    bm, bd = self.beta_min, self.beta_d
    return (jnp.sqrt(bm**2 + 2 * bd * jnp.log(1 + sigma**2)) - bm) / bd

  @property
  def sigma_min(self) -> float:
    return float(self.sigma_of_t(self.epsilon_t))

  @property
  def sigma_max(self) -> float:
    return float(self.sigma_of_t(1.0))

  def coefficients(self, sigma):
    one = jnp.ones_like(sigma)
    return one, -sigma, 1.0 / jnp.sqrt(sigma**2 + 1), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
  """Variance-exploding preconditioning of Song et al. (NCSN++ 'VE' teachers)."""

  sigma_min: float = 0.02
  sigma_max: float = 100.0

  def coefficients(self, sigma):
    one = jnp.ones_like(sigma)
    return one, sigma, one, jnp.log(0.5 * sigma)


def make(spec: dict, net: nn.Module) -> _Precond:
  """Wraps a raw network per a completed spec's `precond` ('edm', 'vp' or 've')."""
  kind, ld = spec["precond"], spec.get("label_dim", 0)
  if kind == "edm":
    return EDMPrecond(
      model=net,
      label_dim=ld,
      sigma_data=spec["sigma_data"],
      sigma_min=spec["sigma_min"],
      sigma_max=spec["sigma_max"],
    )
  if kind == "vp":
    return VPPrecond(
      model=net,
      label_dim=ld,
      beta_d=spec["beta_d"],
      beta_min=spec["beta_min"],
      M=spec["M"],
      epsilon_t=spec["epsilon_t"],
    )
  if kind == "ve":
    return VEPrecond(model=net, label_dim=ld, sigma_min=spec["sigma_min"], sigma_max=spec["sigma_max"])
  raise ValueError(f"unknown precond {kind!r}")

"""The online ("fake") denoiser: EDM denoising updates on generator samples."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from emd_jax.diffusion import dsm_loss_at

Array = jax.Array


def dsm_loss_and_grad(net_apply: Callable, params, x: Array, sigma: Array, noise: Array, labels, sigma_data: float):
  """Mean EDM denoising loss of `net_apply(params, ...)` on `stop_grad(x)` and its gradient.

  `sigma` `[B]` and `noise` `[B, ...]` are given, so callers control the randomness.
  """
  x = jax.lax.stop_gradient(x)

  def loss_fn(p):
    den = lambda xx, s, lab: net_apply(p, xx, s, labels)  # noqa: E731
    return jnp.mean(dsm_loss_at(den, x, sigma, noise, labels, sigma_data))

  return jax.value_and_grad(loss_fn)(params)

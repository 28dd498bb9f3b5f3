"""Exponential moving averages of parameters (the generator's and the teacher's EMA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def ema_update(ema, params, decay):
  """`decay * ema + (1 - decay) * params`, leaf by leaf (`decay` a float or a traced scalar)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def debiased_decay(decay: float, num_updates: Array) -> Array:
  """The decay that makes the EMA the normalised average over `num_updates` accepted updates.

  With `d_n = d (1 - d^(n-1)) / (1 - d^n)` the average after `n` updates is
  `sum_k d^(n-k) p_k / sum_k d^(n-k)` over `k = 1..n`: the initial weights carry no weight (as
  Adam corrects its moments). `n = 1` copies `p_1`.
  """
  n = jnp.asarray(num_updates, jnp.float32)
  return decay * (1.0 - decay ** (n - 1.0)) / (1.0 - decay**n)


def warmup_decay(decay: float, step: Array) -> Array:
  """`min(decay, (1 + step) / (10 + step))`: early averages forget a random initialisation quickly."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))

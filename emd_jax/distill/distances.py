"""The SIM distance family (ALGORITHMS.md section 5): `d(y)` and `d'(y)` per example.

`y` is `[B, ...]`; norms run over all non-batch dimensions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
DISTANCES = ("linear", "l2", "power", "pseudo_huber", "huber", "l1")


def _sqnorm(y: Array) -> Array:
  """Per-example squared norm, broadcastable against y."""
  axes = tuple(range(1, y.ndim))
  return jnp.sum(y**2, axis=axes, keepdims=True)


def distance(name: str, y: Array, c: float = 1.0, power: int = 4, delta: float = 1.0) -> Array:
  """`d(y)` per example, `[B]`."""
  axes = tuple(range(1, y.ndim))
  if name == "linear":
    raise ValueError("'linear' has no distance d(y): it is the identity direction d'(y) = y")
  if name == "l2":
    return jnp.sum(y**2, axis=axes)
  if name == "power":
    return jnp.sum(jnp.abs(y) ** power, axis=axes)
  if name == "pseudo_huber":
    return jnp.sqrt(jnp.sum(y**2, axis=axes) + c**2) - c
  if name == "huber":
    a = jnp.abs(y)
    return jnp.sum(jnp.where(a <= delta, 0.5 * y**2, delta * (a - 0.5 * delta)), axis=axes)
  if name == "l1":
    return jnp.sum(jnp.abs(y), axis=axes)
  raise ValueError(f"unknown distance {name!r}; known: {DISTANCES}")


def direction(name: str, y: Array, c: float = 1.0, power: int = 4, delta: float = 1.0) -> Array:
  """`d'(y)`, same shape as `y`: the gradient of `d` (identity for 'linear')."""
  if name == "linear":
    return y
  if name == "l2":
    return 2.0 * y
  if name == "power":
    if power % 2:
      raise ValueError(f"loss.power must be even, got {power}")
    return power * y ** (power - 1)
  if name == "pseudo_huber":
    return y / jnp.sqrt(_sqnorm(y) + c**2)
  if name == "huber":
    return jnp.clip(y, -delta, delta)
  if name == "l1":
    return jnp.sign(y)
  raise ValueError(f"unknown distance {name!r}; known: {DISTANCES}")


def make_direction(name: str, c: float = 1.0, power: int = 4, delta: float = 1.0) -> Callable:
  """`d'` with its hyper-parameters bound; validates the name eagerly."""
  if name not in DISTANCES:
    raise ValueError(f"unknown distance {name!r}; known: {DISTANCES}")
  return lambda y: direction(name, y, c=c, power=power, delta=delta)

"""Randomised low-discrepancy draws: the train step's batches with less Monte Carlo noise.

A batch of `B` i.i.d. draws puts `B p +- sqrt(B p (1 - p))` of its points in a region of
probability `p`; the generator and the fake score learn, among other things, *how much* of the
latent space goes where from such counts. `lattice_uniform(rng, n, dim)` gives `n` points of a
Kronecker (rank-1) lattice `frac(i alpha + s)` with the R_d generator `alpha_j = phi_d^-(j+1)`
(phi_d the positive root of `x^(d+1) = x + 1`) and a uniform random shift `s` per coordinate; the
train step (`draws = "stratified"`, `distill/step.py`) maps each point's coordinates to one
example's latent, forward noise and noise levels (normal and noise-level quantiles).

The random shift makes every single point exactly uniform on `[0, 1)^dim` (on the 2^-32 grid the
arithmetic runs on), so any per-example average stays an unbiased estimate; only the points'
dependence within a batch changes. The lattice runs in 32-bit fixed point (`uint32` products wrap
modulo 2^32), so it is exact for any batch size; float32 `i * alpha` would lose the fraction once
`i` is in the thousands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_TWO32 = 2.0**32


@functools.cache
def r_sequence_generator(dim: int) -> tuple[int, ...]:
  """The R_d generator `alpha_j = phi_d^-(j+1) mod 1` as 32-bit fixed-point integers `[dim]`."""
  if dim < 1:
    raise ValueError(f"lattice dimension must be >= 1, got {dim}")
  lo, hi = 1.0, 2.0  # bisection on (d + 1) log x - log(x + 1), which rises through 0 in (1, 2)
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if (dim + 1) * np.log(mid) < np.log1p(mid) else (lo, mid)
  phi = 0.5 * (lo + hi)
  alpha = np.array([phi ** -(j + 1) for j in range(dim)], np.float64) % 1.0
  return tuple(int(a * _TWO32) % (1 << 32) for a in alpha)


def _to_unit(bits: Array) -> Array:
  """uint32 fixed-point fractions to float32 in `[2^-24, 1 - 2^-24]` (never 0 or 1)."""
  return (jnp.right_shift(bits, 9).astype(jnp.float32) + 0.5) * (2.0**-23)


def lattice_uniform(rng: Array, n: int, dim: int) -> Array:
  """`[n, dim]` randomly shifted rank-1 lattice points; each point is uniform on `[0, 1)^dim`."""
  gen = jnp.asarray(np.array(r_sequence_generator(dim), np.uint32))
  shift = jax.random.bits(rng, (dim,), jnp.uint32)
  i = jnp.arange(n, dtype=jnp.uint32)[:, None]
  return _to_unit(i * gen[None, :] + shift[None, :])  # uint32 arithmetic wraps: frac(i alpha + s)


__all__ = ["lattice_uniform", "r_sequence_generator"]

"""UD2M's small discriminator and its losses (ALGORITHMS.md section 7).

A plain strided CNN scores an image (optionally concatenated with the
back-projected measurement, a conditional critic of `(x, y)` pairs):

  conv(w) -> [leaky_relu, conv(2^i w, stride 2)] x levels -> mean-pool -> dense(1)

Losses (non-saturating GAN, Goodfellow et al. 2014; R1 of Mescheder et al. 2018):

  discriminator   softplus(D(fake)) + softplus(-D(real)) + (r1 / 2) ||grad_x D(real)||^2
  generator       softplus(-D(fake))

The R1 penalty is zero-centred and taken on real images only. No
normalisation layers: the penalty is per example, and group/batch statistics
would couple examples across the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class Discriminator(nn.Module):
  """`[B, H, W, C] -> [B]` logits (real > 0)."""

  width: int = 32
  levels: int = 2

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.Conv(self.width, (3, 3), name="conv_in")(x)
    for i in range(self.levels):
      h = nn.leaky_relu(h, 0.2)
      h = nn.Conv(self.width * 2 ** (i + 1), (4, 4), strides=(2, 2), name=f"down{i}")(h)
    h = nn.leaky_relu(h, 0.2).mean(axis=(1, 2))  # [B, F]
    return nn.Dense(1, name="out")(h)[:, 0]


def discriminator_input(x: Array, cond: Array | None) -> Array:
  """`x` alone, or `[x, cond]` along channels (conditional critic)."""
  return x if cond is None else jnp.concatenate([x, cond], axis=-1)


def discriminator_loss(
  apply: Callable[[Array], Array], real: Array, fake: Array, r1_gamma: float
) -> tuple[Array, dict[str, Array]]:
  """Non-saturating discriminator loss + zero-centred R1 on `real`; returns (scalar, metrics).

  `apply(x) -> [B]` logits with the discriminator's parameters bound.
  """
  batch = real.shape[0]

  def summed(x):
    logits = apply(x)  # [B]; each logit depends on its own example only, so grad of the sum is per example
    return jnp.sum(logits), logits

  (_, logits_real), grad_real = jax.value_and_grad(summed, has_aux=True)(real)
  logits_fake = apply(fake)  # [B]
  r1 = jnp.sum(jnp.reshape(grad_real**2, (batch, -1)), axis=-1)  # [B]
  loss = jnp.mean(jax.nn.softplus(logits_fake) + jax.nn.softplus(-logits_real) + 0.5 * r1_gamma * r1)
  metrics = {
    "disc/logit_real": jnp.mean(logits_real),
    "disc/logit_fake": jnp.mean(logits_fake),
    "disc/r1": jnp.mean(r1),
  }
  return loss, metrics


def generator_adversarial_loss(logits_fake: Array) -> Array:
  """Non-saturating generator loss per example `[B]`: `softplus(-D(fake))`."""
  return jax.nn.softplus(-logits_fake)

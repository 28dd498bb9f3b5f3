"""Network surrogate of an analytic teacher: the student's starting point.

Section 2 initialises generator and fake denoiser from the teacher's weights.
An analytic teacher has none, so the student architecture is first regressed
onto the exact teacher denoiser: `min E ||D_net(x + sigma n, sigma) - D_T(x + sigma n, sigma)||^2`
with EDM weighting, `x` exact teacher samples, `sigma` EDM-lognormal. The
target is exact (no denoising noise), so a few hundred steps suffice. The
whole loop is one jitted `lax.scan`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from emd_jax.diffusion import NoiseDist, edm_loss_weight, expand_to

Array = jax.Array


def fit_surrogate(
  rng: Array,
  net_apply: Callable,
  params,
  teacher_apply: Callable,
  teacher_params,
  sample_fn: Callable[[Array, int], Array],
  *,
  steps: int,
  batch_size: int = 512,
  lr: float = 1e-3,
  dist: NoiseDist | None = None,
  sigma_data: float = 0.5,
):
  """Regresses `net_apply(params, ...)` onto the teacher. Returns `(params, final_loss)`.

  `sample_fn(rng, n)` draws `n` exact data samples `[n, *data_shape]`.
  """
  if steps <= 0:
    return params, jnp.array(jnp.nan)
  dist = NoiseDist() if dist is None else dist
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss_fn(p, key):
    k_x, k_s, k_n = jax.random.split(key, 3)
    x = sample_fn(k_x, batch_size)
    sigma = dist.sample(k_s, (batch_size,))
    x_t = x + expand_to(sigma, x) * jax.random.normal(k_n, x.shape)
    target = teacher_apply(teacher_params, x_t, sigma, None)
    err = jnp.mean(jnp.reshape((net_apply(p, x_t, sigma, None) - target) ** 2, (batch_size, -1)), -1)
    return jnp.mean(edm_loss_weight(sigma, sigma_data) * err)

  def body(carry, key):
    p, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  @jax.jit
  def run(p, key):
    (p, _), losses = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(key, steps))
    return p, jnp.mean(losses[-max(steps // 10, 1) :])

  return run(params, rng)

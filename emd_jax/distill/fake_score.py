"""The online ("fake") denoiser: EDM denoising updates on generator samples."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from emd_jax.diffusion import NoiseDist, dsm_loss

Array = jax.Array


def fake_dsm_update(
  fake_apply: Callable,
  tx: optax.GradientTransformation,
  params,
  opt_state,
  x: Array,
  rng: Array,
  dist: NoiseDist,
  labels=None,
  sigma_data: float = 0.5,
):
  """One denoiser-training step of `D_psi` on fixed samples `x` (stop-gradient).

  Returns `(new_params, new_opt_state, loss, grad_norm, grads_finite)`.
  """
  x = jax.lax.stop_gradient(x)

  def loss_fn(p):
    per_example, _ = dsm_loss(lambda xx, s, lab: fake_apply(p, xx, s, lab), x, rng, dist, labels, sigma_data)
    return jnp.mean(per_example)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(loss) & all_finite(grads)
  return new_params, new_opt_state, loss, optax.global_norm(grads), finite


def all_finite(tree) -> Array:
  """True when every leaf of `tree` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)

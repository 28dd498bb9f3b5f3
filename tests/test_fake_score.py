"""The online denoiser's DSM update learns a fixed generator's exact noisy-marginal denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from gaussian_models import gaussian_denoiser_apply

from emd_jax.diffusion import NoiseDist
from emd_jax.distill.fake_score import dsm_loss_and_grad
from emd_jax.nets.mlp import MLPDenoiser


def test_fake_dsm_converges_to_exact_gaussian_denoiser():
  gen = {"mean": jnp.array([0.4, -0.2]), "cov": jnp.array([[0.20, 0.05], [0.05, 0.10]])}
  chol = jnp.linalg.cholesky(gen["cov"])
  net = MLPDenoiser(dim=2, hidden=64, depth=2, emb_dim=32)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  apply = lambda p, x, s, lab=None: net.apply({"params": p}, x, s)  # noqa: E731
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, 1500))
  dist = NoiseDist("lognormal", -1.2, 1.2)

  def body(carry, key):
    p, opt = carry
    k_x, k_s, k_n = jax.random.split(key, 3)
    x = gen["mean"] + jax.random.normal(k_x, (256, 2)) @ chol.T  # fixed generator's samples
    loss, grads = dsm_loss_and_grad(apply, p, x, dist.sample(k_s, (256,)), jax.random.normal(k_n, x.shape), None, 0.5)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  @jax.jit
  def train(p):
    (p, _), losses = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(jax.random.PRNGKey(1), 1500))
    return p, losses

  before = params
  params, losses = train(params)
  assert bool(jnp.all(jnp.isfinite(losses)))
  x = gen["mean"] + jax.random.normal(jax.random.PRNGKey(2), (512, 2)) @ chol.T
  for s in (0.05, 0.3, 1.0, 3.0):
    sig = jnp.full((512,), s)
    x_t = x + s * jax.random.normal(jax.random.PRNGKey(3), x.shape)
    exact = gaussian_denoiser_apply(gen, x_t, sig)
    err = float(jnp.sqrt(jnp.mean((apply(params, x_t, sig) - exact) ** 2)))
    err0 = float(jnp.sqrt(jnp.mean((apply(before, x_t, sig) - exact) ** 2)))
    scale = float(jnp.sqrt(jnp.mean((x_t - exact) ** 2)))  # what the denoiser has to remove
    assert err < 0.05 * max(scale, 0.1), (s, err, scale)
    assert err < 0.3 * err0
  np.testing.assert_array_less(np.mean(losses[-100:]), np.mean(losses[:100]))

"""EDM conventions: preconditioning, weights, schedules, noise levels, Heun."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emd_jax import diffusion


def test_edm_precond_matches_formulas():
  sigma = jnp.array([0.002, 0.5, 2.5, 80.0])
  c_skip, c_out, c_in, c_noise = diffusion.edm_precond(sigma, 0.5)
  s2 = sigma**2 + 0.25
  np.testing.assert_allclose(c_skip, 0.25 / s2, rtol=1e-6)
  np.testing.assert_allclose(c_out, sigma * 0.5 / jnp.sqrt(s2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / jnp.sqrt(s2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, jnp.log(sigma) / 4, rtol=1e-6)
  # The preconditioned target has unit variance at every sigma for data of std sigma_data:
  # Var[(x - c_skip (x + sigma n)) / c_out] = 1.
  var = ((1 - c_skip) ** 2 * 0.25 + c_skip**2 * sigma**2) / c_out**2
  np.testing.assert_allclose(var, 1.0, rtol=1e-5)


def test_edm_loss_weight_is_inverse_c_out_squared():
  sigma = jnp.array([0.01, 1.0, 10.0])
  _, c_out, _, _ = diffusion.edm_precond(sigma, 0.5)
  np.testing.assert_allclose(diffusion.edm_loss_weight(sigma, 0.5), 1 / c_out**2, rtol=1e-6)


def test_vp_schedule_is_variance_preserving_and_ve_is_identity():
  sigma = jnp.array([0.01, 1.0, 80.0])
  alpha, s = diffusion.Schedule("vp").alpha_sigma(sigma)
  np.testing.assert_allclose(alpha**2 + s**2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(s / alpha, sigma, rtol=1e-6)  # same EDM noise-to-signal ratio
  alpha, s = diffusion.Schedule("ve").alpha_sigma(sigma)
  np.testing.assert_allclose(alpha, 1.0)
  np.testing.assert_allclose(s, sigma)
  with pytest.raises(ValueError, match="schedule kind"):
    diffusion.Schedule("foo")


def test_noise_distributions_respect_ranges_and_moments():
  rng = jax.random.PRNGKey(0)
  d = diffusion.NoiseDist("lognormal", p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0)
  s = d.sample(rng, (200_000,))
  assert float(s.min()) >= 0.002 and float(s.max()) <= 80.0
  np.testing.assert_allclose(float(jnp.mean(jnp.log(s))), -1.2, atol=0.02)
  np.testing.assert_allclose(float(jnp.std(jnp.log(s))), 1.2, atol=0.02)
  clipped = diffusion.NoiseDist("lognormal", p_mean=0.0, p_std=3.0, sigma_min=0.1, sigma_max=2.0).sample(rng, (1000,))
  assert float(clipped.min()) == pytest.approx(0.1) and float(clipped.max()) == pytest.approx(2.0)
  u = diffusion.NoiseDist("loguniform", sigma_min=0.01, sigma_max=100.0).sample(rng, (100_000,))
  np.testing.assert_allclose(float(jnp.mean(jnp.log10(u))), 0.0, atol=0.03)
  grid = diffusion.NoiseDist("edm_steps", num_steps=18).sample(rng, (1000,))
  assert set(np.unique(np.asarray(grid))) <= set(np.asarray(diffusion.karras_sigmas(18)[:-1]))


def test_karras_sigmas_endpoints():
  t = diffusion.karras_sigmas(18, 0.002, 80.0, 7.0)
  assert t.shape == (19,)
  np.testing.assert_allclose([t[0], t[17], t[18]], [80.0, 0.002, 0.0], rtol=1e-5)
  assert bool(jnp.all(jnp.diff(t) < 0))


def _gaussian_denoiser(m, s, calls=None):
  def denoise(x, sigma, labels=None):
    if calls is not None:
      calls.append(1)
    return m + s**2 / (s**2 + sigma[:, None] ** 2) * (x - m)

  return denoise


def test_heun_uses_2n_minus_1_network_evaluations():
  calls = []
  with jax.disable_jit():  # scan and cond run eagerly: every call is counted
    diffusion.heun_sample(_gaussian_denoiser(0.0, 0.5, calls), jnp.ones((2, 1)), num_steps=18)
  assert len(calls) == 35


def test_heun_converges_to_the_exact_gaussian_marginal():
  """For Gaussian data the probability-flow ODE is linear: x(0) ~ N(m, s^2) exactly."""
  m, s = 0.3, 0.4
  noise = jax.random.normal(jax.random.PRNGKey(1), (20000, 1))
  x = diffusion.heun_sample(_gaussian_denoiser(m, s), noise, num_steps=128)
  np.testing.assert_allclose(float(jnp.mean(x)), m, atol=0.01)
  np.testing.assert_allclose(float(jnp.std(x)), s * float(jnp.std(noise)), rtol=0.005)
  x18 = diffusion.heun_sample(_gaussian_denoiser(m, s), noise, num_steps=18)
  np.testing.assert_allclose(float(jnp.std(x18)), s, rtol=0.07)  # 18-step discretisation error


def test_dsm_loss_is_zero_mean_error_for_exact_denoiser():
  """With the exact posterior-mean denoiser, the EDM loss equals its irreducible value."""
  s = 0.5  # data N(0, s^2): the weighted optimal loss is lambda * s^2 sigma^2 / (s^2 + sigma^2) = 1

  def exact(x, sigma, labels=None):
    return s**2 / (s**2 + sigma[:, None] ** 2) * x

  x = s * jax.random.normal(jax.random.PRNGKey(0), (100_000, 1))
  loss, _ = diffusion.dsm_loss(exact, x, jax.random.PRNGKey(1), diffusion.NoiseDist(), None, 0.5)
  np.testing.assert_allclose(float(jnp.mean(loss)), 1.0, rtol=0.02)

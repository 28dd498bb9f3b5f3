"""The E-step against closed-form Gaussian answers."""

import jax
import jax.numpy as jnp
import numpy as np
from gaussian_models import gaussian_denoiser_apply, joint_posterior_moments, linear_generator_marginal

from emd_jax.distill.estep import langevin_estep


def test_noise_cancellation_removes_exactly_the_injected_noise():
  """With a constant drift d, eps_K - N_K = (1 - (1 - g)^K) d exactly, for any noise draw."""
  shift = jnp.array([0.3, -0.2])
  alpha, sigma = jnp.full((64,), 1.0), jnp.full((64,), 0.5)
  # Teacher and fake differ by a constant in denoiser space: d = (alpha/sigma) (D_T - D_psi) = 2 shift.
  teacher = lambda x, s, lab=None: x * 0.5 + shift  # noqa: E731
  fake = lambda x, s, lab=None: x * 0.5  # noqa: E731
  eps0 = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  z0 = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  for k, g in [(1, 0.3), (5, 0.1), (16, 0.5)]:
    res = langevin_estep(
      jax.random.PRNGKey(k),
      eps0,
      z0,
      lambda z: z,
      teacher,
      fake,
      alpha,
      sigma,
      num_steps=k,
      gamma_eps=g,
      x0=z0,
    )
    expected = (1 - (1 - g) ** k) * 2 * shift
    np.testing.assert_allclose(res.eps_nc, jnp.broadcast_to(expected, eps0.shape), atol=1e-5)
    # Without cancellation the same chain keeps its noise.
    off = langevin_estep(
      jax.random.PRNGKey(k),
      eps0,
      z0,
      lambda z: z,
      teacher,
      fake,
      alpha,
      sigma,
      num_steps=k,
      gamma_eps=g,
      x0=z0,
      noise_cancellation=False,
    )
    np.testing.assert_allclose(off.eps - off.noise, res.eps_nc, atol=1e-5)
    assert float(jnp.std(off.eps_nc - res.eps_nc)) > 0.1


def test_k1_no_z_move_gives_gamma_times_score_gap():
  teacher = lambda x, s, lab=None: jnp.tanh(x)  # noqa: E731
  fake = lambda x, s, lab=None: 0.5 * x  # noqa: E731
  eps0 = jax.random.normal(jax.random.PRNGKey(0), (32, 3))
  z0 = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
  alpha, sigma = jnp.full((32,), 0.8), jnp.linspace(0.1, 2.0, 32)
  res = langevin_estep(
    jax.random.PRNGKey(2), eps0, z0, jnp.sin, teacher, fake, alpha, sigma, num_steps=1, gamma_eps=0.2, x0=jnp.sin(z0)
  )
  x_t = alpha[:, None] * jnp.sin(z0) + sigma[:, None] * eps0
  x_in, s_in = x_t / alpha[:, None], sigma / alpha
  d = (alpha / sigma)[:, None] * (teacher(x_in, s_in) - fake(x_in, s_in))
  np.testing.assert_allclose(res.eps_nc, 0.2 * d, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(res.z, z0)


def test_long_chains_reach_the_exact_joint_posterior():
  """Linear generator, Gaussian teacher, exact fake score: (eps, z) ~ the known Gaussian posterior.

  At a VP point (alpha = 0.6, sigma = 0.8) with sigma_z = 2.5, so that the latent's drift
  `(alpha / sigma) J^T d - z / sigma_z^2` is tested in both terms: without its `alpha`, or with
  `z / sigma_z`, the chain's stationary law moves by 0.2-0.4 in whitened covariance units (the
  discrete chain's own bias is 0.007, computed in closed form for these step sizes).
  The samples are whitened by the exact posterior, so the tolerances are in standard errors.
  """
  a_mat = jnp.array([[0.8, 0.3], [-0.2, 0.6]])
  b = jnp.array([0.1, -0.3])
  sigma_z = 2.5
  teacher_p = {"mean": jnp.array([0.5, 0.2]), "cov": jnp.array([[0.3, 0.1], [0.1, 0.2]])}
  fake_p = linear_generator_marginal(a_mat, b, sigma_z)
  alpha_v, sigma_v = 0.6, 0.8  # alpha^2 + sigma^2 = 1
  n = 4000
  alpha, sigma = jnp.full((n,), alpha_v), jnp.full((n,), sigma_v)
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  eps0 = jax.random.normal(k0, (n, 2))
  z0 = sigma_z * jax.random.normal(k1, (n, 2))

  @jax.jit
  def run(key):
    return langevin_estep(
      key,
      eps0,
      z0,
      lambda z: z @ a_mat.T + b,
      lambda x, s, lab=None: gaussian_denoiser_apply(teacher_p, x, s),
      lambda x, s, lab=None: gaussian_denoiser_apply(fake_p, x, s),
      alpha,
      sigma,
      num_steps=1500,
      gamma_eps=0.01,
      gamma_z=0.03,
      sigma_z=sigma_z,
      noise_cancellation=False,
    )

  res = run(k2)
  mean, cov = joint_posterior_moments(teacher_p["mean"], teacher_p["cov"], a_mat, b, sigma_z, alpha_v, sigma_v)
  whiten = np.linalg.inv(np.linalg.cholesky(cov))

  def whitened_moments(eps, z):
    u = (np.concatenate([np.asarray(eps), np.asarray(z)], axis=1) - mean) @ whiten.T
    return u.mean(0), np.cov(u.T)

  # Standard errors at n = 4000: 0.016 for the mean, 0.016-0.022 for the covariance entries.
  m_w, c_w = whitened_moments(res.eps, res.z)
  np.testing.assert_allclose(m_w, 0.0, atol=0.07)
  np.testing.assert_allclose(c_w, np.eye(4), atol=0.09)
  # The start (the generator's own joint) is far from the answer, so the test has power.
  m0, c0 = whitened_moments(eps0, z0)
  assert np.abs(m0).max() > 0.3 and np.abs(c0 - np.eye(4)).max() > 0.5

"""Randomised low-discrepancy draws (emd_jax/qmc.py, `draws = "stratified"`): each point exact, the
batch even, the step's estimates unbiased with less noise; the i.i.d. stream unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step_parts import NETS, TEACHER, config, linear_params

from emd_jax import qmc
from emd_jax.diffusion import NoiseDist, karras_sigmas
from emd_jax.distill import step as step_lib
from emd_jax.distill.losses import LossSpec


def test_r_sequence_generator_is_the_root_of_x_d1_eq_x_plus_1():
  """d = 1: the golden ratio's 1/phi = 0.6180...; d = 2: the plastic number 1.3247...; any d: the
  integer generator is frac(phi_d^-(j+1)) * 2^32 with phi_d^(d+1) = phi_d + 1."""
  assert abs(qmc.r_sequence_generator(1)[0] / 2**32 - (np.sqrt(5) - 1) / 2) < 1e-9
  plastic = 1.32471795724474602596
  np.testing.assert_allclose(np.array(qmc.r_sequence_generator(2)) / 2**32, [1 / plastic, 1 / plastic**2], atol=1e-9)
  for d in (5, 64, 3072):
    alpha = np.array(qmc.r_sequence_generator(d), np.float64) / 2**32
    phi = 1 / alpha[0]
    assert abs(phi ** (d + 1) - phi - 1) < 1e-6 * d
    np.testing.assert_allclose(alpha[1:], (phi ** -np.arange(2, d + 1)) % 1.0, atol=1e-9 * d)  # phi from 32 bits
  with pytest.raises(ValueError, match="dimension"):
    qmc.r_sequence_generator(0)


def test_lattice_points_are_frac_i_alpha_plus_shift_computed_in_float64():
  """The uint32 lattice against the formula in float64 numpy, at indices where float32 would fail."""
  n, d = 70000, 3
  u = np.asarray(qmc.lattice_uniform(jax.random.key(4), n, d), np.float64)
  alpha = np.array(qmc.r_sequence_generator(d), np.float64) / 2**32
  shift = np.asarray(jax.random.bits(jax.random.key(4), (d,), jnp.uint32), np.float64) / 2**32
  want = (np.arange(n)[:, None] * alpha[None] + shift[None]) % 1.0
  err = np.abs(u - want)
  np.testing.assert_array_less(np.minimum(err, 1 - err), 2e-7)  # on the circle: 0.99999 ~ 0.00001
  assert 0 < u.min() and u.max() < 1


def test_each_lattice_point_is_uniform_and_its_coordinates_independent():
  """Over random shifts, a fixed point (i = 37) is U[0, 1)^2: mean 1/2, variance 1/12, no correlation."""
  keys = jax.random.split(jax.random.key(0), 4000)
  u = np.asarray(jax.vmap(lambda k: qmc.lattice_uniform(k, 64, 2)[37])(keys))
  np.testing.assert_allclose(u.mean(0), 0.5, atol=0.015)
  np.testing.assert_allclose(u.var(0), 1 / 12, atol=0.005)
  assert abs(np.corrcoef(u.T)[0, 1]) < 0.05
  hist = np.histogram(u[:, 0], bins=10, range=(0, 1))[0] / len(u)
  np.testing.assert_allclose(hist, 0.1, atol=0.02)


def test_lattice_batch_counts_a_region_with_far_less_noise_than_iid():
  """The fraction of a batch of 512 normals in a box has a batch-to-batch std well under the binomial
  sqrt(p (1 - p) / 512) of i.i.d. draws, around the same mean p (the box's exact probability)."""
  keys = jax.random.split(jax.random.key(1), 300)
  box = lambda z: jnp.mean((z[:, 0] > 0.3) & (z[:, 1] < -0.2), axis=-1)  # noqa: E731
  normal = lambda k: jax.scipy.special.ndtri(qmc.lattice_uniform(k, 512, 2))  # noqa: E731
  frac = np.asarray(jax.vmap(lambda k: box(normal(k)))(keys))
  phi = lambda x: 0.5 * (1 + jax.scipy.special.erf(x / np.sqrt(2)))  # noqa: E731
  p = float((1 - phi(0.3)) * phi(-0.2))
  binom = np.sqrt(p * (1 - p) / 512)
  assert abs(frac.mean() - p) < 3 * binom / np.sqrt(len(keys))
  assert frac.std() < 0.45 * binom


def test_noise_quantiles_against_closed_forms():
  ln = NoiseDist("lognormal", -1.0, 0.5)
  phi1 = 0.5 * (1 + float(jax.scipy.special.erf(1 / np.sqrt(2))))  # P(N(0,1) < 1)
  np.testing.assert_allclose(ln.quantile(jnp.array([0.5, phi1])), [np.exp(-1.0), np.exp(-0.5)], rtol=1e-5)
  lu = NoiseDist("loguniform", sigma_min=0.01, sigma_max=100.0)
  np.testing.assert_allclose(lu.quantile(jnp.array([0.5, 0.25])), [1.0, 0.1], rtol=1e-5)
  steps = NoiseDist("edm_steps", num_steps=6)
  s = np.asarray(steps.quantile((jnp.arange(18) + 0.5) / 18))  # 3 per grid level, exactly
  levels, counts = np.unique(s, return_counts=True)
  np.testing.assert_allclose(np.sort(levels)[::-1], np.asarray(karras_sigmas(6))[:-1], rtol=1e-6)
  np.testing.assert_array_equal(counts, 3)


def test_draws_stratified_changes_only_the_streams_it_names_and_iid_is_unchanged():
  """iid: the latents are sigma_init * normal(split(key, 8)[1]) as before the option existed.
  stratified: same shapes, the first fake batch still the generator's, each example's (z, eps,
  sigma, ...) one point of a lattice: its noise levels fill the distribution's quantiles evenly."""
  key = jax.random.key(7)
  iid = step_lib.draw_randomness(config(batch_size=64, fake_steps=2), key)
  k = jax.random.split(key, 8)
  np.testing.assert_array_equal(iid.z, 1.5 * jax.random.normal(k[1], (64, 3)))
  np.testing.assert_array_equal(iid.fake_noise, jax.random.normal(k[7], (2, 64, 3)))
  st = step_lib.draw_randomness(config(batch_size=64, fake_steps=2, draws="stratified"), key)
  for name in ("z", "eps", "sigma", "fake_z", "fake_sigma", "fake_noise"):
    assert getattr(st, name).shape == getattr(iid, name).shape, name
  np.testing.assert_array_equal(st.fake_z[0], st.z)
  assert not np.allclose(st.fake_z[1], st.z)
  np.testing.assert_array_equal(jax.random.key_data(st.chain_keys), jax.random.key_data(iid.chain_keys))
  # The lattice's first point, recomputed: z, eps, fake_noise[0] are the probits of its coordinates.
  u = np.asarray(qmc.lattice_uniform(k[1], 64, 3 * 3 + 2), np.float64)
  np.testing.assert_allclose(st.z / 1.5, jax.scipy.special.ndtri(u[:, :3]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st.fake_noise[0], jax.scipy.special.ndtri(u[:, 6:9]), rtol=1e-5, atol=1e-5)
  for levels, iid_levels in ((st.sigma, iid.sigma), (st.fake_sigma[1], iid.fake_sigma[1])):
    # log sigma ~ N(-0.5, 1): the largest gap between the batch's sorted quantiles is a few / 64
    # (three-gap theorem); i.i.d. draws leave gaps of about log(64) / 64.
    gap = lambda v: np.max(np.diff(np.sort(np.r_[0.0, ndtr(np.log(np.asarray(v)) + 0.5), 1.0])))  # noqa: E731
    assert gap(levels) < 2.5 / 64 < gap(iid_levels), (gap(levels), gap(iid_levels))


def ndtr(x):
  return 0.5 * (1 + np.asarray(jax.scipy.special.erf(np.asarray(x) / np.sqrt(2))))


def test_stratified_generator_gradient_is_unbiased_with_less_noise():
  """Diff-Instruct through a linear generator (test_step_parts' setting): over 400 steps' draws the
  stratified gradient's mean agrees with the i.i.d. one within their standard errors, and its
  step-to-step spread is smaller."""
  gen, fake = linear_params(0), linear_params(1)
  keys = jax.random.split(jax.random.key(11), 400)

  def grads(draws):
    cfg = config(batch_size=64, loss=LossSpec("di", "linear", "one"), draws=draws)

    def one(k):
      d = step_lib.draw_randomness(cfg, k)
      g = step_lib.generator_grads(cfg, NETS, gen, fake, TEACHER, d)[1]
      return jnp.concatenate([g["A"].ravel(), g["b"]])

    return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)

  g_iid, g_st = grads("iid"), grads("stratified")
  se = np.sqrt(g_iid.var(0) / len(keys) + g_st.var(0) / len(keys))
  assert np.all(np.abs(g_iid.mean(0) - g_st.mean(0)) < 4.5 * se), (g_iid.mean(0), g_st.mean(0), se)
  assert g_st.std(0).mean() < 0.92 * g_iid.std(0).mean()  # measured 0.87x at batch 64 (7-D draws)

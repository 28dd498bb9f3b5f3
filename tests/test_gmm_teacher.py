"""The analytic Gaussian-mixture teacher is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emd_jax import teachers
from emd_jax.diffusion import heun_sample
from emd_jax.evaluators.gmm import gmm_metrics
from emd_jax.teachers import gmm


@pytest.fixture(scope="module")
def default_gmm():
  from configs.gmm import get_config

  return teachers.from_config(get_config().teacher)


def test_default_config_teacher_matches_the_issue(default_gmm):
  p = default_gmm.params
  angles = 2 * np.pi * np.arange(8) / 8
  np.testing.assert_allclose(p["means"], np.stack([np.cos(angles), np.sin(angles)], 1), atol=1e-6)
  np.testing.assert_allclose(p["stds"], 0.05)
  np.testing.assert_allclose(np.exp(p["log_weights"]), (np.arange(8) + 1) / 36, rtol=1e-6)
  assert default_gmm.data_shape == (2,)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5, 2.0])
def test_denoiser_equals_numerical_posterior_mean(default_gmm, sigma):
  """E[x0 | x_t] by quadrature on a fine grid over x0 (2-D), against the closed form."""
  p = jax.device_get(default_gmm.params)
  h = min(0.004, sigma / 8)
  lim = 1.3 + 0.0
  ax = np.arange(-lim, lim, h)
  g = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)  # candidate x0
  log_p0 = np.asarray(gmm.log_prob(p, jnp.asarray(g)))
  rng = np.random.default_rng(0)
  x_t = rng.uniform(-1.2, 1.2, (5, 2)).astype(np.float32)
  numeric = []
  for x in x_t:
    logw = log_p0 - np.sum((g - x) ** 2, -1) / (2 * sigma**2)
    w = np.exp(logw - logw.max())
    numeric.append((w[:, None] * g).sum(0) / w.sum())
  exact = np.asarray(gmm.denoise(p, jnp.asarray(x_t), jnp.full((5,), sigma)))
  np.testing.assert_allclose(exact, np.stack(numeric), atol=2e-3)


def test_score_is_gradient_of_log_density(default_gmm):
  p = default_gmm.params
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  sigma = jnp.full((16,), 0.3)
  auto = jax.grad(lambda xx: jnp.sum(gmm.log_prob(p, xx, sigma)))(x)
  np.testing.assert_allclose(gmm.score(p, x, sigma), auto, rtol=1e-4, atol=1e-4)


def test_heun_sampling_reproduces_mode_masses(default_gmm):
  noise = jax.random.normal(jax.random.PRNGKey(0), (20000, 2))
  x = jax.jit(lambda n: heun_sample(default_gmm.bind(), n, num_steps=18))(noise)
  m = gmm_metrics(np.asarray(x), jax.device_get(default_gmm.params))
  assert m["gmm/mode_mass_tv"] < 0.02  # sampling floor for 20k samples is ~0.009
  assert m["gmm/dropped_modes"] == 0
  assert m["gmm/inside_fraction"] > 0.99
  assert 0.9 < m["gmm/spread_ratio"] < 1.1


def test_exact_samples_score_perfectly(default_gmm):
  x, _ = gmm.sample(default_gmm.params, jax.random.PRNGKey(3), 20000)
  m = gmm_metrics(np.asarray(x), jax.device_get(default_gmm.params))
  assert m["gmm/mode_mass_tv"] < 0.02 and m["gmm/inside_fraction"] > 0.999
  assert 0.97 < m["gmm/spread_ratio"] < 1.03
  assert m["gmm/sliced_wasserstein"] < 0.02
  # 2-D isotropic: P(r > 3.7 std) = exp(-3.7^2 / 2) = 0.00106; the basin holds all but ~e^-29.
  assert abs(m["gmm/off_mode_fraction"] - np.exp(-(3.7**2) / 2)) < 0.001
  assert 0.97 < m["gmm/basin_spread_ratio"] < 1.03


def test_off_mode_and_basin_spread_see_a_tail(default_gmm):
  """A sharp core plus a tail between modes: the core spread is low, the basin spread high."""
  p = jax.device_get(default_gmm.params)
  rng = np.random.default_rng(0)
  means = np.asarray(p["means"])
  core = means[0] + 0.025 * rng.standard_normal((7500, 2))  # a half-width core at mode 0
  # 20% of the points on the bridge from mode 0 towards mode 1, 5-7.5 std from mode 0 (inside its basin).
  t = rng.uniform(0.25, 0.375, size=(2500, 1))
  bridge = means[0] + t * (means[1] - means[0]) / np.linalg.norm(means[1] - means[0])
  m = gmm_metrics(np.concatenate([core, bridge]), p)
  assert abs(m["gmm/off_mode_fraction"] - 0.25) < 0.01
  assert m["gmm/spread_ratio"] < 0.6  # the 4-std core alone: about 0.5
  # basin: sqrt(0.75 * 0.25 + 0.25 * E[r^2] / 2) with r = t / 0.05 in [5, 7.5]
  r2 = ((0.25 / 0.05) ** 2 + (0.25 / 0.05) * (0.375 / 0.05) + (0.375 / 0.05) ** 2) / 3
  assert abs(m["gmm/basin_spread_ratio"] - np.sqrt(0.75 * 0.25 + 0.25 * r2 / 2)) < 0.05


def test_bad_teacher_fields_raise_clear_errors():
  with pytest.raises(ValueError, match="teacher.weights"):
    gmm.make_params(num_modes=3, weights=[1.0, 2.0])
  with pytest.raises(ValueError, match="teacher.std"):
    gmm.make_params(std=-1.0)

"""The generator's centred input (`generator.latent_mean`, distill/latent_mean.py): `g(z) = D(mu + z, sigma_init)`."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, gmm_tiny, init_student_params

from emd_jax.config.validation import ConfigError
from emd_jax.distill import latent_mean
from emd_jax.distill import step as step_lib
from emd_jax.distill.state import create_state
from emd_jax.errors import UserInputError
from emd_jax.formats import generator_export as export_lib
from emd_jax.jobs import distill


def gaussian_denoiser(means, s):
  """The exact denoiser of `N(m_k, s^2 I)` (class k; one class if `means` is one vector), written out."""
  means = jnp.asarray(means, jnp.float32)

  def denoise(x, sigma, labels=None):
    m = means if labels is None else labels @ means
    c = (s**2 / (s**2 + sigma**2))[:, None]
    return m + c * (x - m)

  return denoise


def test_fixed_point_of_a_gaussian_teacher_is_its_mean_and_contracts_at_the_analytic_rate():
  """For `N(m, s^2 I)` the iteration `mu <- E[D(mu + z)]` is affine with slope `c = s^2 / (s^2 + sigma^2)`: the
  fixed point is `m` (up to `c` times the draws' own mean) and each change is `c` times the one before."""
  m = np.array([0.7, -0.4, 0.1, -0.9], np.float32)
  s, sigma, n = 0.5, 1.0, 4096
  c = s**2 / (s**2 + sigma**2)
  mu, changes = latent_mean.tweedie_fixed_point(
    gaussian_denoiser(m, s), (4,), sigma, jax.random.key(0), n, iters=12, batch_size=1000
  )
  eps = jax.random.normal(jax.random.key(0), (n, 4))
  # The exact fixed point of the empirical iteration: mu = m + c (mu - m) + c sigma mean(eps).
  want = m + c * sigma * np.asarray(eps.mean(0)) / (1 - c)
  np.testing.assert_allclose(mu, want, atol=1e-5)
  assert np.linalg.norm(mu - m) < 4 * c * sigma / (1 - c) / np.sqrt(n) * 2  # within sampling error of m
  ratios = np.asarray(changes[1:6]) / np.asarray(changes[:5])
  np.testing.assert_allclose(ratios, c, rtol=1e-3)
  assert changes[0] == pytest.approx(np.linalg.norm(m + c * sigma * np.asarray(eps.mean(0)) - c * m), rel=1e-4)


def test_conditional_teacher_gets_one_centre_over_balanced_classes():
  means = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], np.float32)
  mu, _ = latent_mean.tweedie_fixed_point(
    gaussian_denoiser(means, 0.3), (2,), 2.5, jax.random.key(1), 3000, iters=30, batch_size=512, num_classes=3
  )
  np.testing.assert_allclose(mu, means.mean(0), atol=0.03)  # sampling error of c sigma mean(eps) / (1 - c)


def _run_cfg(steps, **kw):
  return gmm_tiny(**{"generator.latent_mean": "tweedie", "total_steps": steps, "checkpoint_every": 10, **kw})


def test_gmm_run_centres_the_generator_input_resumes_exports_and_refuses_bad_files(tmp_path):
  """On the GMM (weighted modes: its mean is not 0) the centre is the teacher's fixed point on fresh draws,
  the train step's generator pass sees `mu + z`, a resumed run reads the centre it started with (10 + 10
  steps == 20 straight), the export carries it (format 3) and its sampler draws `D(mu + z)`; a corrupt
  saved centre or a tampered export is refused naming the file."""
  c = _run_cfg(20)
  distill.validate_distill(c)
  setup = distill.build_setup(c, workdir=str(tmp_path / "setup"))
  mu = np.asarray(setup.step_cfg.latent_shift, np.float32)
  assert mu.shape == (2,) and np.linalg.norm(mu) > 0.1, mu
  sigma = c.generator.sigma_init
  x = mu + sigma * jax.random.normal(jax.random.key(99), (20000, 2))  # draws the fixed point never saw
  t = setup.teacher
  np.testing.assert_allclose(np.asarray(t.denoise(x, jnp.full((20000,), sigma))).mean(0), mu, atol=0.03)
  np.testing.assert_array_equal(np.load(tmp_path / "setup" / latent_mean.FILE), mu)

  # The train step's generator pass: the network at mu + z.
  calls = []

  def recording_apply(p, xx, s, labels=None):
    if not isinstance(xx, jax.core.Tracer):
      calls.append(np.asarray(xx))
    return setup.net_apply(p, xx, s, labels)

  key = jax.random.PRNGKey(0)
  params = init_student_params(setup, key)
  state = create_state(key, params, setup.tx_gen, setup.tx_fake)
  cfg = setup.step_cfg
  step_lib.train_step(
    cfg, step_lib.Nets(recording_apply, setup.teacher.apply), step_lib.Txs(setup.tx_gen, setup.tx_fake), state, t.params
  )
  d = step_lib.draw_randomness(cfg, step_lib.step_key(state))
  assert any(np.allclose(xx, np.asarray(d.z) + mu, atol=1e-6) for xx in calls)
  assert not any(np.allclose(xx, np.asarray(d.z), atol=1e-3) for xx in calls)

  full = distill.train_and_evaluate(_run_cfg(20), str(tmp_path / "full"))
  distill.train_and_evaluate(_run_cfg(10), str(tmp_path / "split"))
  resumed = distill.train_and_evaluate(_run_cfg(20), str(tmp_path / "split"))
  assert_trees_equal(full["state"], resumed["state"])

  export = str(tmp_path / "full" / "export")
  meta = json.load(open(os.path.join(export, "generator.json")))
  assert meta["format_version"] == 3 and len(meta["latent_mean"]) == 2
  saved_mu = np.load(tmp_path / "full" / latent_mean.FILE)
  np.testing.assert_allclose(meta["latent_mean"], saved_mu, rtol=1e-7)
  sampler = export_lib.load_sampler(export)
  got = np.asarray(sampler.sample(jax.random.key(3), 64))
  k_z, _ = jax.random.split(jax.random.key(3))
  z = c.generator.sigma_init * jax.random.normal(k_z, (64, 2))
  want = setup.module.apply({"params": sampler.params}, z + saved_mu, jnp.full((64,), c.generator.sigma_init))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  with open(tmp_path / "split" / latent_mean.FILE, "wb") as f:
    f.write(b"not an array")
  with pytest.raises(UserInputError, match=r"latent_mean\.npy"):
    distill.train_and_evaluate(_run_cfg(30), str(tmp_path / "split"))

  for bad in ([0.1], [0.1, float("nan")], "0.1"):
    json.dump({**meta, "latent_mean": bad}, open(os.path.join(export, "generator.json"), "w"))
    with pytest.raises(UserInputError, match="generator.json: latent_mean must be 2 finite numbers"):
      export_lib.load_sampler(export)


def test_few_step_student_centres_only_its_first_input():
  """Step-0 examples and the backward simulation's first pass denoise `mu + sigma_0 u`; a later step's input
  is the earlier prediction plus noise, with no centre added."""
  c = gmm_tiny(**{"generator.num_steps": 2, "method": "di", "batch_size": 32, "generator.train_step": "uniform"})
  c.generator.sigma_min = 0.2
  distill.validate_distill(c)
  setup = distill.build_setup(c)
  cfg = dataclasses.replace(setup.step_cfg, latent_shift=(0.3, -0.2))
  mu = np.array([0.3, -0.2], np.float32)
  params = init_student_params(setup, jax.random.key(0))
  nets_ = step_lib.Nets(setup.net_apply, setup.teacher.apply)
  d = step_lib.with_base(cfg, nets_, params, step_lib.draw_randomness(cfg, jax.random.key(5)))
  n = np.asarray(d.gen_step)
  assert set(n.tolist()) == {0, 1}
  first = setup.module.apply({"params": params}, mu + 2.5 * d.sim_noise[0], jnp.full((32,), 2.5))
  inputs = np.where(n[:, None] == 1, np.asarray(first) + np.asarray(d.z), mu + np.asarray(d.z))
  want = setup.module.apply({"params": params}, inputs, d.gen_sigma)
  np.testing.assert_allclose(step_lib.generate(cfg, nets_, params, d.z, d), want, rtol=1e-5, atol=1e-5)


def test_unknown_mode_and_bad_sizes_name_the_field():
  for field, value, match in (
    ("generator.latent_mean", "data", "unknown mode 'data'"),
    ("generator.latent_mean_samples", 1, "must be an integer >= 2"),
    ("generator.latent_mean_iters", 0, "must be an integer >= 1"),
  ):
    with pytest.raises(ConfigError, match=match) as e:
      distill.validate_distill(gmm_tiny(**{field: value}))
    assert field in str(e.value)

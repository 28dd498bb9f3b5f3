"""The teacher's first-moment (Tweedie) correction: measured error, interpolation, wrapper, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from emd_jax.config.validation import ConfigError, validate_distill
from emd_jax.teachers import gmm, mean_correction
from emd_jax.teachers.mean_correction import first_moment_error, interpolate, with_mean_correction

SIGMAS = np.array([0.05, 0.3, 1.0, 4.0])


def _teacher_and_samples(n=4000):
  t = gmm.gmm_teacher(dim=3, num_modes=4, radius=1.0, std=0.2)
  x0, _ = gmm.sample(t.params, jax.random.key(0), n)
  return t, np.asarray(x0)


def test_exact_denoiser_has_no_first_moment_error():
  # Tweedie: the analytic mixture's posterior mean averages to the data mean at every level; the
  # estimate is within a few of its own noise floors of zero.
  t, x0 = _teacher_and_samples()
  table, floors = first_moment_error(t, x0, SIGMAS, jax.random.key(1), batch_size=1000)
  norms = np.linalg.norm(table, axis=1)
  assert table.shape == (len(SIGMAS), 3)
  assert np.all(norms < 4 * floors), (norms, floors)


def test_a_known_bias_is_measured_exactly_and_removed():
  # A teacher off by c(sigma): with the same samples and noises the measured table moves by exactly c,
  # and the corrected teacher's error is the exact teacher's again.
  t, x0 = _teacher_and_samples(1000)
  v = jnp.array([0.3, -0.2, 0.1])

  def c(sigma):
    return (sigma / (1.0 + sigma))[:, None] * v

  biased = dataclasses.replace(t, apply=lambda p, x, s, lab=None: t.apply(p, x, s, lab) + c(s))
  key = jax.random.key(2)
  exact_table, _ = first_moment_error(t, x0, SIGMAS, key, batch_size=500)
  biased_table, _ = first_moment_error(biased, x0, SIGMAS, key, batch_size=500)
  np.testing.assert_allclose(biased_table - exact_table, np.asarray(c(jnp.asarray(SIGMAS))), atol=2e-5)
  corrected = with_mean_correction(biased, SIGMAS, biased_table - exact_table)
  fixed_table, _ = first_moment_error(corrected, x0, SIGMAS, key, batch_size=500)
  np.testing.assert_allclose(fixed_table, exact_table, atol=2e-5)
  assert corrected.spec["mean_correction"] == {"mode": "teacher_samples"}


def test_interpolation_is_linear_in_log_sigma_and_clamped():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(len(SIGMAS), 2, 3)).astype(np.float32)
  sig = np.array([0.01, 0.05, 0.1, 0.3, 0.7, 1.0, 2.5, 4.0, 50.0])
  got = np.asarray(interpolate(SIGMAS, table, jnp.asarray(sig)))
  ls = np.log(np.clip(sig, SIGMAS[0], SIGMAS[-1]))
  want = np.stack([np.interp(ls, np.log(SIGMAS), table[:, i, j]) for i in range(2) for j in range(3)], axis=-1).reshape(
    len(sig), 2, 3
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_wrapper_rejects_bad_tables():
  t, _ = _teacher_and_samples(10)
  with pytest.raises(ValueError, match="table has shape"):
    with_mean_correction(t, SIGMAS, np.zeros((len(SIGMAS), 2), np.float32))
  with pytest.raises(ValueError, match="increasing"):
    with_mean_correction(t, SIGMAS[::-1], np.zeros((len(SIGMAS), 3), np.float32))


def _digits(variant="tiny"):
  from configs.digits import get_config

  return ml_collections.ConfigDict(get_config(variant))


def test_config_errors_name_the_field():
  c = _digits()
  c.mean_correction.mode = "data"
  with pytest.raises(ConfigError, match="mean_correction.mode"):
    validate_distill(c)
  c = _digits()
  c.mean_correction.mode = "teacher_samples"
  c.mean_correction.sigmas = (1.0, 0.5)
  with pytest.raises(ConfigError, match="mean_correction.sigmas"):
    validate_distill(c)
  from configs.gmm import get_config

  g = ml_collections.ConfigDict(get_config())
  g.mean_correction.mode = "teacher_samples"
  with pytest.raises(ConfigError, match="analytic"):
    validate_distill(g)


def test_conditional_teacher_is_refused():
  from emd_jax.jobs import distill

  c = _digits()
  c.mean_correction.mode = "teacher_samples"
  t, _ = _teacher_and_samples(10)
  with pytest.raises(ConfigError, match="class-conditional"):
    distill._mean_corrected(c, dataclasses.replace(t, num_classes=10), True, None)


def _corrected_tiny():
  c = _digits()
  c.mean_correction.mode = "teacher_samples"
  c.mean_correction.num_samples = 16
  c.mean_correction.heun_steps = 2
  return c


def test_table_is_kept_in_the_workdir_and_read_back_on_resume(tmp_path, monkeypatch):
  from emd_jax.jobs import distill

  c = _corrected_tiny()
  raw, _ = _teacher_and_samples(10)  # the analytic mixture: the file round trip, not the network, is tested here
  distill._mean_corrected(c, raw, True, str(tmp_path))  # the first start: measured, written to the workdir
  tab = mean_correction.load_table(str(tmp_path / distill.MEAN_CORRECTION_FILE), (3,))
  assert tab["table"].shape == (len(c.mean_correction.sigmas), 3)

  def no_measuring(*a, **k):
    raise AssertionError("measured again on resume")

  monkeypatch.setattr(mean_correction, "measure", no_measuring)
  corrected = distill._mean_corrected(c, raw, True, str(tmp_path))
  x = jnp.array([[0.2, -0.1, 0.4], [1.0, 0.0, -0.3]])
  sig = jnp.array([0.1, 1.0])
  want = raw.apply(raw.params, x, sig, None) - np.stack([tab["table"][2], tab["table"][6]])  # sigmas 0.1, 1.0
  got = corrected.apply(raw.params, x, sig, None)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.slow
def test_corrected_run_trains_and_its_checkpoints_open_without_remeasuring(tmp_path, monkeypatch):
  from emd_jax import evaluate
  from emd_jax.jobs import distill

  c = _corrected_tiny()
  out = distill.train_and_evaluate(c, str(tmp_path / "run"))
  assert int(out["step"]) == c.total_steps

  def no_measuring(*a, **k):
    raise AssertionError("the sweep measured the teacher")

  monkeypatch.setattr(mean_correction, "measure", no_measuring)
  run = evaluate.open_run(str(tmp_path / "run"))  # the fingerprint matches: the spec is marked
  try:
    assert run.setup.teacher.spec["mean_correction"]["mode"] == "teacher_samples"
  finally:
    run.checkpointer.close()


def test_bad_table_files_are_refused_by_name_before_any_compute(tmp_path):
  from emd_jax.errors import UserInputError
  from emd_jax.jobs import distill

  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip at all")
  wrong = tmp_path / "wrong.npz"
  mean_correction.save_table(
    str(wrong), {"sigmas": SIGMAS, "table": np.zeros((len(SIGMAS), 8, 8, 1)), "noise_floor": np.zeros(len(SIGMAS))}
  )
  for path, what in ((bad, "not a table"), (wrong, "expected finite values of shape"), (tmp_path / "no", "no such")):
    c = _digits()
    c.mean_correction.mode = "teacher_samples"
    c.mean_correction.table = str(path)
    with pytest.raises(UserInputError, match=what) as e:
      distill.train_and_evaluate(c, str(tmp_path / "run"))
    assert str(path) in str(e.value)
    assert not (tmp_path / "run").exists()

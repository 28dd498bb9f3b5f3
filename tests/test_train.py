"""End to end on the GMM: exact resume, NaN guard, export/sample round trip, config errors."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
  assert_trees_close,
  assert_trees_equal,
  flat,
  gmm_tiny,
  init_student_params,
  rel_err,
  step_gradients,
  trees_equal,
)

from emd_jax.distill.state import create_state
from emd_jax.formats.generator_export import load_sampler
from emd_jax.jobs import distill as train
from emd_jax.runtime import parallel
from emd_jax.teachers.base import Teacher
from emd_jax.teachers.gmm import gmm_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


tiny = gmm_tiny


def test_resume_is_bit_identical(tmp_path):
  full = train.train_and_evaluate(tiny(total_steps=40, checkpoint_every=20), str(tmp_path / "full"))
  half = tiny(total_steps=20, checkpoint_every=20)
  train.train_and_evaluate(half, str(tmp_path / "split"))
  resumed = train.train_and_evaluate(tiny(total_steps=40, checkpoint_every=20), str(tmp_path / "split"))
  assert int(resumed["state"].step) == 40
  assert_trees_equal(full["state"], resumed["state"])
  # The runs really trained: parameters moved from their initial values.
  start = train.train_and_evaluate(tiny(total_steps=0), str(tmp_path / "start"))
  assert not trees_equal(start["state"].gen_params, full["state"].gen_params)


def test_nan_guard_skips_counts_and_stops(tmp_path):
  good = gmm_teacher()
  nan_params = jax.tree.map(lambda x: x * jnp.nan, good.params)
  bad = Teacher(apply=good.apply, params=nan_params, data_shape=good.data_shape, spec=good.spec)
  # A healthy state, then steps with a NaN teacher: the state must not change except counters.
  cfg = tiny(total_steps=0)
  train.train_and_evaluate(cfg, str(tmp_path / "healthy"))
  with pytest.raises(train.TrainingError, match="consecutive non-finite"):
    train.train_and_evaluate(
      tiny(total_steps=30, nonfinite_limit=5, log_every=10), str(tmp_path / "healthy"), teacher=bad
    )
  # What was saved is the last good state.
  run = train.train_and_evaluate(tiny(total_steps=0), str(tmp_path / "healthy"))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(run["state"].gen_params))


def test_step_skips_nonfinite_update_and_never_recompiles():
  c = tiny()
  train.validate_distill(c)
  setup = train.build_setup(c)
  mesh = parallel.make_mesh(c.mesh)
  key = jax.random.PRNGKey(0)
  abstract = train.abstract_state(setup, key)
  step, state_sh, teacher_sh = train.sharded_step(setup, mesh, abstract)
  params = init_student_params(setup, key)
  state = jax.device_put(create_state(key, params, setup.tx_gen, setup.tx_fake), state_sh)
  nan_teacher = jax.tree.map(lambda x: x * jnp.nan, setup.teacher.params)
  before = jax.device_get(state)
  state, m = step(state, nan_teacher)
  assert int(m["nonfinite/skipped"]) == 1 and int(state.nonfinite_count) == 1 and int(state.step) == 1
  assert_trees_equal(before.gen_params, state.gen_params)
  assert_trees_equal(before.fake_params, state.fake_params)
  state, m = step(state, setup.teacher.params)
  assert int(m["nonfinite/skipped"]) == 0 and int(state.nonfinite_streak) == 0
  assert not trees_equal(before.gen_params, state.gen_params)
  # Repeated calls reuse one compiled executable.
  traced = chex.assert_max_traces(n=1)(
    train.make_train_step(setup.step_cfg, setup.net_apply, setup.teacher.apply, setup.tx_gen, setup.tx_fake)
  )
  jitted = jax.jit(traced)
  s2 = create_state(key, params, setup.tx_gen, setup.tx_fake)
  for _ in range(3):
    s2, _ = jitted(s2, setup.teacher.params)


def _txs(setup):
  return setup.tx_gen, setup.tx_fake


def test_debiased_ema_is_the_normalised_average_of_accepted_iterates():
  """`generator.ema_debias`: EMA_n = sum_k d^(n-k) p_k / sum_k d^(n-k) over accepted updates; a
  skipped (non-finite) step adds nothing, and the initial weights carry no weight."""
  d = 0.8
  c = tiny(**{"generator.ema_decay": d, "generator.ema_debias": True})
  train.validate_distill(c)
  setup = train.build_setup(c)
  key = jax.random.PRNGKey(0)
  params = init_student_params(setup, key)
  step = jax.jit(train.make_train_step(setup.step_cfg, setup.net_apply, setup.teacher.apply, *_txs(setup)))
  state = create_state(key, params, setup.tx_gen, setup.tx_fake)
  nan_teacher = jax.tree.map(lambda x: x * jnp.nan, setup.teacher.params)
  iterates = []
  for i in range(6):
    state, m = step(state, nan_teacher if i == 2 else setup.teacher.params)
    if i != 2:
      iterates.append(jax.device_get(state.gen_params))
    n = len(iterates)
    w = [d ** (n - 1 - k) for k in range(n)]
    expected = jax.tree.map(lambda *ps, w=w: sum(wk * p for wk, p in zip(w, ps, strict=True)) / sum(w), *iterates)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(state.gen_ema)), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"after step {i + 1}")
  assert int(state.nonfinite_count) == 1
  # The plain EMA differs: it keeps weight d^n on the initial parameters.
  plain = tiny(**{"generator.ema_decay": d})
  train.validate_distill(plain)
  setup_p = train.build_setup(plain)
  step_p = jax.jit(train.make_train_step(setup_p.step_cfg, setup_p.net_apply, setup_p.teacher.apply, *_txs(setup_p)))
  sp = create_state(key, params, setup_p.tx_gen, setup_p.tx_fake)
  sp, _ = step_p(sp, setup_p.teacher.params)
  first = jax.device_get(sp.gen_params)
  leaves = jax.tree.leaves
  for a, p0, p1 in zip(leaves(jax.device_get(sp.gen_ema)), leaves(params), leaves(first), strict=True):
    np.testing.assert_allclose(a, d * np.asarray(p0) + (1 - d) * p1, rtol=1e-5, atol=1e-6)


def test_sharded_step_equals_single_device_step():
  """One step's generator and fake-denoiser GRADIENTS (recorded, not Adam-filtered) on 8 fake devices,
  data-parallel (8 x 1) and data x fsdp (4 x 2), equal the single-device ones: a psum missing, doubled
  or divided by the device count is an O(1) relative error."""
  c = lambda: tiny(batch_size=64)  # noqa: E731
  g1, f1, _ = step_gradients(c(), (1, 1))
  assert np.linalg.norm(flat(g1)) > 1e-3 and np.linalg.norm(flat(f1)) > 1e-3
  for shape in [(8, 1), (4, 2)]:
    g, f, _ = step_gradients(c(), shape, devices=jax.devices())
    for name, one, many in (("generator", g1, g), ("fake", f1, f)):
      assert rel_err(many, one) < 1e-4, (shape, name, rel_err(many, one))
      assert_trees_close(many, one, rtol=2e-3, atol=1e-5 * np.abs(flat(one)).max(), err_msg=f"{shape} {name}")


def test_export_round_trip_and_sample_cli(tmp_path):
  out = train.train_and_evaluate(tiny(total_steps=20), str(tmp_path / "run"))
  export_dir = tmp_path / "run" / "export"
  meta = json.loads((export_dir / "generator.json").read_text())
  assert meta["data_shape"] == [2] and meta["sigma_init"] == 2.5 and meta["net"]["arch"] == "mlp"
  sampler = load_sampler(str(export_dir))
  key = jax.random.key(3)
  x = sampler.sample(key, 100)
  assert x.shape == (100, 2) and x.dtype == jnp.float32
  z = 2.5 * jax.random.normal(jax.random.split(key)[0], (100, 2))
  cfg = tiny()
  train.validate_distill(cfg)  # resolves the method preset
  direct = train._generate(train.build_setup(cfg), out["state"].gen_ema, z)
  np.testing.assert_allclose(x, direct, rtol=1e-5, atol=1e-6)
  # The CLI imports no training code and writes the documented npz.
  npz = tmp_path / "s.npz"
  code = (
    f"import sys, runpy; sys.argv = ['sample', '--generator', {str(export_dir)!r}, '--num', '50', '--seed', '1', "
    f"'--out', {str(npz)!r}];"
    "runpy.run_module('emd_jax.sample', run_name='__main__')"
  )
  env = {**os.environ, "XLA_FLAGS": ""}
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  data = np.load(npz)
  assert data["samples"].shape == (50, 2) and data["samples"].dtype == np.float32


def test_several_fake_updates_per_generator_step():
  """fake.steps_per_gen_step > 1: the trace-time loop (the CPU-fast default) and the scan compute the
  same updates; both train and differ from one update per step. Three jitted steps from one random
  initial state (the loop's checkpoints, evaluation and export are not under test here)."""

  def run(**kw):
    c = tiny(**kw)
    train.validate_distill(c)
    setup = train.build_setup(c)
    key = jax.random.PRNGKey(0)
    state = create_state(key, init_student_params(setup, key), setup.tx_gen, setup.tx_fake)
    step = jax.jit(train.make_train_step(setup.step_cfg, setup.net_apply, setup.teacher.apply, *_txs(setup)))
    for _ in range(3):
      state, _ = step(state, setup.teacher.params)
    return jax.device_get(state)

  one = run()
  two = run(**{"fake.steps_per_gen_step": 3})
  scan = run(**{"fake.steps_per_gen_step": 3, "fake.loop": "scan"})
  assert int(two.step) == 3 and int(two.nonfinite_count) == 0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(two.fake_params))
  assert not trees_equal(one.fake_params, two.fake_params)
  chex.assert_trees_all_close(two.fake_params, scan.fake_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(two.gen_params, scan.gen_params, rtol=1e-5, atol=1e-6)

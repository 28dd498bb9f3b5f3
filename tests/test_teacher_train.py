"""Teacher pre-training: loss decreases, exact resume, NaN guard, saved teacher, CFG wrapper."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import trees_equal as _leaves_equal

from configs.teacher_digits import get_config
from emd_jax import nets, teachers
from emd_jax.diffusion import NoiseDist, dsm_loss
from emd_jax.jobs import teacher as teacher_train
from emd_jax.teachers.base import Teacher
from emd_jax.teachers.guidance import guided_apply, with_guidance


def _tiny_module(label_dim: int = 0):
  c = get_config("tiny,cond" if label_dim else "tiny")
  spec = teacher_train.net_spec(c)
  return nets.build(spec), spec


@pytest.fixture(scope="module")
def tiny_step():
  module, _ = _tiny_module()
  tx = optax.adam(3e-3)
  params = teacher_train.init_params(module, jax.random.PRNGKey(0), (16, 16, 1), 0)
  step = jax.jit(teacher_train.make_train_step(module, tx, NoiseDist(), 0.9, 0.5, False))
  return step, teacher_train.create_state(jax.random.PRNGKey(1), params, tx)


@pytest.mark.slow
def test_loss_decreases_on_a_fixed_batch(tiny_step):
  step, state = tiny_step
  module, _ = _tiny_module()
  images = np.full((8, 16, 16, 1), -1.0, np.float32)
  images[:, 4:12, 7:9] = 1.0  # the same vertical bar ("1") in every image: [8, 16, 16, 1]
  batch = {"image": jnp.asarray(images), "label": jnp.zeros((8, 10))}

  def fixed_loss(params) -> float:  # same noise levels and noise before and after: no step-to-step variance
    denoise = lambda x, s, lab: module.apply({"params": params}, x, s, lab)  # noqa: E731
    return float(jnp.mean(dsm_loss(denoise, batch["image"], jax.random.PRNGKey(7), NoiseDist())[0]))

  before = fixed_loss(state.params)
  for _ in range(60):  # 30 steps left the loss at 0.505x, on the edge of the bound below
    state, m = step(state, batch)
  assert int(state.step) == 60 and int(state.nonfinite_count) == 0
  assert fixed_loss(state.params) < 0.5 * before


@pytest.mark.slow
def test_nan_guard_skips_and_counts(tiny_step):
  step, state = tiny_step
  batch = {"image": jnp.full((8, 16, 16, 1), jnp.nan), "label": jnp.zeros((8, 10))}
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(2):
    state, m = step(state, batch)
  assert int(m["nonfinite/streak"]) == 2 and int(state.nonfinite_count) == 2
  assert _leaves_equal(before, state.params)
  good = {"image": jnp.zeros((8, 16, 16, 1)), "label": jnp.zeros((8, 10))}
  state, m = step(state, good)
  assert int(m["nonfinite/streak"]) == 0 and int(state.nonfinite_count) == 2


@pytest.mark.slow
def test_resume_is_bit_identical_and_teacher_is_saved(tmp_path):
  def cfg(steps):
    c = get_config("tiny")
    c.total_steps = steps
    c.eval_every = 100  # evaluate only at the end
    c.save_teacher = steps == 4
    return c

  full = teacher_train.train_and_evaluate(cfg(4), str(tmp_path / "full"))
  teacher_train.train_and_evaluate(cfg(2), str(tmp_path / "split"))
  resumed = teacher_train.train_and_evaluate(cfg(4), str(tmp_path / "split"))
  assert int(resumed["state"].step) == 4
  assert _leaves_equal(full["state"], resumed["state"])
  # The saved teacher is the EMA net, loadable, with its quality in teacher.json.
  t = teachers.load(full["teacher_dir"])
  assert t.data_shape == (16, 16, 1) and t.num_classes == 0
  assert _leaves_equal(t.params, full["state"].ema)
  with open(os.path.join(full["teacher_dir"], "teacher.json")) as f:
    info = json.load(f)
  assert {"fd", "coverage", "precision", "recall"} <= set(info["quality"])
  assert os.path.exists(tmp_path / "full" / "samples_step4.png")


@pytest.mark.slow
def test_cfg_wrapper_scales():
  module, _ = _tiny_module(label_dim=10)
  params = teacher_train.init_params(module, jax.random.PRNGKey(0), (16, 16, 1), 10)
  # Random (non-zero) weights everywhere so that the label matters.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  apply = lambda p, x, s, lab: module.apply({"params": p}, x, s, lab)  # noqa: E731
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 16, 16, 1))
  sigma = jnp.full((4,), 0.7)
  labels = jax.nn.one_hot(jnp.arange(4), 10)
  cond = apply(params, x, sigma, labels)
  uncond = apply(params, x, sigma, jnp.zeros_like(labels))
  assert not np.allclose(cond, uncond, atol=1e-4)
  np.testing.assert_allclose(guided_apply(apply, 0.0)(params, x, sigma, labels), uncond, atol=1e-5)
  np.testing.assert_allclose(guided_apply(apply, 1.0)(params, x, sigma, labels), cond, atol=1e-5)
  np.testing.assert_allclose(
    guided_apply(apply, 2.0)(params, x, sigma, labels), uncond + 2.0 * (cond - uncond), atol=1e-4
  )
  # A teacher whose spec stores guidance gets it applied once.
  t = Teacher(apply=apply, params=params, data_shape=(16, 16, 1), num_classes=10, spec={"guidance": 0.0})
  g = with_guidance(t)
  np.testing.assert_allclose(g.apply(params, x, sigma, labels), uncond, atol=1e-5)
  assert with_guidance(g, 5.0) is g

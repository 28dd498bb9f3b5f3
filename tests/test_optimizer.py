"""Learning-rate schedules of `make_optimizer` (warm-up, cosine and linear decay) are the ones configured."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from emd_jax.training.optimizer import lr_schedule, make_optimizer, tree_norm


def _cfg(**kw):
  base = dict(lr=1e-3, b1=0.0, b2=0.999, eps=1e-12, grad_clip=0.0, warmup_steps=0, decay="none", end_factor=0.0)
  return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize(
  "kw, expected",
  [
    (dict(), lambda t: 1e-3),
    (dict(warmup_steps=10), lambda t: 1e-3 * min(t, 10) / 10),
    (dict(decay="cosine"), lambda t: 1e-3 * 0.5 * (1 + math.cos(math.pi * min(t, 100) / 100))),
    (dict(decay="linear", end_factor=0.1), lambda t: 1e-3 * (1 - 0.9 * min(t, 100) / 100)),
    (
      dict(decay="cosine", end_factor=0.2, warmup_steps=20),
      lambda t: 1e-3 * t / 20 if t < 20 else 1e-3 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(t - 20, 80) / 80))),
    ),
  ],
  ids=["constant", "warmup", "cosine", "linear_end", "warmup_cosine_end"],
)
def test_schedule_values(kw, expected):
  sched = lr_schedule(_cfg(**kw), total_steps=100)
  for t in (0, 1, 10, 19, 20, 50, 99, 100, 150):
    got = float(sched(t)) if callable(sched) else float(sched)
    np.testing.assert_allclose(got, expected(t), rtol=1e-5, atol=1e-9, err_msg=f"step {t}")


def test_adam_steps_follow_the_schedule():
  """With b1 = 0 and a constant gradient, Adam's step is lr(t) * sign(g): the schedule reaches the updates."""
  cfg = _cfg(decay="linear", end_factor=0.25)
  tx = make_optimizer(cfg, total_steps=8)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([1.0, -2.0, 0.5])}
  state = tx.init(params)
  for t in range(10):
    updates, state = tx.update(grads, state, params)
    lr = 1e-3 * (1 - 0.75 * min(t, 8) / 8)
    np.testing.assert_allclose(np.asarray(updates["w"]), -lr * np.sign(np.asarray(grads["w"])), rtol=1e-4)
    params = optax.apply_updates(params, updates)


def test_decay_needs_total_steps_and_a_known_kind():
  with pytest.raises(ValueError, match="needs total_steps"):
    lr_schedule(_cfg(decay="cosine"))
  with pytest.raises(ValueError, match="unknown learning-rate decay 'step'"):
    lr_schedule(_cfg(decay="step"), total_steps=10)


def test_tree_norm_is_the_l2_norm_of_all_leaves_in_float32():
  tree = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.array([[12.0]], jnp.bfloat16)}, "d": jnp.zeros((0,))}
  got = tree_norm(tree)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), 13.0, rtol=1e-7)  # sqrt(9 + 16 + 144)

"""emd_jax.training: the EMA and the non-finite guard every job's step uses, against direct computations."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.training import ema, guard


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  nonfinite_count: jax.Array
  nonfinite_streak: jax.Array


def test_debiased_ema_is_the_plain_average_of_the_updates_it_has_seen():
  rng = np.random.default_rng(0)
  iterates = rng.normal(size=(6, 3))
  d = 0.9
  avg = np.full(3, 123.0)  # the initial weights: must carry no weight at all
  for n, p in enumerate(iterates, start=1):
    avg = np.asarray(ema.ema_update(avg, p, ema.debiased_decay(d, n)))
    w = d ** np.arange(n - 1, -1, -1)  # d^(n-k), k = 1..n
    np.testing.assert_allclose(avg, (w[:, None] * iterates[:n]).sum(0) / w.sum(), rtol=1e-5)


def test_warmup_decay_starts_small_and_caps_at_the_decay():
  np.testing.assert_allclose(ema.warmup_decay(0.999, 0), 0.1)
  np.testing.assert_allclose(ema.warmup_decay(0.999, 90), 91 / 100)
  np.testing.assert_allclose(ema.warmup_decay(0.99, 10**6), 0.99)


def test_all_finite_sees_one_bad_leaf():
  tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf])}}
  assert not bool(guard.all_finite(tree))
  assert bool(guard.all_finite({"a": jnp.ones(3)}))
  assert bool(guard.all_finite({}))


def test_guarded_update_keeps_the_old_state_and_counts_the_skip():
  def state(v, step, count, streak):
    return _State(jnp.int32(step), {"w": jnp.full(2, v)}, jnp.int32(count), jnp.int32(streak))

  old = state(1.0, 5, 1, 1)
  new = state(2.0, 99, 99, 99)  # the new state's counters are ignored
  kept, m = jax.jit(guard.guarded_update)(jnp.array(False), new, old)
  np.testing.assert_array_equal(kept.params["w"], [1.0, 1.0])
  assert (int(kept.step), int(kept.nonfinite_count), int(kept.nonfinite_streak)) == (6, 2, 2)
  assert (int(m["nonfinite/skipped"]), int(m["nonfinite/total"]), int(m["nonfinite/streak"])) == (1, 2, 2)
  kept, m = jax.jit(guard.guarded_update)(jnp.array(True), new, old)
  np.testing.assert_array_equal(kept.params["w"], [2.0, 2.0])
  assert (int(kept.step), int(kept.nonfinite_count), int(kept.nonfinite_streak)) == (6, 1, 0)
  assert int(m["nonfinite/skipped"]) == 0

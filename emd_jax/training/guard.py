"""The non-finite guard shared by every train step.

A step whose loss or gradients are not all finite leaves the state as it was;
the step counter still advances (so the next step draws new randomness) and
the state's `nonfinite_count` / `nonfinite_streak` count the skipped steps.
The loop reads the returned metrics at log steps and stops after
`nonfinite_limit` consecutive skips (`emd_jax.runtime.loop`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def all_finite(tree) -> Array:
  """True when every leaf of `tree` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def keep_if(ok: Array, new, old):
  """`new` when the scalar `ok` is true, else `old` (same pytree structure).

  One `lax.cond` that passes either tree through, not a `jnp.where` per leaf: for a
  few hundred parameter leaves the per-leaf selects made XLA:CPU compile a train step
  several times slower (42 s vs 6 s for the optimizer update of a 200-leaf U-Net).
  """
  return jax.lax.cond(ok, lambda a, b: a, lambda a, b: b, new, old)


def guarded_update(ok: Array, new, old):
  """`(state, metrics)`: `new` if `ok` else `old`, with the step and the non-finite counters advanced.

  `new` and `old` are states with `step`, `nonfinite_count` and `nonfinite_streak` fields (and a
  `replace` method); the counters of `new` are ignored.
  """
  kept = keep_if(ok, new, old)
  streak = jnp.where(ok, 0, old.nonfinite_streak + 1).astype(jnp.int32)
  count = old.nonfinite_count + (~ok).astype(jnp.int32)
  kept = kept.replace(step=old.step + 1, nonfinite_count=count, nonfinite_streak=streak)
  metrics = {"nonfinite/skipped": (~ok).astype(jnp.int32), "nonfinite/total": count, "nonfinite/streak": streak}
  return kept, metrics

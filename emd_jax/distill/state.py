"""The distillation train state: one pytree, initialised from the teacher.

Section 2 of ALGORITHMS.md: the generator `g(z) = D_theta(z, sigma_init)` and
the online denoiser `D_psi` both start from the teacher's weights. When the
teacher is analytic (the Gaussian mixture has no weights), both start from a
*surrogate*: the student architecture regressed onto the exact teacher
denoiser at all noise levels (`emd_jax.teachers.surrogate`), so that the
network-teacher and analytic-teacher paths start from the same kind of point.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class DistillState:
  """Everything that changes during distillation.

  `rng` is the run's base key (raw uint32[2]); the step key is
  `fold_in(rng, step)`, so resuming needs nothing else.
  """

  step: Array  # int32 []
  rng: Array  # uint32 [2]
  gen_params: Any
  gen_opt_state: Any
  gen_ema: Any
  fake_params: Any
  fake_opt_state: Any
  nonfinite_count: Array  # int32 [], steps skipped so far
  nonfinite_streak: Array  # int32 [], consecutive skipped steps up to now
  # Named extra EMAs of the generator (`generator.ema_tracks`), {name: params}; {} (no leaves) by default.
  gen_ema_tracks: Any = flax.struct.field(default_factory=dict)
  # The adversarial term's discriminator head and its fake-optimizer state (`distill/adversarial.py`);
  # None (no leaves) without the term, so the data-free state is unchanged.
  disc_params: Any = None
  disc_opt_state: Any = None


def create_state(rng: Array, student_params, tx_gen, tx_fake, ema_tracks: tuple[str, ...] = ()) -> DistillState:
  """Generator, EMA, each named EMA track in `ema_tracks` and fake denoiser all start as copies of `student_params`."""
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731  (distinct buffers: state is donated)
  gen = copy(student_params)
  fake = copy(student_params)
  return DistillState(
    step=jnp.zeros((), jnp.int32),
    rng=jnp.array(rng, jnp.uint32),  # a copy: the state is donated
    gen_params=gen,
    gen_opt_state=tx_gen.init(gen),
    gen_ema=copy(student_params),
    fake_params=fake,
    fake_opt_state=tx_fake.init(fake),
    nonfinite_count=jnp.zeros((), jnp.int32),
    nonfinite_streak=jnp.zeros((), jnp.int32),
    gen_ema_tracks={name: copy(student_params) for name in ema_tracks},
  )

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
import optax

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


def lr_schedule(cfg, total_steps: int | None = None):
  """The learning rate: a constant `lr`, after an optional linear warm-up from 0.

  `decay` ("none", "cosine", "linear") lowers it from `lr` at the end of the warm-up to
  `lr * end_factor` at `total_steps` (held there after). A decay needs `total_steps`.
  """
  warmup = int(cfg.get("warmup_steps", 0))
  decay = cfg.get("decay", "none")
  if decay == "none":
    return optax.linear_schedule(0.0, cfg.lr, warmup) if warmup else cfg.lr
  if total_steps is None:
    raise ValueError(f"learning-rate decay {decay!r} needs total_steps")
  if decay not in ("cosine", "linear"):
    raise ValueError(f"unknown learning-rate decay {decay!r}; known: none, cosine, linear")
  end_factor = float(cfg.get("end_factor", 0.0))
  span = max(int(total_steps) - warmup, 1)
  if decay == "cosine":
    tail = optax.cosine_decay_schedule(cfg.lr, span, alpha=end_factor)
  else:
    tail = optax.linear_schedule(cfg.lr, cfg.lr * end_factor, span)
  if not warmup:
    return tail
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), tail], [warmup])


def make_optimizer(cfg, total_steps: int | None = None) -> optax.GradientTransformation:
  """Adam (b1 = 0 by default, as in the papers) with optional clipping, warm-up and decay.

  Reads `lr`, `b1`, `b2`, `eps`, `grad_clip`, `warmup_steps`, `decay`, `end_factor` from `cfg`
  (see `lr_schedule`).
  """
  lr = lr_schedule(cfg, total_steps)
  parts = []
  if cfg.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.get("eps", 1e-8)))
  return optax.chain(*parts)


def create_state(rng: Array, student_params, tx_gen, tx_fake) -> DistillState:
  """Generator, EMA and fake denoiser all start as copies of `student_params`."""
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
  )

"""Optimizers and learning-rate schedules, shared by every job."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def tree_norm(tree) -> jax.Array:
  """The L2 norm of all leaves together, in float32 (`optax.global_norm`, which optax now deprecates
  under a name that older optax releases lack)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


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

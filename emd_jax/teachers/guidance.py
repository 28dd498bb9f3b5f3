"""Classifier-free guidance (CFG) for class-conditional teachers.

`D = D_uncond + w (D_cond - D_uncond)`: `w = 0` is the unconditional model,
`w = 1` the conditional one, `w > 1` sharpens the class. The unconditional
denoiser is the same network with an all-zero label vector (what label dropout
trains). Both branches run as one batch of `2B`.

A teacher directory may store the scale as `guidance` in teacher.json (the
digits teacher trainer writes it); `with_guidance(teacher)` applies that value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from emd_jax.teachers.base import Teacher

Array = jax.Array


def guided_apply(apply: Callable, scale: float) -> Callable:
  """Wraps `apply(params, x, sigma, labels)` with CFG at `scale` (unconditional calls pass through)."""
  if scale == 1.0:
    return apply

  def fn(params, x: Array, sigma: Array, labels: Array | None = None) -> Array:
    if labels is None:
      return apply(params, x, sigma, None)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
    both = apply(
      params,
      jnp.concatenate([x, x]),  # [2B, ...]
      jnp.concatenate([sigma, sigma]),
      jnp.concatenate([labels, jnp.zeros_like(labels)]),
    )
    d_cond, d_uncond = jnp.split(both, 2)
    return d_uncond + scale * (d_cond - d_uncond)

  return fn


def with_guidance(teacher: Teacher, scale: float | None = None) -> Teacher:
  """The teacher with CFG at `scale` (default: its spec's `guidance`, else 1 = none)."""
  if teacher.spec.get("guidance_applied"):
    return teacher  # already wrapped (e.g. by the loader): never guide twice
  if scale is None:
    scale = float(teacher.spec.get("guidance", 1.0))
  if not teacher.num_classes or scale == 1.0:
    return teacher
  spec = {**teacher.spec, "guidance": float(scale), "guidance_applied": True}
  return dataclasses.replace(teacher, apply=guided_apply(teacher.apply, float(scale)), spec=spec)

"""Glue shared by the image jobs: score generated images, write their grid.

Teacher pre-training (`emd_jax.jobs.teacher`) and distillation
(`emd_jax.jobs.distill.evaluate`) both end an evaluation the same way: the
configured image evaluator's scalars for the console and TensorBoard, a sample
grid for TensorBoard, and the same grid as `samples_step{N}.png` in the workdir.
The evaluator is built once by the job (`registry.build(config.eval)`) and passed
in; a name is still accepted (built anew at each call, as before the registry).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np

from emd_jax.evaluators import grids, registry

Evaluator = Callable[..., dict]

# Scalars shown on the console; everything else goes to TensorBoard under "*_detail/".
_HEADLINE = (
  "fd",
  "fd_pixel",
  "kid",
  "precision",
  "recall",
  "pixel_std_ratio_real",
  "coverage",
  "class_tv",
  "label_accuracy",
)


def _evaluator(evaluator: str | Evaluator | None, **kwargs) -> Evaluator | None:
  """A built evaluator as it is; a name built by the registry (`kwargs`: its `eval.<name>` arguments)."""
  if isinstance(evaluator, str):
    return registry.build({"evaluator": evaluator, evaluator: kwargs} if evaluator else {})
  if kwargs:
    raise TypeError("keyword arguments are for an evaluator given by name, not a built one")
  return evaluator


def score_images(
  images: np.ndarray, labels: np.ndarray | None = None, evaluator: str | Evaluator | None = "digits", **kwargs
) -> dict:
  """Runs `evaluator` (built, or a registered name) on images `[N, H, W, C]` in `[-1, 1]`.

  Returns flat float scalars: the headline figures (`fd`, `coverage`, ...) and
  the per-class histogram as `class_detail/k` (not printed by the loop); `{}` for
  no evaluator (None or "").
  """
  evaluator = _evaluator(evaluator, **kwargs)
  if evaluator is None:
    return {}
  raw = evaluator(np.asarray(images, np.float32), labels)
  out = {k: float(raw[k]) for k in _HEADLINE if k in raw}
  for k, v in raw.items():
    if k not in out and np.ndim(v) == 0 and k != "num_samples":
      out[k] = float(v)
  for i, share in enumerate(np.asarray(raw.get("class_hist", []))):
    out[f"class_detail/{i}"] = float(share)
  return out


def write_grid(
  workdir: str | None, step: int, images: np.ndarray, num: int = 64, scale: int = 4, name: str = "samples"
):
  """Grid of the first `num` images: saved as `{workdir}/{name}_step{step}.png`; returned as uint8 `[1, H', W', C]`."""
  grid = grids.image_grid(np.asarray(images[:num]))
  if workdir and jax.process_index() == 0:
    grids.save_png(os.path.join(workdir, f"{name}_step{step}.png"), grid, scale=scale)
  return grid.repeat(scale, axis=0).repeat(scale, axis=1)[None]


def evaluate_and_grid(
  workdir: str | None,
  step: int,
  images: np.ndarray,
  labels: np.ndarray | None = None,
  evaluator: str | Evaluator | None = "digits",
  grid_size: int = 64,
) -> tuple[dict, dict]:
  """`(scalars, {'samples': grid})` for the loop's `evaluate` callback; writes the PNG.

  `evaluator`: built (`registry.build`), a registered name, or None / "" (grid only).
  """
  images = np.asarray(images, np.float32)
  if labels is not None and np.ndim(labels) == 2:
    labels = np.asarray(labels).argmax(-1)
  scalars = score_images(images, labels, evaluator)
  return scalars, {"samples": write_grid(workdir, step, images, grid_size)}

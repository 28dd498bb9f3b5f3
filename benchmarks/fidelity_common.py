"""Shared by the fidelity benchmarks: one training run that records the loop's own evaluations."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emd_jax.jobs import distill as train_lib  # noqa: E402


def train_recording(config, workdir: str, pick: Callable[[dict], dict]) -> tuple[dict, float, list[dict]]:
  """`train_and_evaluate(config, workdir)` from a fresh workdir, with every in-loop evaluation's
  scalars passed through `pick` and kept, in step order, as the run's trajectory.

  Returns the training result, its wall-clock seconds and the trajectory.
  """
  shutil.rmtree(workdir, ignore_errors=True)
  trajectory: list[dict] = []
  original = train_lib.evaluate

  def recording(cfg, setup, params, rng, step=None, workdir=None):
    scalars, images = original(cfg, setup, params, rng, step=step, workdir=workdir)
    if step is not None:  # the EMA's evaluation; the `generator.ema_tracks` ones come without a step
      trajectory.append({"step": int(step), **pick(scalars)})
    return scalars, images

  train_lib.evaluate = recording
  try:
    t0 = time.perf_counter()
    result = train_lib.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - t0
  finally:
    train_lib.evaluate = original
  return result, seconds, trajectory

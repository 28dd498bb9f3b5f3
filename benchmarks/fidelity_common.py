"""Shared by the fidelity benchmarks: one training run that records the loop's own evaluations."""

from __future__ import annotations

import json
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


def _cell(value, fmt: str) -> str:
  """A table cell: numbers with `fmt`, anything else (a model's name) as it is."""
  return value if isinstance(value, str) else format(value, fmt)


def write_level_table(out: str, header: list[str], lead: list[tuple[str, str]], rows: list[dict], fmt: str, payload):
  """Write a per-level diagnostic's results: `out`.md (the `header` lines, then one table row per dict in
  `rows`: the `lead` columns, given as (key, title), printed with `g`, then every other key with `fmt`; strings
  as they are) and `out`.json (`payload`, which should carry the rows). Prints the markdown."""
  lead_keys = [k for k, _ in lead]
  keys = [k for k in rows[0] if k not in lead_keys]
  lines = [
    *header,
    "| " + " | ".join([t for _, t in lead] + keys) + " |",
    "|" + "---|" * (len(lead) + len(keys)),
  ]
  for r in rows:
    cells = [_cell(r[k], "g") for k in lead_keys] + [_cell(r[k], fmt) for k in keys]
    lines.append("| " + " | ".join(cells) + " |")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  with open(out + ".json", "w") as fh:
    json.dump(payload, fh)
  print("\n".join(lines))

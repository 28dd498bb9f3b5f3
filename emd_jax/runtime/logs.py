"""Metric writers (CLU: TensorBoard + log) and the console progress line."""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from emd_jax.formats import paths


def create_writer(workdir: str):
  """TensorBoard + logging writer on process 0; logging-only elsewhere.

  A URI workdir gets the same writers built directly: CLU's factory goes through `etils.epath`,
  which knows only some schemes, while TensorFlow's summary writer takes any `tf.io.gfile` path.
  """
  if paths.is_remote(workdir) and jax.process_index() == 0:
    return metric_writers.AsyncMultiWriter([metric_writers.LoggingWriter(), metric_writers.SummaryWriter(workdir)])
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


class Progress:
  """Steps/s and ETA from wall time between reports; formats the console line."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self._last_time, 1e-9)
    rate = (step - self._last_step) / dt
    self._last_step, self._last_time = step, now
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_seconds": eta}

  def line(self, step: int, rate: float, eta: float, scalars: dict, keys=None) -> str:
    keys = keys or [k for k in scalars if k.startswith("loss/")][:3]
    parts = [f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)", f"{rate:.2f} steps/s"]
    parts.append(f"ETA {_fmt_duration(eta) if np.isfinite(eta) else '?'}")
    parts += [f"{k}={float(scalars[k]):.4g}" for k in keys if k in scalars]
    return " | ".join(parts)


def log_line(text: str) -> None:
  if jax.process_index() == 0:
    logging.info("%s", text)
    print(text, flush=True)

"""Preemption: checkpoint at the current step and exit when the scheduler asks.

Single process: SIGTERM (what Kubernetes, Slurm and Cloud TPU VMs send before
they evict) and SIGINT (Ctrl-C) set a Python flag; the loop reads it after
every step (no device sync) and, when it is set, writes a checkpoint of the
current step and raises `Preempted`. The command line turns that into exit
status `PREEMPTED_EXIT_CODE` (75, sysexits' EX_TEMPFAIL: "try again"); rerunning
the same command resumes from that checkpoint. A second signal while the
checkpoint is written ends the process the default way (the previous complete
checkpoint stays valid, see `checkpoint.py`).

Multi-process (after `jax.distributed.initialize`): every process must save
the same step, so the decision comes from JAX's preemption sync service
(`multihost_utils.reached_preemption_sync_point`, through Orbax's
`CheckpointManager.reached_preemption`). That service catches SIGTERM and TPU
maintenance-event notices itself and agrees on a step all hosts reach; no
Python handler is installed there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, rerun to continue


class Preempted(Exception):  # noqa: N818  (an outcome, not an error)
  """The run saved a checkpoint at `step` and stopped on a preemption notice."""

  def __init__(self, step: int, directory: str, reason: str):
    super().__init__(
      f"preempted ({reason}) at step {step}: checkpoint saved in {directory}; rerun the same command to resume"
    )
    self.step = step
    self.directory = directory
    self.reason = reason


class PreemptionWatch:
  """Knows whether the run has been asked to stop; cheap to query every step.

  Use as a context manager around the loop: it installs the signal handlers on
  entry (main thread, single process only) and restores the previous ones on
  exit. `reached(step)` is True once the run should checkpoint `step` and stop.
  """

  def __init__(
    self,
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
    sync_point: Callable[[int], bool] | None = None,
  ):
    self._signals = signals
    self._sync_point = sync_point  # multi-process: the preemption service's agreement
    self._previous: dict[int, object] = {}
    self.reason: str | None = None

  def __enter__(self) -> PreemptionWatch:
    if self._sync_point is None and threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if self.reason is not None:  # second notice: stop now, the default way
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.reason = name
    print(f"received {name}: saving a checkpoint at the end of this step, then exiting", file=sys.stderr, flush=True)

  def request(self, reason: str) -> None:
    """Marks the run as preempted (tests, or a job's own notice, e.g. a deadline)."""
    self.reason = self.reason or reason

  def reached(self, step: int) -> bool:
    if self.reason is not None:
      return True
    if self._sync_point is not None and self._sync_point(step):
      self.reason = "preemption notice (sync point)"
      return True
    return False


def watch_for(checkpointer) -> PreemptionWatch:
  """A watch for this run: Python signal handlers, or the JAX preemption service on multi-process runs."""
  import jax

  if jax.process_count() > 1:
    return PreemptionWatch(sync_point=checkpointer.reached_preemption)
  return PreemptionWatch()


_finished = False


def exit_on_signal_outside_loop() -> None:
  """Command line, single process: SIGTERM outside the training loop ends the process at once.

  Before the loop (start-up, compilation) nothing is lost: exit 75, rerun.
  After it (export, shutdown), every checkpoint is complete: exit 0 once the
  job has returned (`mark_finished`), else 75 so the rerun redoes the export.
  The loop's `PreemptionWatch` replaces this handler while it runs.
  """

  def handle(signum, frame):
    code = 0 if _finished else PREEMPTED_EXIT_CODE
    name = signal.Signals(signum).name
    print(f"received {name} outside the training loop: exiting with status {code}", file=sys.stderr, flush=True)
    os._exit(code)

  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, handle)


def mark_finished() -> None:
  global _finished
  _finished = True

"""Fault injection for the reliability tests and `benchmarks/faults.py`.

Configured by the optional `config.debug` section (all off by default):

  debug.nan_at_steps      tuple of step numbers whose update sees a NaN teacher
                          (the same compiled step, called with poisoned teacher
                          parameters: the normal path is untouched)
  debug.kill_at_step      SIGKILL this process at that step (-1: never) ...
  debug.kill_phase        ... right after the step ("step") or right after the
                          checkpoint save of that step was started ("save",
                          i.e. while the asynchronous write is in flight)
  debug.sigterm_at_step   send SIGTERM to this process after that step (-1: never)

Step numbers count updates from 1: step N is the update that takes the state
from `state.step == N - 1` to `N` (its key is `fold_in(base_key, N - 1)`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import jax
import jax.numpy as jnp

KILL_PHASES = ("step", "save")


@dataclasses.dataclass(frozen=True)
class FaultPlan:
  nan_at_steps: tuple[int, ...] = ()
  kill_at_step: int = -1
  kill_phase: str = "step"
  sigterm_at_step: int = -1

  @classmethod
  def from_config(cls, debug) -> FaultPlan:
    if debug is None:
      return cls()
    return cls(
      nan_at_steps=tuple(int(s) for s in (debug.get("nan_at_steps") or ())),
      kill_at_step=int(debug.get("kill_at_step", -1)),
      kill_phase=str(debug.get("kill_phase", "step")),
      sigterm_at_step=int(debug.get("sigterm_at_step", -1)),
    )

  @property
  def active(self) -> bool:
    return bool(self.nan_at_steps) or self.kill_at_step >= 0 or self.sigterm_at_step >= 0

  def poison_step(self, step: int) -> bool:
    """Whether update number `step` gets the NaN teacher."""
    return step in self.nan_at_steps

  def after(self, step: int, phase: str) -> None:
    """Called by the loop after `phase` ("step" or "save") of update `step`."""
    if phase == "step" and step == self.sigterm_at_step:
      print(f"fault injection: SIGTERM to self after step {step}", file=sys.stderr, flush=True)
      os.kill(os.getpid(), signal.SIGTERM)
    if step == self.kill_at_step and phase == self.kill_phase:
      print(f"fault injection: SIGKILL after {phase} of step {step}", file=sys.stderr, flush=True)
      os.kill(os.getpid(), signal.SIGKILL)


def poisoned(tree):
  """`tree` with every floating-point leaf NaN (same shapes, dtypes and shardings)."""
  return jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

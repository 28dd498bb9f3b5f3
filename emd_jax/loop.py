"""The training loop shared by every job (distillation, teacher pre-training, UD2M).

A job supplies a jitted `step_fn(state) -> (state, metrics)` (it pulls its own
batch, if any), an `evaluate(state, step) -> (scalars, images)` and the
fingerprint its checkpoints must match. The loop owns everything around the
network passes: resume, logging (TensorBoard via CLU + a console line with
steps/s and ETA), periodic evaluation, checkpoints, and the non-finite stop.
Host syncs happen only at log, eval and checkpoint steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax

from emd_jax import checkpoint as ckpt_lib
from emd_jax import metrics as metrics_lib


class TrainingError(RuntimeError):
  """Training stopped for a reason the user must see (e.g. repeated non-finite steps)."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  total_steps: int
  log_every: int = 100
  eval_every: int = 1000
  checkpoint_every: int = 1000
  nonfinite_limit: int = 20

  @classmethod
  def from_config(cls, config) -> LoopConfig:
    return cls(
      total_steps=config.total_steps,
      log_every=config.log_every,
      eval_every=config.eval_every,
      checkpoint_every=config.checkpoint_every,
      nonfinite_limit=config.get("nonfinite_limit", 20),
    )


def restore_or_init(
  checkpointer: ckpt_lib.Checkpointer,
  abstract,
  shardings,
  fingerprint: dict,
  init_fn: Callable[[], Any],
) -> tuple[Any, int | None]:
  """Restores the latest checkpoint (checking its fingerprint) or builds a fresh state.

  Returns `(state, restored_step or None)`.
  """
  latest = checkpointer.latest_step()
  if latest is None:
    return jax.device_put(init_fn(), shardings), None
  state, meta = checkpointer.restore(latest, ckpt_lib.abstract_like(abstract, shardings))
  if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
    raise TrainingError(
      f"checkpoint at step {latest} in {checkpointer.directory} was written for another architecture, teacher "
      "or data shape; use a new --workdir"
    )
  metrics_lib.log_line(f"resumed from checkpoint step {latest}")
  return state, latest


def run_loop(
  cfg: LoopConfig,
  state,
  step_fn: Callable[[Any], tuple[Any, dict]],
  *,
  checkpointer: ckpt_lib.Checkpointer,
  writer,
  meta: dict,
  evaluate: Callable[[Any, int], tuple[dict, dict]] | None = None,
  console_keys: list[str] | None = None,
) -> tuple[Any, dict]:
  """Runs `step_fn` until `cfg.total_steps`; returns `(state, last evaluation scalars)`."""
  step = int(jax.device_get(state.step))
  progress = metrics_lib.Progress(cfg.total_steps, step)
  last_eval: dict = {}
  t_start = time.perf_counter()
  while step < cfg.total_steps:
    state, m = step_fn(state)
    step += 1
    last = step == cfg.total_steps
    if step % cfg.log_every == 0 or last:
      m = jax.device_get(m)
      rates = progress.update(step)
      writer.write_scalars(step, {**m, "steps_per_sec": rates["steps_per_sec"]})
      metrics_lib.log_line(progress.line(step, rates["steps_per_sec"], rates["eta_seconds"], m, console_keys))
      streak = int(m.get("nonfinite/streak", 0))
      if streak >= cfg.nonfinite_limit:
        checkpointer.wait()
        raise TrainingError(
          f"step {step}: {streak} consecutive non-finite losses/gradients (limit nonfinite_limit="
          f"{cfg.nonfinite_limit}); updates were skipped, the last good checkpoint is kept in {checkpointer.directory}"
        )
    if evaluate is not None and (step % cfg.eval_every == 0 or last):
      scalars, images = evaluate(state, step)
      if scalars:
        writer.write_scalars(step, scalars)
        shown = {k: v for k, v in scalars.items() if "_detail/" not in k}  # per-mode/per-class stay in TB
        metrics_lib.log_line(f"eval step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
      if images:
        writer.write_images(step, images)
      last_eval = {**scalars, "step": step}
    if step % cfg.checkpoint_every == 0 or last:
      checkpointer.save(step, state, {**meta, "step": step})
  checkpointer.wait()
  writer.flush()
  metrics_lib.log_line(f"done: step {step}/{cfg.total_steps}, {time.perf_counter() - t_start:.1f}s in this run")
  last_eval.setdefault("step", step)
  return state, last_eval

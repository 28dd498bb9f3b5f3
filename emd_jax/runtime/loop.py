"""The training loop shared by every job (distillation, teacher pre-training, UD2M).

`runtime.runner.run_job` calls it with a jitted `step_fn(state) -> (state,
metrics)` (which pulls its own batch, if any), an `evaluate(state, step) ->
(scalars, images)` and the fingerprint its checkpoints must match. The loop
owns everything around the network passes: resume (falling back past unusable
checkpoints), logging (TensorBoard via CLU + a console line with steps/s and
ETA), periodic evaluation, checkpoints, preemption, loss-spike reports and the
non-finite stop. Host syncs happen only at log, eval and checkpoint steps;
every other step reads one Python flag (the preemption notice). The guarantees
are listed in docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from emd_jax.runtime import checkpoint as ckpt_lib
from emd_jax.runtime import logs as metrics_lib
from emd_jax.runtime import preemption
from emd_jax.runtime.faults import FaultPlan


class TrainingError(RuntimeError):
  """Training stopped for a reason the user must see (e.g. repeated non-finite steps)."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  total_steps: int
  log_every: int = 100
  eval_every: int = 1000
  checkpoint_every: int = 1000
  nonfinite_limit: int = 20
  spike_factor: float = 10.0  # a `loss/*` value above factor x its running mean (at log steps) is a spike; 0: off
  spike_decay: float = 0.9  # decay of that running mean, per log step
  faults: FaultPlan = FaultPlan()

  @classmethod
  def from_config(cls, config) -> LoopConfig:
    return cls(
      total_steps=config.total_steps,
      log_every=config.log_every,
      eval_every=config.eval_every,
      checkpoint_every=config.checkpoint_every,
      nonfinite_limit=config.get("nonfinite_limit", 20),
      spike_factor=float(config.get("spike_factor", 10.0)),
      faults=FaultPlan.from_config(config.get("debug")),
    )


def flatten_dotted(d, prefix: str = "") -> dict:
  """A nested dict as one level with dotted keys (`{'a': {'b': 1}}` -> `{'a.b': 1}`)."""
  if not isinstance(d, dict):
    return {prefix.rstrip("."): d}
  out = {}
  for k, v in d.items():
    out.update(flatten_dotted(v, f"{prefix}{k}."))
  return out


def fingerprint_diff(saved, current: dict, limit: int = 6) -> list[str]:
  """Human-readable differences between a checkpoint's fingerprint and this run's."""
  if saved is None:
    return ["the checkpoint has no fingerprint"]
  a, b = flatten_dotted(saved), flatten_dotted(json.loads(json.dumps(current)))
  out = []
  for key in sorted(set(a) | set(b)):
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      out.append(f"{key or '(root)'}: checkpoint {a.get(key, '<absent>')!r}, this run {b.get(key, '<absent>')!r}")
  if len(out) > limit:
    out = out[:limit] + [f"... {len(out) - limit} more"]
  return out


def resume_or_init(
  checkpointer: ckpt_lib.Checkpointer,
  abstract,
  shardings,
  fingerprint: dict,
  init_fn: Callable[[], Any],
) -> tuple[Any, int | None]:
  """Resumes from the newest usable checkpoint (checking its fingerprint) or builds a fresh state.

  The checkpoint is restored by Orbax straight into `shardings`; `init_fn()` must return a
  state that is already sharded so (e.g. `jax.jit(init, out_shardings=shardings)()`,
  `runtime.runner.sharded_init`): it is called only when no checkpoint is usable.
  A step that cannot be read, whose arrays have other shapes or whose
  checksums do not match is reported (step and reason), renamed aside and
  skipped: the next older one is tried. A fingerprint that differs from this
  run's is an error (the workdir belongs to another run), naming the fields.
  Returns `(state, resumed_step or None)`.
  """
  target = ckpt_lib.abstract_like(abstract, shardings)
  skipped = []
  for step in reversed(checkpointer.all_steps()):
    try:
      meta = checkpointer.restore_meta(step)
      diff = fingerprint_diff(meta.get("fingerprint"), fingerprint)
      if diff:
        raise TrainingError(
          f"checkpoint at step {step} in {checkpointer.directory} was written for another architecture, teacher "
          f"or data shape ({'; '.join(diff)}); use a new --workdir"
        )
      state, meta = checkpointer.restore(step, target)
      saved_step = getattr(state, "step", None)
      if saved_step is not None and int(jax.device_get(saved_step)) != step:
        raise ckpt_lib.CorruptCheckpointError(step, f"its state says step {int(jax.device_get(saved_step))}")
    except ckpt_lib.CorruptCheckpointError as e:
      where = checkpointer.quarantine(step, str(e))
      metrics_lib.log_line(f"warning: {e}; moved aside to {where}, trying an older checkpoint")
      skipped.append(step)
      continue
    metrics_lib.log_line(f"resumed from checkpoint step {step}")
    return state, step
  if skipped:
    metrics_lib.log_line(f"warning: no usable checkpoint (skipped steps {skipped}); starting from the beginning")
  return init_fn(), None


class SpikeMonitor:
  """Reports `loss/*` values far above their running mean of magnitudes (host side, at log steps)."""

  def __init__(self, factor: float, decay: float = 0.9, warmup: int = 3):
    self.factor, self.decay, self.warmup = factor, decay, warmup
    self._mean: dict[str, float] = {}
    self._seen: dict[str, int] = {}
    self.count = 0

  def update(self, step: int, scalars: dict) -> list[str]:
    """Returns the names that spiked at `step` (and logs a warning for each)."""
    if self.factor <= 0:
      return []
    spiked = []
    for name, value in scalars.items():
      if not name.startswith("loss/"):
        continue
      v = abs(float(value))
      if not math.isfinite(v):
        continue  # counted by the non-finite guard
      mean, seen = self._mean.get(name), self._seen.get(name, 0)
      if mean is not None and seen >= self.warmup and v > self.factor * max(mean, 1e-12):
        spiked.append(name)
        logging.warning("step %d: loss spike %s=%.4g, %.1fx its running mean %.4g", step, name, v, v / mean, mean)
        metrics_lib.log_line(f"warning: step {step}: loss spike {name}={v:.4g} ({v / mean:.1f}x running mean)")
      self._mean[name] = v if mean is None else self.decay * mean + (1 - self.decay) * v
      self._seen[name] = seen + 1
    self.count += len(spiked)
    return spiked


def _report_nonfinite(pending: list[tuple[int, Any, Any]], seed) -> int:
  """Logs each skipped step of the interval with what reproduces it; returns the interval's longest streak.

  `pending` holds `(step, skipped, streak)` device scalars: one device_get at a log step.
  """
  values = jax.device_get([(skipped, streak) for _, skipped, streak in pending])
  for (step, _, _), (skipped, _) in zip(pending, values, strict=True):
    if int(skipped):
      metrics_lib.log_line(
        f"warning: step {step}: non-finite loss or gradient, update skipped; its key is fold_in(base key of "
        f"seed {seed}, {step - 1}); replay: python -m emd_jax.replay --config ... --workdir ... --step {step}"
      )
  return max((int(streak) for _, streak in values), default=0)


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
  nan_step_fn: Callable[[Any], tuple[Any, dict]] | None = None,
) -> tuple[Any, dict]:
  """Runs `step_fn` until `cfg.total_steps`; returns `(state, last evaluation scalars)`.

  `nan_step_fn` is the same step with NaN inputs (fault injection:
  `cfg.faults.nan_at_steps`). Raises `preemption.Preempted` after saving a
  checkpoint when a preemption notice arrives, `TrainingError` after
  `cfg.nonfinite_limit` consecutive non-finite steps.
  """
  faults = cfg.faults
  if faults.nan_at_steps and nan_step_fn is None:
    raise TrainingError("debug.nan_at_steps: this job does not support NaN injection")
  step = int(jax.device_get(state.step))
  progress = metrics_lib.Progress(cfg.total_steps, step)
  spikes = SpikeMonitor(cfg.spike_factor, cfg.spike_decay)
  seed = meta.get("config", {}).get("seed")
  pending: list[tuple[int, Any, Any]] = []  # (step, skipped, streak) device scalars since the last log
  last_eval: dict = {}
  t_start = time.perf_counter()
  with preemption.watch_for(checkpointer) as watch:
    while step < cfg.total_steps:
      fn = nan_step_fn if faults.poison_step(step + 1) else step_fn
      state, m = fn(state)
      step += 1
      if faults.active:
        faults.after(step, "step")
      last = step == cfg.total_steps
      if "nonfinite/skipped" in m:
        pending.append((step, m["nonfinite/skipped"], m["nonfinite/streak"]))
      if step % cfg.log_every == 0 or last:
        m = jax.device_get(m)
        max_streak, pending = _report_nonfinite(pending, seed), []
        rates = progress.update(step)
        spikes.update(step, m)
        writer.write_scalars(step, {**m, "steps_per_sec": rates["steps_per_sec"], "spikes/count": spikes.count})
        metrics_lib.log_line(progress.line(step, rates["steps_per_sec"], rates["eta_seconds"], m, console_keys))
        if max_streak >= cfg.nonfinite_limit:
          checkpointer.wait()
          writer.flush()
          raise TrainingError(
            f"step {step}: {max_streak} consecutive non-finite losses/gradients (limit nonfinite_limit="
            f"{cfg.nonfinite_limit}); updates were skipped, the last good checkpoint is kept in "
            f"{checkpointer.directory}"
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
      saved = False
      if step % cfg.checkpoint_every == 0 or last:
        saved = checkpointer.save(step, state, {**meta, "step": step})
        if faults.active:
          faults.after(step, "save")
      if watch.reached(step) and not last:
        if not saved:
          checkpointer.save(step, state, {**meta, "step": step}, force=True)
        checkpointer.wait()
        writer.flush()
        raise preemption.Preempted(step, checkpointer.directory, watch.reason or "notice")
    checkpointer.wait()  # the final checkpoint is written while the handlers are still installed
    writer.flush()
    if watch.reason is not None:  # the notice came with the last update: its checkpoint is complete
      raise preemption.Preempted(step, checkpointer.directory, watch.reason)
  metrics_lib.log_line(f"done: step {step}/{cfg.total_steps}, {time.perf_counter() - t_start:.1f}s in this run")
  last_eval.setdefault("step", step)
  return state, last_eval

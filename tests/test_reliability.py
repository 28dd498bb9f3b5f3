"""Fault injection: kills, preemption, corrupt checkpoints, NaN steps, loss spikes (docs/reliability.md)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gmm_tiny
from helpers import trees_equal as _equal

from emd_jax.jobs import distill as train
from emd_jax.runtime import checkpoint as ckpt_lib
from emd_jax.runtime import loop
from emd_jax.runtime.preemption import PREEMPTED_EXIT_CODE, Preempted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 20, 5
# Short runs, a checkpoint every 5 steps, no evaluation before the end, no export.
BASE = {
  "total_steps": STEPS,
  "checkpoint_every": EVERY,
  "log_every": EVERY,
  "eval_every": 1000,
  "export_at_end": False,
}


def tiny(**overrides):
  return gmm_tiny(**{**BASE, **overrides})


def _restore(workdir, like, step: int | None = None):
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step() if step is None else step
  state, _ = ck.restore(step, ckpt_lib.abstract_like(like))
  ck.close()
  return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every faulty run must reproduce bit for bit."""
  return train.train_and_evaluate(tiny(), str(tmp_path_factory.mktemp("reference")))["state"]


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
  """A run stopped at step 15 (checkpoints 5, 10, 15); tests copy it before damaging it."""
  w = str(tmp_path_factory.mktemp("partial") / "w")
  train.train_and_evaluate(tiny(total_steps=15), w)
  return w


# ----------------------------------------------------------------------------- kills and preemption


def _cli(workdir, *overrides):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  args = [f"--config.{k}={v}" for k, v in BASE.items()] + [f"--config.{o}" for o in overrides]
  cmd = [sys.executable, "-m", "emd_jax.main", "--config", "configs/gmm.py:tiny", "--workdir", str(workdir), *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def _resumed_from(text: str) -> int:
  lines = [ln for ln in text.splitlines() if ln.startswith("resumed from checkpoint step")]
  return int(lines[-1].split()[-1]) if lines else 0


@pytest.mark.slow  # kills and resumes real processes, about 60 s; --runslow
def test_sigkill_anywhere_and_sigterm_resume_bit_identically(tmp_path, reference, capsys):
  """SIGKILL during an async checkpoint write, SIGKILL between steps, SIGTERM: then the same final state."""
  rng = np.random.default_rng(6)
  k1 = int(rng.choice([EVERY, 2 * EVERY]))  # killed right after the save of k1 started
  k2 = int(rng.integers(k1 + 1, 3 * EVERY + 1))  # killed after an update
  k3 = int(rng.integers(k2 + 1, STEPS))  # SIGTERM: checkpoint and exit 75
  w = tmp_path / "w"
  # Asynchronous writes (the paper configs' choice), so that the first kill can land mid-write.
  r = _cli(w, "checkpoint_async=True", f"debug.kill_at_step={k1}", "debug.kill_phase=save")
  assert r.returncode == -9, r.stderr[-2000:]
  r = _cli(w, "checkpoint_async=True", f"debug.kill_at_step={k2}", "debug.kill_phase=step")
  assert r.returncode == -9, r.stderr[-2000:]
  resumed = _resumed_from(r.stdout)
  assert k1 - EVERY <= resumed <= k1, r.stdout  # the write killed mid-way is ignored, or it had completed
  r = _cli(w, f"debug.sigterm_at_step={k3}")
  assert r.returncode == PREEMPTED_EXIT_CODE, r.stderr[-2000:]
  # SIGKILL loses the steps since the last committed checkpoint: the newest one started at or
  # before k2, or the one before it if that write was still in flight (docs/reliability.md).
  newest = k2 // EVERY * EVERY
  assert newest - EVERY <= _resumed_from(r.stdout) <= newest, r.stdout
  assert f"preempted (SIGTERM) at step {k3}: checkpoint saved" in r.stderr
  assert "Traceback" not in r.stderr
  # The last relaunch runs in-process (same devices, same compiled code; saves a process start).
  capsys.readouterr()
  out = train.train_and_evaluate(tiny(), str(w))
  assert f"resumed from checkpoint step {k3}" in capsys.readouterr().out  # nothing lost on a preemption
  assert _equal(out["state"], reference)
  assert _equal(_restore(w, reference), reference)


def test_synchronous_checkpoints_bound_a_kill_to_one_interval(tmp_path, reference, capsys):
  """checkpoint_async=False (the default): a SIGKILL right after a save, or between steps, loses < one interval."""
  rng = np.random.default_rng(7)
  k1 = int(rng.choice([EVERY, 2 * EVERY]))
  k2 = int(rng.integers(k1 + 1, STEPS))
  w = tmp_path / "w"
  r = _cli(w, "checkpoint_async=False", f"debug.kill_at_step={k1}", "debug.kill_phase=save")
  assert r.returncode == -9, r.stderr[-2000:]
  assert not glob.glob(os.path.join(w, "checkpoints", "*tmp*"))  # the write had committed before the kill
  r = _cli(w, "checkpoint_async=False", f"debug.kill_at_step={k2}", "debug.kill_phase=step")
  assert r.returncode == -9, r.stderr[-2000:]
  assert _resumed_from(r.stdout) == k1, r.stdout  # nothing of the save at k1 was lost
  capsys.readouterr()
  out = train.train_and_evaluate(tiny(checkpoint_async=False), str(w))
  resumed = _resumed_from(capsys.readouterr().out)
  assert resumed == k2 // EVERY * EVERY and k2 - resumed < EVERY
  assert _equal(out["state"], reference)


# ----------------------------------------------------------------------------- corrupt checkpoints


def _data_files(step_dir: str) -> list[str]:
  """The state's array data files (OCDBT: several per step; which one holds an array varies)."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return [f for f in files if os.path.isfile(f)]


def _truncate(step_dir):
  for f in _data_files(step_dir):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _drop(item):
  def fn(step_dir):
    shutil.rmtree(os.path.join(step_dir, item))

  return fn


@pytest.mark.parametrize(
  "corrupt, reason",
  [(_truncate, "Error reading"), (_drop("meta"), "meta"), (_drop("state"), "state")],
  ids=["truncated", "no-meta", "no-state"],
)
def test_corrupt_latest_checkpoint_falls_back_and_is_kept_aside(tmp_path, reference, partial, capsys, corrupt, reason):
  w = str(tmp_path / "w")
  shutil.copytree(partial, w)
  ckdir = os.path.join(w, "checkpoints")
  corrupt(os.path.join(ckdir, "15"))
  capsys.readouterr()
  full = corrupt is _truncate  # one case trains on to the end; the others only resume (cheaper)
  out = train.train_and_evaluate(tiny() if full else tiny(total_steps=10), w)
  text = capsys.readouterr().out
  assert "checkpoint step 15 is unusable" in text and reason in text, text
  assert "resumed from checkpoint step 10" in text
  aside = glob.glob(os.path.join(ckdir, f"{ckpt_lib.QUARANTINE_PREFIX}15-*"))
  assert len(aside) == 1 and "WHY_QUARANTINED.txt" in os.listdir(aside[0])  # renamed, not deleted
  if full:
    assert _equal(out["state"], reference)  # step 15 was written again, from good data
    assert os.path.isdir(os.path.join(ckdir, "15"))


def test_checkpointer_detects_shape_mismatch_and_reuses_a_quarantined_step(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), asynchronous=False)
  tree = {"a": jnp.arange(100, dtype=jnp.float32), "b": jnp.ones((3, 3), jnp.bfloat16)}
  ck.save(1, tree, {"note": "x"})
  ck.wait()
  other = {"a": jax.ShapeDtypeStruct((50,), jnp.float32), "b": jax.ShapeDtypeStruct((3, 3), jnp.bfloat16)}
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="step 1 is unusable"):
    ck.restore(1, other)
  restored, meta = ck.restore(1, ckpt_lib.abstract_like(tree))
  assert _equal(restored, tree) and meta["note"] == "x" and len(meta["checksums"]) == 2
  # Bytes that changed after the write (restores without an Orbax error): the checksums catch it.
  bad = {**tree, "a": tree["a"].at[7].set(0.0)}
  ck._mngr.save(
    2,
    args=ckpt_lib.ocp.args.Composite(state=ckpt_lib.ocp.args.StandardSave(bad), meta=ckpt_lib.ocp.args.JsonSave(meta)),
  )
  ck.wait()
  with pytest.raises(
    ckpt_lib.CorruptCheckpointError, match=r"step 2 is unusable: checksum mismatch in 1 array\(s\): \['a'\]"
  ):
    ck.restore(2, ckpt_lib.abstract_like(tree))
  ck.quarantine(2, "test")
  ck.quarantine(1, "test")
  assert ck.all_steps() == []
  ck.save(1, tree, {})  # the same step number again: no collision with the one moved aside
  ck.wait()
  assert ck.all_steps() == [1]
  ck.close()


def test_wrong_workdir_is_an_error_naming_the_fields(tmp_path, partial):
  w = str(tmp_path / "w")
  shutil.copytree(partial, w)
  with pytest.raises(train.TrainingError, match=r"net\.hidden: checkpoint 32, this run 16.*new --workdir"):
    train.train_and_evaluate(tiny(**{"net.hidden": 16}), w)
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["10", "15", "5"]  # nothing moved or written


# ----------------------------------------------------------------------------- divergence


def test_injected_nan_steps_are_skipped_counted_and_logged(tmp_path, capsys, reference):
  cfg = tiny(**{"debug.nan_at_steps": (12, 13)})
  out = train.train_and_evaluate(cfg, str(tmp_path))
  text = capsys.readouterr().out
  st = out["state"]
  assert int(st.nonfinite_count) == 2 and int(st.step) == STEPS
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(st.gen_params))
  assert "step 12: non-finite" in text and "step 13: non-finite" in text and "seed 0, 12)" in text
  assert not _equal(st.gen_params, reference.gen_params)  # two updates fewer
  # The logged step can be replayed: its input state (from checkpoint 10 + update 11, 12), key and outcome.
  from emd_jax.replay import replay_step

  again = replay_step(cfg, str(tmp_path), 13)
  assert again["from_checkpoint"] == 10 and int(again["state"].step) == 12
  assert int(again["metrics"]["nonfinite/skipped"]) == 1 and int(again["state"].nonfinite_count) == 1


def test_nonfinite_limit_stops_with_last_good_checkpoint(tmp_path):
  w = str(tmp_path)
  nan_steps = tuple(range(8, STEPS + 1))
  with pytest.raises(train.TrainingError, match="consecutive non-finite"):
    train.train_and_evaluate(tiny(nonfinite_limit=3, **{"debug.nan_at_steps": nan_steps}), w)
  ck = ckpt_lib.Checkpointer(os.path.join(w, "checkpoints"))
  assert ck.all_steps() == [5]  # the stop came at log step 10, before its checkpoint: step 5 is the last good one
  ck.close()


def test_spike_monitor():
  mon = loop.SpikeMonitor(factor=10.0, decay=0.5, warmup=3)
  for step in range(5):
    assert mon.update(step, {"loss/a": 1.0, "other": 1e9}) == []
  assert mon.update(5, {"loss/a": 50.0, "loss/b": 1.0}) == ["loss/a"]
  assert mon.update(6, {"loss/a": float("nan")}) == [] and mon.count == 1
  assert loop.SpikeMonitor(factor=0.0).update(0, {"loss/a": 1e9}) == []


def test_preemption_watch_catches_sigterm_and_restores_the_handler():
  import signal

  from emd_jax.runtime.preemption import PreemptionWatch

  before = signal.getsignal(signal.SIGTERM)
  with PreemptionWatch() as watch:
    assert not watch.reached(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.reached(1) and watch.reason == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before
  synced = PreemptionWatch(sync_point=lambda step: step == 3)  # multi-process: the service decides
  assert not synced.reached(2) and synced.reached(3)
  e = Preempted(7, "/ckpt", "SIGTERM")
  assert str(e).startswith("preempted (SIGTERM) at step 7: checkpoint saved in /ckpt; rerun")

"""Fault-injection campaign on the GMM config: kills, preemptions, corrupt checkpoints, NaN steps.

Every trial starts a fresh workdir, hurts the run in one way (seeded), relaunches the
same command until it finishes, and compares the final checkpoint's arrays with an
uninterrupted run's, bit for bit:

  kill_time      SIGKILL from outside after a random delay (any moment: compile, step,
                 evaluation, checkpoint write), 1-3 times per trial
  kill_save      SIGKILL from inside right after a checkpoint save started (write in flight)
  kill_step      SIGKILL from inside right after a random update
  sigterm        SIGTERM from outside after a random delay: must exit 75 and lose nothing
  corrupt        a finished run's newest checkpoint damaged (truncated data, zeroed data,
                 missing item, garbage metadata), then the run extended: must detect it,
                 fall back and end bit-identical
  nan            NaN teacher at random steps: must skip exactly those updates, stay finite

  python benchmarks/faults.py --trials 2 --out benchmarks/results/faults
  python benchmarks/faults.py --trials 2 --async_writes --out benchmarks/results/faults_async

Writes `<out>.json` (every trial) and `<out>.md` (the summary table).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
KINDS = ("kill_time", "kill_save", "kill_step", "sigterm", "corrupt", "nan")


class Runner:
  """Launches `python -m emd_jax.main` on the tiny GMM config and follows its console."""

  def __init__(self, steps: int, every: int, cache: str, sync: bool = False):
    self.steps, self.every, self.sync = steps, every, sync
    self.env = {
      **os.environ,
      "XLA_FLAGS": "",
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": cache,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }

  def cmd(self, workdir: str, overrides=(), steps: int | None = None) -> list[str]:
    base = {
      "total_steps": steps or self.steps,
      "checkpoint_every": self.every,
      "log_every": 1,  # a console line per step: exact "last step reached" before a kill
      "eval_every": 100000,
      "export_at_end": False,
      "checkpoint_async": not self.sync,
    }
    args = [f"--config.{k}={v}" for k, v in base.items()] + [f"--config.{o}" for o in overrides]
    return [sys.executable, "-m", "emd_jax.main", "--config", "configs/gmm.py:tiny", "--workdir", workdir, *args]

  def run(self, workdir: str, overrides=(), steps=None, kill_after: float | None = None, sig=signal.SIGKILL) -> dict:
    """Runs once; with `kill_after`, sends `sig` that many seconds after the first step line."""
    p = subprocess.Popen(
      self.cmd(workdir, overrides, steps),
      cwd=REPO,
      env=self.env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    t0 = time.time()
    info = {"last_step": None, "resumed": 0, "lines": [], "first_step_s": None}
    started = threading.Event()

    def read():
      for line in p.stdout:
        info["lines"].append(line.rstrip())
        if line.startswith("step "):
          info["last_step"] = int(line.split()[1].split("/")[0])
          info["last_step_s"] = time.time() - t0
          if not started.is_set():
            info["first_step_s"] = time.time() - t0
            started.set()
        elif line.startswith("resumed from checkpoint step"):
          info["resumed"] = int(line.split()[-1])

    t = threading.Thread(target=read, daemon=True)
    t.start()
    if kill_after is not None:  # seconds from the start (>= 0) or, negative, -seconds after the first update
      if kill_after >= 0:
        time.sleep(kill_after)
      elif started.wait(timeout=600):
        time.sleep(-kill_after)
      if p.poll() is None:
        p.send_signal(sig)
    p.wait(timeout=900)
    t.join(timeout=10)
    info["returncode"] = p.returncode
    info["seconds"] = time.time() - t0
    info["text"] = "\n".join(info.pop("lines")[-30:])
    info["tmp_dirs"] = len(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))
    return info

  def finish(self, workdir: str, trial: dict, max_runs: int = 6) -> None:
    """Relaunches the plain command until it exits 0 (what a scheduler's restart loop does)."""
    for _ in range(max_runs):
      r = self.launch(workdir, trial)
      if r["returncode"] == 0:
        return
    trial["failed"] = f"did not finish: {r['text'][-500:]}"

  def launch(self, workdir: str, trial: dict, overrides=(), steps=None, kill_after=None, sig=signal.SIGKILL) -> dict:
    """`run`, plus the bookkeeping: resumes, and the work lost by the previous kill."""
    r = self.run(workdir, overrides, steps, kill_after, sig)
    trial["runs"] += 1
    trial["resumes"] += int(r["resumed"] > 0)
    # A kill's lost work is known once a later launch shows where it restarted: it printed
    # "resumed from checkpoint step N", or a step line (then it started from scratch), or it
    # finished. A launch killed before that tells nothing; its own kill, with no update seen
    # ("at" None), did no work and lost none.
    if r["resumed"] > 0 or r["last_step"] is not None or r["returncode"] == 0:
      for kill in trial["kills"]:
        if "lost" not in kill:
          kill["lost"] = 0 if kill["at"] is None else kill["at"] - r["resumed"]
    return r


def final_arrays(workdir: str, step: int):
  """The arrays of checkpoint `step`, as stored (no target tree needed), and its metadata."""
  import jax
  import orbax.checkpoint as ocp

  from emd_jax.runtime import checkpoint as ckpt_lib

  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  out = ck._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  ck.close()
  return [np.asarray(x) for x in jax.tree.leaves(out["state"])], out["meta"]


def corrupt(step_dir: str, how: str) -> None:
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  if how == "truncate":
    for f in files:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif how == "zero":  # a few bytes inside one data file: may restore without an Orbax error
    f = max(files, key=os.path.getsize)
    data = bytearray(open(f, "rb").read())
    data[100:2000] = bytes(len(data[100:2000]))
    open(f, "wb").write(bytes(data))
  elif how == "drop_state":
    shutil.rmtree(os.path.join(step_dir, "state"))
  elif how == "garbage_meta":
    for f in glob.glob(os.path.join(step_dir, "meta", "*")):
      if os.path.isfile(f) and not f.endswith("commit_success.txt"):
        open(f, "w").write("{garbage")


def trial(kind: str, i: int, rng: np.random.Generator, runner: Runner, ref, work: str, t_run: tuple) -> dict:
  wd = os.path.join(work, f"{kind}-{i}")
  tr = {"kind": kind, "trial": i, "runs": 0, "resumes": 0, "kills": [], "failed": None}
  S, E = runner.steps, runner.every
  if kind in ("kill_time", "sigterm"):
    for _ in range(int(rng.integers(1, 4)) if kind == "kill_time" else 1):
      if kind == "kill_time":  # any moment of a launch: start-up, compile, updates, checkpoint writes
        delay, sig = float(rng.uniform(0.0, t_run[0])), signal.SIGKILL
      else:  # during the updates
        delay, sig = -float(rng.uniform(0.0, t_run[1])), signal.SIGTERM
      r = runner.launch(wd, tr, kill_after=delay, sig=sig)
      if r["returncode"] == 0:
        break  # it finished before the signal
      kill = {"delay_s": round(delay, 2), "rc": r["returncode"], "at": r["last_step"], "tmp": r["tmp_dirs"]}
      tr["kills"].append(kill)
      if kind == "sigterm" and r["returncode"] != 75:
        tr["failed"] = f"SIGTERM gave exit status {r['returncode']}, not 75"
  elif kind in ("kill_save", "kill_step"):
    at = int(rng.integers(1, S // E) * E) if kind == "kill_save" else int(rng.integers(2, S))
    r = runner.launch(wd, tr, [f"debug.kill_at_step={at}", f"debug.kill_phase={kind[5:]}"])
    tr["kills"].append({"rc": r["returncode"], "at": at, "tmp": r["tmp_dirs"]})
  elif kind == "corrupt":
    tr["corruption"] = ["truncate", "zero", "drop_state", "garbage_meta"][i % 4]
    part = int(rng.integers(2, S // E)) * E
    runner.launch(wd, tr, steps=part)
    corrupt(os.path.join(wd, "checkpoints", str(part)), tr["corruption"])
    tr["corrupted_step"] = part
  elif kind == "nan":
    tr["nan_at"] = sorted(int(s) for s in rng.choice(np.arange(2, S), size=3, replace=False))
    r = runner.launch(wd, tr, ["debug.nan_at_steps=(" + ",".join(map(str, tr["nan_at"])) + ",)"])
    tr["skipped_logged"] = sorted(
      int(ln.split()[2].rstrip(":")) for ln in r["text"].splitlines() if "non-finite loss" in ln
    )
  runner.finish(wd, tr)
  if kind == "corrupt":
    tr["detected"] = bool(glob.glob(os.path.join(wd, "checkpoints", "corrupt-step*")))
  arrays, _ = final_arrays(wd, S)
  same = len(arrays) == len(ref) and all(np.array_equal(a, b) for a, b in zip(arrays, ref, strict=True))
  if kind == "nan":  # different by design (those updates were skipped); must stay finite
    tr["finite"] = all(np.all(np.isfinite(a)) for a in arrays if a.dtype.kind == "f")
    tr["bit_identical"] = None
  else:
    tr["bit_identical"] = same
  shutil.rmtree(wd, ignore_errors=True)
  return tr


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trials", type=int, default=2, help="trials per fault kind")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--every", type=int, default=10, help="checkpoint_every")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--kinds", default=",".join(KINDS))
  p.add_argument(
    "--async_writes",
    action="store_true",
    help="checkpoint_async=True (the paper configs' choice): saves overlap the next updates, so a "
    "kill may also lose the write in flight (bound: two intervals). Default: the default config's "
    "synchronous saves (bound: one interval).",
  )
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "faults"))
  p.add_argument("--render", help="only re-render <out>.md from this results JSON")
  args = p.parse_args()
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    for k, v in saved["args"].items():
      if k not in ("render", "out"):
        setattr(args, k, v)
    args.sync = saved["args"].get("sync", not saved["args"].get("async_writes", True))
    summary = summarize(saved["trials"], args)
    with open(args.out + ".md", "w") as f:
      f.write(markdown(summary, args, tuple(saved["launch_seconds"])))
    return 0
  args.sync = not args.async_writes
  work = tempfile.mkdtemp(prefix="emd-faults-")
  runner = Runner(args.steps, args.every, os.path.join(work, "jax_cache"), sync=args.sync)
  rng = np.random.default_rng(args.seed)
  ref_dir = os.path.join(work, "reference")
  runner.run(ref_dir, steps=2)  # fills the compilation cache, so that the timings below are a relaunch's
  shutil.rmtree(ref_dir)
  r = runner.run(ref_dir)
  assert r["returncode"] == 0, r["text"]
  t_run = (r["seconds"], r["last_step_s"] - r["first_step_s"])  # whole launch, first to last update
  ref, _ = final_arrays(ref_dir, args.steps)
  print(f"reference run: {t_run[0]:.1f}s for {args.steps} steps ({t_run[1]:.1f}s of updates)", flush=True)
  trials = []
  for kind in args.kinds.split(","):
    for i in range(args.trials):
      tr = trial(kind, i, rng, runner, ref, work, t_run)
      trials.append(tr)
      print(json.dumps(tr), flush=True)
  summary = summarize(trials, args)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump({"args": vars(args), "launch_seconds": t_run, "summary": summary, "trials": trials}, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(markdown(summary, args, t_run))
  print(markdown(summary, args, t_run))
  shutil.rmtree(work, ignore_errors=True)
  return 0 if summary["data_loss_cases"] == 0 else 1


def summarize(trials: list[dict], args) -> dict:
  kills = [k for t in trials for k in t["kills"]]
  out = {
    "trials": len(trials),
    "runs": sum(t["runs"] for t in trials),
    "faults_injected": len(kills) + sum(t["kind"] in ("corrupt", "nan") for t in trials),
    "resumed_runs": sum(t["resumes"] for t in trials),
    "bit_identical": sum(bool(t["bit_identical"]) for t in trials),
    "bit_identical_expected": sum(t["bit_identical"] is not None for t in trials),
    "kills_mid_write": sum(k.get("tmp", 0) > 0 for k in kills),
    "corruptions_detected": sum(bool(t.get("detected")) for t in trials if t["kind"] == "corrupt"),
    "corruptions": sum(t["kind"] == "corrupt" for t in trials),
    "nan_trials_ok": sum(
      bool(t.get("finite")) and t.get("skipped_logged") == t.get("nan_at") for t in trials if t["kind"] == "nan"
    ),
    "nan_trials": sum(t["kind"] == "nan" for t in trials),
    "failed": [f"{t['kind']}-{t['trial']}: {t['failed']}" for t in trials if t["failed"]],
  }
  out["data_loss_cases"] = (out["bit_identical_expected"] - out["bit_identical"]) + len(out["failed"])
  out["lost_steps"] = [k["lost"] for k in kills if k.get("lost") is not None and k["rc"] != 75]
  out["lost_steps_sigterm"] = [k["lost"] for k in kills if k.get("lost") is not None and k["rc"] == 75]
  out["kill_bound"] = kill_bound(args)
  out["kills_over_bound"] = sum(v > out["kill_bound"] for v in out["lost_steps"]) + sum(out["lost_steps_sigterm"])
  return out


def kill_bound(args) -> int:
  """Steps a SIGKILL may cost: one interval with synchronous saves; with asynchronous ones the
  write of the newest checkpoint may still be in flight, so up to the interval before it too."""
  return args.every if getattr(args, "sync", False) else 2 * args.every


def markdown(s: dict, args, t_run: tuple) -> str:
  lost = s["lost_steps"]
  bound = kill_bound(args)
  bound_name = "checkpoint_every" if getattr(args, "sync", False) else "2 x checkpoint_every"
  rows = [
    ("trials (fault kinds x trials)", f"{s['trials']} ({args.kinds})"),
    ("trainer launches", s["runs"]),
    ("faults injected (kills, SIGTERMs, corruptions, NaN sets)", s["faults_injected"]),
    ("relaunches that resumed from a checkpoint", s["resumed_runs"]),
    ("bit-identical final state / expected", f"{s['bit_identical']} / {s['bit_identical_expected']}"),
    ("kills that left a partial (tmp) checkpoint write", s["kills_mid_write"]),
    ("corrupt checkpoints detected / injected", f"{s['corruptions_detected']} / {s['corruptions']}"),
    ("NaN trials: exactly the injected steps skipped, state finite", f"{s['nan_trials_ok']} / {s['nan_trials']}"),
    (
      f"steps lost per SIGKILL: max / mean (bound: {bound_name})",
      f"{max(lost)} / {np.mean(lost):.1f} ({bound})" if lost else "n/a",
    ),
    ("steps lost per SIGTERM (bound: 0)", ", ".join(map(str, s["lost_steps_sigterm"])) or "n/a"),
    ("kills over their bound", s["kills_over_bound"]),
    ("cases with data loss", s["data_loss_cases"]),
  ]
  text = f"# Fault-injection campaign (`benchmarks/faults.py`, seed {args.seed})\n\n"
  text += (
    f"GMM tiny config, {args.steps} steps, checkpoint every {args.every} "
    f"({'synchronous' if getattr(args, 'sync', False) else 'asynchronous'} writes); one launch takes {t_run[0]:.0f}s "
    f"({t_run[1]:.0f}s of updates). Kills land at a uniformly random time of a launch (`kill_time`), right "
    "after a checkpoint save started (`kill_save`) or after a random update (`kill_step`).\n\n"
  )
  text += "| measure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
  if s["failed"]:
    text += "\nFailures:\n" + "".join(f"- {f}\n" for f in s["failed"])
  return text


if __name__ == "__main__":
  sys.exit(main())

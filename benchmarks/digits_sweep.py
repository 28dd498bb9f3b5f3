"""Hyperparameter sweep of one-step digits students: config overrides vs Frechet distance.

Each variant is `configs/digits.py` with a set of config overrides, distilled for
`--steps` from the shipped teacher; its EMA generator is then scored twice, on
`--num_samples` one-step samples from each of two latent sets (seeds 0 and 1), and
the mean FD is divided by the teacher's FD (`--teacher_fd`, from
benchmarks/results/digits.md, same sample count). This is how the digits
defaults of `configs/digits.py` were chosen (docs/digits.md).

  python benchmarks/digits_sweep.py --steps 400 --variants '{
      "base": {},
      "noise_lo": {"loss.noise.p_mean": -2.0, "loss.noise.p_std": 2.0}}'

Appends one JSON line per variant to `--out`.jsonl (a killed sweep keeps the
finished variants; `--skip_done` skips names already there) and rewrites
`--out`.md from all lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.digits import score_sets  # noqa: E402
from configs.digits import get_config  # noqa: E402
from emd_jax.formats.generator_export import load_sampler  # noqa: E402
from emd_jax.jobs import distill as train_lib  # noqa: E402


def apply_overrides(config, overrides: dict) -> None:
  """Sets dotted `key: value` pairs; an unknown key raises, naming it."""
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise KeyError(f"unknown config key {key!r}")
      node = node[p]
    if parts[-1] not in node:
      raise KeyError(f"unknown config key {key!r}")
    node[parts[-1]] = value


def markdown(rows: list[dict], teacher_fd: float) -> str:
  lines = [
    "# Digits sweep: one-step students of `configs/digits.py` with overrides",
    "",
    f"FD: mean over two latent sets of the students' one-step samples; ratio = FD / teacher FD ({teacher_fd}).",
    "Train seconds are wall-clock on a 2-core machine shared with other jobs (compare within a row only).",
    "",
    "| variant | overrides | base config | steps | train s | FD (seed 0 / 1) | FD / teacher | coverage |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['name']} | `{json.dumps(r['overrides'])}` | {r.get('base', 'configs/digits.py')} | {r['steps']} | "
      f"{r['seconds']:.0f} | "
      f"{r['fd_mean']:.2f} ({r['fd0']:.2f} / {r['fd1']:.2f}) | {r['ratio']:.2f} | {min(r['cov0'], r['cov1']):.2f} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variants", required=True, help="JSON object: name -> {dotted config key: value}")
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--num_samples", type=int, default=2000)
  ap.add_argument("--teacher_fd", type=float, default=10.64, help="the teacher's FD at --num_samples")
  ap.add_argument("--workdir", default="runs/digits_sweep")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_sweep"))
  ap.add_argument("--skip_done", action="store_true")
  args = ap.parse_args()
  variants = json.loads(args.variants)
  done = []
  if os.path.exists(args.out + ".jsonl"):
    with open(args.out + ".jsonl") as f:
      done = [json.loads(line) for line in f if line.strip()]
  for name, overrides in variants.items():
    if args.skip_done and any(r["name"] == name for r in done):
      continue
    config = get_config()
    apply_overrides(config, overrides)
    config.total_steps = args.steps
    config.eval_every = args.steps  # once, at the end
    config.eval_num_samples = 500
    config.checkpoint_every = args.steps
    workdir = os.path.join(args.workdir, name)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    train_lib.train_and_evaluate(config, workdir)
    row = {"name": name, "overrides": overrides, "steps": args.steps, "seconds": time.perf_counter() - t0}
    sampler = load_sampler(os.path.join(workdir, "export"))
    for seed in (0, 1):  # one set per seed, scored as the benchmark scores it
      s, _ = score_sets(lambda k, sa=sampler: sa.sample(k, args.num_samples, batch_size=500), [jax.random.key(seed)])
      row[f"fd{seed}"], row[f"cov{seed}"] = s["fd"], s["coverage"]
    row["fd_mean"] = (row["fd0"] + row["fd1"]) / 2
    row["ratio"] = row["fd_mean"] / args.teacher_fd
    print(json.dumps(row), flush=True)
    done.append(row)
    with open(args.out + ".jsonl", "a") as f:
      f.write(json.dumps(row) + "\n")
    with open(args.out + ".md", "w") as f:
      f.write(markdown(done, args.teacher_fd))


if __name__ == "__main__":
  main()

"""Post-hoc parameter averages of one digits distillation run: which EMA to ship.

Distils `configs/digits.py` (with optional `--overrides`) for `--steps`, keeping a
checkpoint every `--every` steps, then scores averages of the raw generator
iterates found in those checkpoints, on two latent sets of 2,000 one-step samples
(seeds 0 and 1, as `benchmarks/digits_sweep.py` scores):

- `ema{d}@{T}`: weights d^(T - s) over the kept iterates s <= T, normalised (the
  bias-corrected EMA of `generator.ema_debias`, sampled every `--every` steps);
- `uniform_last{W}@{T}`: the plain mean of the kept iterates in (T - W, T];
- `ema_final@{steps}`: the run's own EMA (the config's `generator.ema_decay`).

The raw trajectory does not depend on the EMA settings, so one run answers for every
decay and end step. This is how `configs/digits.py` chose 800 steps and a debiased
EMA 0.998 (docs/digits.md, "Tuning"):

  python benchmarks/digits_posthoc.py --steps 1000 --ends 300,400,500,600,800,1000 \\
      --decays 0.98,0.99,0.995,0.998 --windows 100,200,300,500

Writes `--out`.md and `--out`.jsonl (one line per average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.digits import score_sets  # noqa: E402
from benchmarks.digits_sweep import apply_overrides  # noqa: E402
from configs.digits import get_config  # noqa: E402
from emd_jax.formats.generator_export import load_sampler  # noqa: E402
from emd_jax.jobs import distill as train_lib  # noqa: E402
from emd_jax.runtime import checkpoint as ckpt_lib  # noqa: E402


def weighted_mean(trees: dict, weights: dict):
  """sum_s w_s tree_s / sum_s w_s over the steps in `weights`."""
  total = sum(weights.values())
  steps = list(weights)
  return jax.tree.map(
    lambda *xs: sum(weights[s] * x for s, x in zip(steps, xs, strict=True)) / total, *[trees[s] for s in steps]
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--every", type=int, default=10, help="checkpoint (iterate) spacing")
  ap.add_argument("--overrides", default="{}", help="JSON object: dotted config key -> value")
  ap.add_argument("--ends", default="400,600,800,1000")
  ap.add_argument("--decays", default="0.99,0.995,0.998")
  ap.add_argument("--windows", default="200,500")
  ap.add_argument("--num_samples", type=int, default=2000)
  ap.add_argument("--workdir", default="runs/digits_posthoc")
  ap.add_argument("--reuse", action="store_true", help="score an existing --workdir without training")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_posthoc"))
  args = ap.parse_args()

  config = get_config()
  apply_overrides(config, json.loads(args.overrides))
  config.total_steps = args.steps
  config.eval_every = args.steps
  config.eval_num_samples = 500
  config.checkpoint_every = args.every
  config.max_checkpoints = args.steps // args.every + 1
  if not args.reuse:
    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.perf_counter()
    train_lib.train_and_evaluate(config, args.workdir)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)

  train_lib.validate_distill(config)  # resolves the method preset's placeholders
  setup = train_lib.build_setup(config)
  abstract = ckpt_lib.abstract_like(train_lib.abstract_state(setup, jax.random.PRNGKey(config.seed)))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(args.workdir, "checkpoints"))
  steps = sorted(checkpointer.all_steps())
  raw, final_ema = {}, None
  for s in steps:
    state, _ = checkpointer.restore(s, abstract)
    raw[s] = jax.device_get(state.gen_params)
    if s == steps[-1]:
      final_ema = jax.device_get(state.gen_ema)

  sampler = load_sampler(os.path.join(args.workdir, "export"))
  rows = []

  def report(name, params):
    sampler.params = jax.tree.map(jnp.asarray, params)
    keys = [jax.random.key(0), jax.random.key(1)]
    r, _ = score_sets(lambda k: sampler.sample(k, args.num_samples, batch_size=500), keys)
    row = {
      "average": name,
      "fd": r["fd"],
      "fd_sets": r["fd_sets"],
      "precision": r["precision"],
      "recall": r["recall"],
      "coverage": r["coverage"],
    }
    print(json.dumps(row), flush=True)
    rows.append(row)

  run_gen = sampler.meta["config"]["generator"]  # the run's own settings (with --reuse, not this config's)
  debias = "debiased " if run_gen.get("ema_debias") else ""
  report(f"ema_final@{steps[-1]} (the run's {debias}EMA {run_gen['ema_decay']})", final_ema)
  for end in [int(e) for e in args.ends.split(",") if int(e) in raw]:
    report(f"raw@{end}", raw[end])
    for d in [float(x) for x in args.decays.split(",")]:
      report(f"ema{d}@{end}", weighted_mean(raw, {s: d ** (end - s) for s in steps if s <= end}))
    for w in [int(x) for x in args.windows.split(",")]:
      report(f"uniform_last{w}@{end}", weighted_mean(raw, {s: 1.0 for s in steps if end - w < s <= end}))

  with open(args.out + ".jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  lines = [
    "# Digits: post-hoc averages of one run's generator iterates",
    "",
    f"Run: `configs/digits.py` + `{args.overrides}`, {args.steps} steps, iterates every {args.every} steps.",
    f"FD: mean of two latent sets of {args.num_samples} one-step samples (seeds 0 / 1).",
    "",
    "| average | FD (seed 0 / 1) | precision | recall | coverage |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    sets = " / ".join(f"{v:.2f}" for v in r["fd_sets"])
    lines.append(
      f"| {r['average']} | {r['fd']:.2f} ({sets}) | {r['precision']:.3f} | {r['recall']:.3f} | {r['coverage']:.2f} |"
    )
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

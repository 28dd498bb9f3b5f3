"""Fidelity of one-step GMM students: off-mode mass and basin-wide spread, over training.

Each variant is `configs/gmm.py` with dotted config overrides. During training
the loop's evaluations (every `--eval_every` steps) are recorded; at the end the
EMA, the raw generator and each `generator.ema_tracks` track are scored on `--sample_sets` sets of
`--num_samples` samples with the exact mixture figures
(`emd_jax.evaluators.gmm.gmm_metrics`), next to two reference rows on as many
sets: the teacher's 18-step Heun samples (35 NFE) and exact mixture samples.

  python benchmarks/gmm_fidelity.py --variants '{"emd_sim": {}, "di": {"method": "di"}}'

Appends one JSON line per variant to `--out`.jsonl and rewrites `--out`.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.digits_sweep import apply_overrides  # noqa: E402
from benchmarks.fidelity_common import train_recording  # noqa: E402
from benchmarks.gmm_methods import score_sets  # noqa: E402
from configs.gmm import get_config  # noqa: E402
from emd_jax.jobs import distill as train_lib  # noqa: E402
from emd_jax.sample import sample_teacher  # noqa: E402
from emd_jax.teachers import gmm  # noqa: E402

FIGURES = (
  ("off-mode", "off_mode_fraction", "{:.4f}"),
  ("basin spread", "basin_spread_ratio", "{:.3f}"),
  ("core spread", "spread_ratio", "{:.3f}"),
  ("mode-mass TV", "mode_mass_tv", "{:.4f}"),
  ("SW-1", "sliced_wasserstein", "{:.4f}"),
)


def cell(row: dict, key: str, fmt: str) -> str:
  return f"{fmt.format(row[key])} +- {fmt.format(row[key + '_std'])}"


def markdown(refs: list[dict], rows: list[dict], settings: dict) -> str:
  lines = [
    "# GMM fidelity: one-step students of `configs/gmm.py` with overrides",
    "",
    f"Settings: {json.dumps(settings)}. Mean +- std over the sample sets. Off-mode: samples farther than",
    "3.7 stds from every mode; basin spread: RMS distance to the nearest mean over its whole basin (half the",
    "distance to the next mode) / true std; core spread: the same within 4 stds. Train seconds: wall clock on",
    "the 2-core machine, sometimes shared with other jobs.",
    "",
    "| row | overrides | steps | train s | params | " + " | ".join(f[0] for f in FIGURES) + " |",
    "|" + "---|" * (5 + len(FIGURES)),
  ]
  for r in refs:
    lines.append(f"| {r['name']} | | | | | " + " | ".join(cell(r, k, f) for _, k, f in FIGURES) + " |")
  for r in rows:
    for which in r.get("scored", ("ema", "raw")):
      if which in r:
        lines.append(
          f"| {r['name']} | `{json.dumps(r['overrides'])}` | {r['steps']} | {r['seconds']:.0f} | {which} | "
          + " | ".join(cell(r[which], k, f) for _, k, f in FIGURES)
          + " |"
        )
  lines += ["", "Trajectories (EMA generator, the loop's evaluations: step: off-mode / basin spread / core spread):"]
  for r in rows:
    traj = "; ".join(
      f"{t['step']}: {t['off_mode_fraction']:.3f} / {t['basin_spread_ratio']:.2f} / {t['spread_ratio']:.2f}"
      for t in r.get("trajectory", [])
    )
    lines.append(f"- {r['name']}: {traj}")
  return "\n".join(lines) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variants", required=True, help="JSON object: name -> {dotted config key: value}")
  ap.add_argument("--steps", type=int, default=0, help="0: the config's total_steps")
  ap.add_argument("--eval_every", type=int, default=500)
  ap.add_argument("--num_samples", type=int, default=20000)
  ap.add_argument("--sample_sets", type=int, default=5)
  ap.add_argument("--workdir", default="runs/gmm_fidelity")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gmm_fidelity"))
  ap.add_argument("--skip_done", action="store_true")
  args = ap.parse_args()
  variants = json.loads(args.variants)
  base = get_config()
  teacher = train_lib.teachers.from_config(base.teacher)
  params = jax.device_get(teacher.params)
  n, sets = args.num_samples, args.sample_sets
  refs = [
    {
      "name": "teacher Heun-18 (35 NFE)",
      **score_sets(lambda k: sample_teacher(teacher, k, n, num_steps=18)[0], sets, params),
    },
    {"name": "exact samples (floor)", **score_sets(lambda k: gmm.sample(teacher.params, k, n)[0], sets, params)},
  ]
  done = []
  if os.path.exists(args.out + ".jsonl"):
    with open(args.out + ".jsonl") as f:
      done = [json.loads(line) for line in f if line.strip()]
  settings = {"num_samples": n, "sample_sets": sets, "cpu_count": os.cpu_count()}
  for name, overrides in variants.items():
    if args.skip_done and any(r["name"] == name for r in done):
      continue
    config = get_config()
    apply_overrides(config, overrides)
    config.total_steps = args.steps or config.total_steps
    config.eval_every = args.eval_every
    config.checkpoint_every = config.total_steps
    result, seconds, trajectory = train_recording(
      config,
      os.path.join(args.workdir, name),
      lambda scalars: {k.split("/", 1)[1]: float(v) for k, v in scalars.items() if k.startswith("gmm/")},
    )
    state = result["state"]
    setup = train_lib.build_setup(config)
    row = {
      "name": name,
      "overrides": overrides,
      "steps": config.total_steps,
      "seconds": seconds,
      "trajectory": trajectory,
    }
    # The EMA, the raw generator and every `generator.ema_tracks` track, each on the same sample sets.
    scored = [("ema", state.gen_ema), ("raw", state.gen_params), *sorted(state.gen_ema_tracks.items())]
    row["scored"] = [which for which, _ in scored]
    for which, p in scored:

      def fn(k, p=p, su=setup):
        z = su.step_cfg.sigma_init * jax.random.normal(k, (n, *su.teacher.data_shape))
        return train_lib._generate(su, p, z, rng=jax.random.fold_in(k, 1))  # a few-step student's noise

      row[which] = score_sets(fn, sets, params)
    print(json.dumps({k: v for k, v in row.items() if k != "trajectory"}), flush=True)
    done.append(row)
    with open(args.out + ".jsonl", "a") as f:
      f.write(json.dumps(row) + "\n")
    with open(args.out + ".md", "w") as f:
      f.write(markdown(refs, done, settings))


if __name__ == "__main__":
  main()

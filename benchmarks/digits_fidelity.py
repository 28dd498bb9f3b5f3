"""Fidelity of one-step digits students: every diversity figure, next to the teacher's, over training.

Each variant is `configs/digits.py` with dotted config overrides, distilled for
`--steps` from the shipped teacher. During training the loop's own evaluations
(every `--eval_every` steps, one set of `--eval_samples`) are recorded, so one
row shows *when* diversity goes. At the end the EMA generator and the raw
generator are each scored on `--latent_sets` sets of `--num_samples` samples (the
same latents as `benchmarks/digits.py`) with every figure of the digits evaluator:
FD and KID in the shipped classifier's features and in a pixel-space PCA,
precision/recall, class TV, per-pixel std; each is given as a ratio (or
difference) to the teacher's 35-NFE samples on the same sets.

  python benchmarks/digits_fidelity.py --steps 400 --variants '{
      "emd_sim": {},
      "sim": {"method": "sim"}}'

The teacher's figures are computed once and cached in `--teacher_cache`.
Appends one JSON line per variant to `--out`.jsonl (`--skip_done` skips names
already there) and rewrites `--out`.md from all lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.digits import compare, score_sets, with_display  # noqa: E402
from benchmarks.digits_sweep import apply_overrides  # noqa: E402
from benchmarks.fidelity_common import train_recording  # noqa: E402
from configs.digits import get_config  # noqa: E402
from emd_jax import teachers  # noqa: E402
from emd_jax.distill import methods  # noqa: E402
from emd_jax.jobs import distill as train_lib  # noqa: E402
from emd_jax.sample import sample_teacher  # noqa: E402

TRAJECTORY = ("fd", "fd_pixel", "recall", "pixel_std_ratio_real", "class_tv")
TABLE = (
  ("FD / T", "fd_ratio", "{:.2f}"),
  ("pixel FD / T", "fd_pixel_ratio", "{:.2f}"),
  ("KID / T", "kid_ratio", "{:.2f}"),
  ("pixel KID / T", "kid_pixel_ratio", "{:.2f}"),
  ("recall - T", "recall_diff", "{:+.3f}"),
  ("class TV - T", "class_tv_diff", "{:+.3f}"),
  ("pixel std / T", "pixel_std_ratio", "{:.3f}"),
)


def passes_per_step(config) -> int:
  """Network passes of one train step, a backward pass counted as two forwards (machine-independent cost).

  Generator forward + VJP: 3; each fake-denoiser update: 3 (plus a generator forward for the extra
  ones); each E-step Langevin step: 2 (teacher + fake forward; + 3 if the latent moves); the M-step:
  di/dmd 2 (teacher + fake forward), sim/sid 6 (both forwards and their input VJPs), emd 0.
  """
  c = get_config()
  apply_overrides(c, dict(config))
  methods.resolve(c)
  k, name, fake_s = c.estep.num_steps, c.loss.name, c.fake.steps_per_gen_step
  m_step = {"di": 2, "dmd": 2, "sim": 6, "sid": 6, "emd": 0}[name]
  e_step = k * (2 + (3 if c.estep.gamma_z else 0))
  return 3 + 3 * fake_s + (fake_s - 1) + e_step + m_step


def set_keys(n: int, seed: int = 0):
  """The benchmark's latent sets (as `benchmarks/digits.py`)."""
  rng = jax.random.key(seed)
  return [jax.random.fold_in(rng, i) for i in range(n)]


def teacher_row(path: str, num_samples: int, latent_sets: int, teacher_name: str) -> dict:
  tag = {"num_samples": num_samples, "latent_sets": latent_sets, "teacher": teacher_name}
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("tag") == tag:
      return cached["row"]
  teacher = teachers.load(teacher_name)
  fn = lambda r: sample_teacher(teacher, r, num_samples, num_steps=18, batch_size=500)[0]  # noqa: E731
  scores, _ = score_sets(fn, set_keys(latent_sets))
  row = with_display({"model": "teacher (Heun 18 steps)", "nfe": 35, **scores})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"tag": tag, "row": row}, f, indent=2)
  return row


def markdown(rows: list[dict], teacher: dict) -> str:
  lines = [
    "# Digits fidelity: one-step students of `configs/digits.py` with overrides, every figure against the teacher",
    "",
    "Ratios (/ T) and differences (- T) to the teacher's 35-NFE samples, mean over the latent sets (min-max of",
    "the per-set ratio in brackets for the FDs). `ema` rows score the EMA generator, `raw` rows the last",
    "iterate. Train seconds: wall clock on the 2-core machine, often shared with other jobs (compare within a",
    "row only). Teacher: FD {:.2f}, pixel FD {:.4f}, KID {:.2e}, pixel KID {:.2e}, recall {:.3f}, class TV {:.3f},"
    " pixel std {:.4f}.".format(
      teacher["fd"],
      teacher["fd_pixel"],
      teacher["kid"],
      teacher["kid_pixel"],
      teacher["recall"],
      teacher["class_tv"],
      teacher["pixel_std"],
    ),
    "",
    "| variant | overrides | steps | train s | params | " + " | ".join(c[0] for c in TABLE) + " |",
    "|" + "---|" * (5 + len(TABLE)),
  ]
  for r in rows:
    for which in ("ema", "raw"):
      s = r.get(which)
      if not s:
        continue
      cells = []
      for _, key, fmt in TABLE:
        cell = fmt.format(s[key])
        base = key.removesuffix("_ratio")
        if key in ("fd_ratio", "fd_pixel_ratio"):
          per = [a / b for a, b in zip(s[f"{base}_sets"], teacher[f"{base}_sets"], strict=True)]
          cell += f" ({min(per):.2f}-{max(per):.2f})"
        cells.append(cell)
      lines.append(
        f"| {r['name']} | `{json.dumps(r['overrides'])}` | {r['steps']} | {r['seconds']:.0f} | {which} | "
        + " | ".join(cells)
        + " |"
      )
  lines += ["", "Trajectories (the loop's evaluations, one set of `eval_samples`; pixel std is over the real digits'):"]
  for r in rows:
    traj = "; ".join(
      f"{t['step']}: FD {t['fd']:.1f}, pixel FD {t['fd_pixel']:.3f}, recall {t['recall']:.3f}, "
      f"std/real {t['pixel_std_ratio_real']:.3f}"
      for t in r.get("trajectory", [])
    )
    lines.append(f"- {r['name']}: {traj}")
  return "\n".join(lines) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variants", required=True, help="JSON object: name -> {dotted config key: value}")
  ap.add_argument("--steps", type=int, default=0, help="0: the config's total_steps")
  ap.add_argument(
    "--budget_passes", type=int, default=0, help="equal compute: steps = budget / passes_per_step (overrides --steps)"
  )
  ap.add_argument("--eval_every", type=int, default=100)
  ap.add_argument("--eval_samples", type=int, default=1000)
  ap.add_argument("--num_samples", type=int, default=2000)
  ap.add_argument("--latent_sets", type=int, default=3)
  ap.add_argument("--no_raw", action="store_true", help="score only the EMA generator at the end")
  ap.add_argument("--teacher", default="builtin:digits_uncond")
  ap.add_argument("--teacher_cache", default=os.path.join(ROOT, "benchmarks", "results", "digits_teacher_ref.json"))
  ap.add_argument("--workdir", default="runs/digits_fidelity")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_fidelity"))
  ap.add_argument("--skip_done", action="store_true")
  args = ap.parse_args()
  variants = json.loads(args.variants)
  teacher = teacher_row(args.teacher_cache, args.num_samples, args.latent_sets, args.teacher)
  done = []
  if os.path.exists(args.out + ".jsonl"):
    with open(args.out + ".jsonl") as f:
      done = [json.loads(line) for line in f if line.strip()]
  keys = set_keys(args.latent_sets)
  for name, overrides in variants.items():
    if args.skip_done and any(r["name"] == name for r in done):
      continue
    config = get_config()
    config.teacher.checkpoint = args.teacher
    apply_overrides(config, overrides)
    config.total_steps = args.steps or config.total_steps
    passes = passes_per_step(overrides)
    if args.budget_passes:
      config.total_steps = max(round(args.budget_passes / passes), 1)
    config.eval_every = args.eval_every
    config.eval_num_samples = args.eval_samples
    config.checkpoint_every = config.total_steps
    result, seconds, trajectory = train_recording(
      config,
      os.path.join(args.workdir, name),
      lambda scalars: {k: float(scalars[k]) for k in TRAJECTORY if k in scalars},
    )
    state = result["state"]
    setup = train_lib.build_setup(config)
    row = {"name": name, "overrides": overrides, "steps": config.total_steps, "seconds": seconds}
    row["passes_per_step"] = passes
    resolved = get_config()
    apply_overrides(resolved, overrides)
    methods.resolve(resolved)  # the run's own method and chain length (the config file may change later)
    row["method"], row["estep_k"] = resolved.method, int(resolved.estep.num_steps)
    row["trajectory"] = trajectory
    for which, params in (("ema", state.gen_ema), ("raw", None if args.no_raw else state.gen_params)):
      if params is None:
        continue
      fn = lambda k, p=params, c=config, su=setup: train_lib._image_samples(c, su, p, k, args.num_samples)[0]  # noqa: E731
      scores, _ = score_sets(fn, keys)
      row[which] = compare(scores, teacher)
    print(json.dumps({k: v for k, v in row.items() if k != "trajectory"}), flush=True)
    done.append(row)
    with open(args.out + ".jsonl", "a") as f:
      f.write(json.dumps(row) + "\n")
    with open(args.out + ".md", "w") as f:
      f.write(markdown(done, teacher))


if __name__ == "__main__":
  main()

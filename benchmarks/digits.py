"""The shipped digits teacher at 35 NFE vs one-step students of every method preset.

In one run:
  1. the teacher's 18-step EDM Heun samples (35 NFE), `--num_samples` of them;
  2. for each method of `--methods`, `configs/digits.py` distilled for the same
     `--steps` (default: the config's `total_steps`, the README main job's budget)
     from the teacher's weights, then `--num_samples` one-step samples of its EMA
     generator (same latents for every method);
  3. everything scored by the digits evaluator: Frechet distance to the real
     train digits in the shipped classifier's features, class coverage,
     precision/recall; `fd_ratio` = student FD / teacher FD.

FD at 2,000 samples moves by about +-1 between latent sets of the same model
(std 1.0 over six sets for one student), so every model is scored on
`--latent_sets` independent sets (the same sets for every row) and the table
gives the mean and standard deviation; the ratio is of the means.

  python benchmarks/digits.py                # every preset at the main job's budget (the config's total_steps)
  python benchmarks/digits.py --methods emd_sim,sid --steps 100 --batch_size 16
  python benchmarks/digits.py --methods emd_simloss_k1 --student_steps 1,2,4 --out benchmarks/results/digits_fewstep
  python benchmarks/digits.py --methods emd_simloss_k1,sida,emd_simloss_k1:4,emd_sim_adv,emd_simloss_k1:2,dmd2 \
      --out benchmarks/results/digits_adv_fewstep   # issues 16 and 17 in one run (one teacher row)

`method:N` gives one row its own number of student steps. The adversarial rows (`sida`, `dmd2`,
`emd_sim_adv`) read the real digits (`data.name = "digits"` in configs/digits.py).

`--student_steps` trains each method as an N-step student for each N (`generator.num_steps`,
its default grid) at the same number of generator steps; NFE = N. `ms / sample` is the wall time
of sampling once compiled (batches of 500, 2-core CPU), next to the teacher's.

Writes `--out`.md, `--out`.json and one grid PNG per row (`--out`_<row>.png).
Targets (issue 4): the default method within 1.2x of the teacher's FD, every
class present (coverage 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.digits import get_config  # noqa: E402
from emd_jax import teachers  # noqa: E402
from emd_jax.evaluators import grids  # noqa: E402
from emd_jax.evaluators import images as image_eval  # noqa: E402
from emd_jax.formats.generator_export import load_sampler  # noqa: E402
from emd_jax.jobs import distill as train_lib  # noqa: E402
from emd_jax.sample import sample_teacher  # noqa: E402

DEFAULT_METHODS = "emd_simloss_k1,emd_sim,emd,sim,sid,di,dmd"
# Every figure of the digits evaluator that the tables report (ALGORITHMS.md section 8): two feature
# spaces (the shipped classifier; a pixel-space PCA of the real digits, independent of it).
METRICS = (
  "fd",
  "fd_pixel",
  "kid",
  "kid_pixel",
  "precision",
  "recall",
  "class_tv",
  "coverage",
  "pixel_std",
  "mean_image_dist",
)
COLUMNS = (
  ("model", "model", "{}"),
  ("NFE", "nfe", "{}"),
  ("steps", "steps", "{}"),
  ("train s", "train_seconds", "{:.0f}"),
  ("ms / sample", "sample_ms", "{:.3f}"),
  ("FD", "fd", "{:.2f}"),
  ("FD / T", "fd_ratio", "{:.2f}"),
  ("pixel FD", "fd_pixel", "{:.3f}"),
  ("pixel FD / T", "fd_pixel_ratio", "{:.2f}"),
  ("KID", "kid", "{:.1f}"),
  ("KID / T", "kid_ratio", "{:.2f}"),
  ("pixel KID x1e3", "kid_pixel_1e3", "{:.2f}"),
  ("pixel KID / T", "kid_pixel_ratio", "{:.2f}"),
  ("recall", "recall", "{:.3f}"),
  ("precision", "precision", "{:.3f}"),
  ("class TV", "class_tv", "{:.3f}"),
  ("pixel std / T", "pixel_std_ratio", "{:.3f}"),
  ("coverage", "coverage", "{:.2f}"),
)


def score(images: np.ndarray) -> dict:
  raw = image_eval.score_images(images)
  return {k: raw[k] for k in (*METRICS, "fd_real_split")}


def score_sets(sample_fn, keys) -> tuple[dict, np.ndarray]:
  """Mean (`k`), spread (`k_std`) and per-set values (`k_sets`) of every metric over one latent set
  per key, and the first set's images."""
  sets, first = [], None
  for key in keys:
    x = np.asarray(sample_fn(key))
    first = x if first is None else first
    sets.append(score(x))
  out = {}
  for k in sets[0]:
    vals = [float(r[k]) for r in sets]
    out[k], out[f"{k}_std"], out[f"{k}_sets"] = float(np.mean(vals)), float(np.std(vals)), vals
  return out, first


def sample_ms(sample_fn, rng, num: int) -> float:
  """Milliseconds per sample of `sample_fn(key)` (`num` samples), timed on a second call (compiled)."""
  np.asarray(sample_fn(jax.random.fold_in(rng, 10_000)))
  t0 = time.perf_counter()
  np.asarray(sample_fn(jax.random.fold_in(rng, 10_001)))
  return 1e3 * (time.perf_counter() - t0) / num


def compare(row: dict, teacher: dict) -> dict:
  """Adds the student/teacher ratios (of means) and the per-set ranges of the ratios."""
  out = dict(row)
  for k in ("fd", "fd_pixel", "kid", "kid_pixel", "pixel_std"):
    out[f"{k}_ratio"] = row[k] / teacher[k]
  out["pixel_std_ratio"] = row["pixel_std"] / teacher["pixel_std"]
  out["recall_diff"] = row["recall"] - teacher["recall"]
  out["class_tv_diff"] = row["class_tv"] - teacher["class_tv"]
  return with_display(out)


def with_display(row: dict) -> dict:
  row = dict(row)
  row["kid_pixel_1e3"] = 1e3 * row["kid_pixel"]
  return row


def markdown(rows: list[dict], settings: dict) -> str:
  lines = [
    "# Digits: teacher (35 NFE) vs one- and few-step students",
    "",
    f"Settings: {json.dumps(settings)}",
    "",
    "Every figure is the mean over the latent sets; `/ T` is the ratio of the means to the teacher's. Spreads",
    "(std over the sets) are in the .json file. Pixel FD and KID use a 32-component PCA of the real 8x8 digits",
    "(`emd_jax.evaluators.diversity`), independent of the classifier; pixel std / T is the per-pixel standard",
    "deviation (mean over pixels) over the teacher's.",
    "",
    "| " + " | ".join(c[0] for c in COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  for r in rows:
    cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  floor = rows[0].get("fd_real_split")
  lines += ["", f"FD floor (real test vs train digits): {floor:.2f}." if floor is not None else ""]
  return "\n".join(lines) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--methods", default=DEFAULT_METHODS)
  ap.add_argument("--steps", type=int, default=0, help="distillation steps per method; 0: the config's total_steps")
  ap.add_argument("--batch_size", type=int, default=0, help="0: the config's")
  ap.add_argument("--num_samples", type=int, default=2000)
  ap.add_argument("--teacher", default="builtin:digits_uncond")
  ap.add_argument("--workdir", default="runs/bench_digits")
  ap.add_argument("--out", default="benchmarks/results/digits")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--latent_sets", type=int, default=3, help="independent sample sets per model (FD mean/std)")
  ap.add_argument("--student_steps", default="1", help="comma-separated N: each method as an N-step student")
  ap.add_argument("--overrides", default="{}", help="JSON {dotted config key: value} for every student row")
  ap.add_argument(
    "--resume", action="store_true", help="keep the rows of an existing --out.json (same settings); run the rest"
  )
  args = ap.parse_args()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  rng = jax.random.key(args.seed)

  args.steps = args.steps or get_config().total_steps  # the main job's budget by default
  done = previous_rows(args) if args.resume else {}
  teacher = teachers.load(args.teacher)
  t0 = time.perf_counter()
  teacher_fn = lambda r: sample_teacher(teacher, r, args.num_samples, num_steps=18, batch_size=500)[0]
  set_keys = [jax.random.fold_in(rng, i) for i in range(args.latent_sets)]
  row = done.get(TEACHER_LABEL)
  if row is None:
    scores, x_t = score_sets(teacher_fn, set_keys)
    row = with_display(
      {
        "model": TEACHER_LABEL,
        "nfe": 35,
        **scores,
        "sample_seconds": time.perf_counter() - t0,
        "sample_ms": sample_ms(teacher_fn, rng, args.num_samples),
      }
    )
    grids.save_png(f"{args.out}_teacher.png", grids.image_grid(x_t[:100]), scale=3)
  rows = [row]
  print(json.dumps(row), flush=True)

  runs = parse_runs(args.methods, args.student_steps)
  for method, num_steps in runs:
    name = method if num_steps == 1 else f"{method}_{num_steps}step"
    label = "one step" if num_steps == 1 else f"{num_steps} steps"
    if f"{method} ({label})" in done:  # --resume: scored by the earlier run
      rows.append(done[f"{method} ({label})"])
      continue
    config = get_config()
    config.method = method
    from benchmarks.digits_sweep import apply_overrides  # here: digits_sweep imports this module

    apply_overrides(config, json.loads(args.overrides))
    config.generator.num_steps = num_steps
    config.teacher.checkpoint = args.teacher
    config.total_steps = args.steps
    config.eval_every = max(args.steps, 1)  # evaluate once, at the end
    config.checkpoint_every = max(args.steps, 1)
    if args.batch_size:
      config.batch_size = args.batch_size
    workdir = os.path.join(args.workdir, name)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    train_lib.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - t0
    sampler = load_sampler(os.path.join(workdir, "export"))
    sample_fn = lambda r, s=sampler: s.sample(r, args.num_samples, batch_size=500)  # noqa: E731
    scores, x = score_sets(sample_fn, set_keys)
    r = {"model": f"{method} ({label})", "nfe": sampler.nfe(), "steps": args.steps, "train_seconds": seconds}
    r = compare({**r, **scores, "sample_ms": sample_ms(sample_fn, rng, args.num_samples)}, row)
    grids.save_png(f"{args.out}_{name}.png", grids.image_grid(x[:100]), scale=3)
    rows.append(r)
    print(json.dumps(r), flush=True)
    write(args, rows)  # after every row: a long run killed part-way keeps its rows
  print(write(args, rows))


def parse_runs(methods: str, student_steps: str) -> list[tuple[str, int]]:
  """`(method, N)` rows: each of `methods` at each N of `student_steps`, or at its own N when written `method:N`."""
  runs = []
  for m in filter(None, methods.split(",")):
    name, _, n = m.partition(":")
    runs += [(name, int(n))] if n else [(name, int(k)) for k in student_steps.split(",")]
  return runs


TEACHER_LABEL = "teacher (Heun 18 steps)"


def previous_rows(args) -> dict[str, dict]:
  """The rows of an earlier `--out`.json by model label, when its settings (other than the rows asked
  for) are this run's; {} when there is no such file. Settings that differ are an error, not a silent
  mix of two protocols in one table."""
  if not os.path.exists(f"{args.out}.json"):
    return {}
  with open(f"{args.out}.json") as f:
    old = json.load(f)
  ignore = ("student_steps",)
  mine = {k: v for k, v in settings_of(args).items() if k not in ignore}
  theirs = {k: v for k, v in old["settings"].items() if k not in ignore}
  if mine != theirs:
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    raise SystemExit(f"--resume: {args.out}.json has other settings ({', '.join(diff)}); use another --out")
  return {r["model"]: with_display(r) for r in old["rows"]}


def settings_of(args) -> dict:
  return {
    "steps": args.steps,
    "batch_size": args.batch_size or get_config().batch_size,
    "num_samples": args.num_samples,
    "latent_sets": args.latent_sets,
    "student_steps": args.student_steps,
    "overrides": json.loads(args.overrides),
    "teacher": args.teacher,
    "cpu_count": os.cpu_count(),
  }


def write(args, rows: list[dict]) -> str:
  """Writes `--out`.json and `--out`.md; returns the markdown."""
  settings = settings_of(args)
  with open(f"{args.out}.json", "w") as f:
    json.dump({"settings": settings, "rows": rows}, f, indent=2)
  with open(f"{args.out}.md", "w") as f:
    f.write(markdown(rows, settings))
  return markdown(rows, settings)


if __name__ == "__main__":
  main()

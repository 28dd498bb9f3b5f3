"""How much of a digits student's pixel-space KID is its mean image's offset (issue 14).

For a trained run's checkpoint (raw generator and EMA) and the teacher, on sample sets of 2,000:
the pixel-space KID (the `digits` evaluator's: cubic kernel on the 32-component PCA of the real
digits), the same KID after moving the set's features by the difference of its mean from the real
digits' mean (the offset removed, nothing else changed), the mean image's distance to the real one
and to the teacher's. If the KID with the offset removed falls to the teacher's, the KID gap is a
first-moment bias, not missing diversity.

  python benchmarks/digits_mean_offset.py --workdir runs/bench_digits_1300/emd_simloss_k1 \
      --out benchmarks/results/digits_mean_offset
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emd_jax import teachers  # noqa: E402
from emd_jax.evaluate import export_track  # noqa: E402
from emd_jax.evaluators import digits_classifier, diversity  # noqa: E402
from emd_jax.formats.generator_export import load_sampler  # noqa: E402
from emd_jax.sample import sample_teacher  # noqa: E402


def figures(images: np.ndarray, pca: diversity.PixelPCA, teacher_mean: np.ndarray | None) -> dict[str, float]:
  px = diversity.digit_pixels(np.asarray(digits_classifier.to_classifier_input(images, "pad")))
  feats = pca.transform(px)
  centred = feats - feats.mean(axis=0) + pca.real_features.mean(axis=0)
  out = {
    "kid_pixel": diversity.kid(feats, pca.real_features),
    "kid_pixel_mean_removed": diversity.kid(centred, pca.real_features),
    "mean_image_dist": float(np.linalg.norm(px.mean(axis=0) - pca.mean)),
    "pixel_std": float(px.std(axis=0, ddof=1).mean()),
  }
  if teacher_mean is not None:
    diff = px.mean(axis=0) - teacher_mean
    out["mean_dist_to_teacher"] = float(np.linalg.norm(diff))
    # The uniform part of that offset (every pixel brighter or darker by the same amount), as a norm.
    out["uniform_part_of_it"] = float(abs(diff.mean()) * np.sqrt(diff.size))
  out["mean_image"] = [float(v) for v in px.mean(axis=0)]
  return out, px.mean(axis=0)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--workdir", required=True, help="distillation runs' directories, comma-separated (newest checkpoints)"
  )
  ap.add_argument("--teacher", default="builtin:digits_uncond")
  ap.add_argument("--num_samples", type=int, default=2000)
  ap.add_argument("--sets", type=int, default=3)
  ap.add_argument("--teacher_sets", type=int, default=1, help="Heun-18 sets (slow on CPU: ~1 min per 2,000)")
  ap.add_argument(
    "--tracks", default="ema,raw", help="the checkpoint's generators: raw, ema, generator.ema_tracks names"
  )
  ap.add_argument(
    "--tracks_from_export", action="store_true", help="score each run's final export (W/export) as its `ema` track"
  )
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_mean_offset"))
  args = ap.parse_args()
  pca = diversity.real_pixel_pca("train", "pad", 16)
  teacher = teachers.load(args.teacher)
  rows, t_means = [], []
  for i in range(args.teacher_sets):
    x = np.asarray(sample_teacher(teacher, jax.random.key(100 + i), args.num_samples, num_steps=18, batch_size=500)[0])
    f, m = figures(x, pca, None)
    t_means.append(m)
    rows.append({"model": "teacher (Heun 18 steps)", "set": i, **f})
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "mean_image"}), flush=True)
  t_mean = np.mean(t_means, axis=0)
  workdirs = args.workdir.split(",")
  for workdir in workdirs:
    run = os.path.basename(os.path.dirname(os.path.normpath(workdir))) if len(workdirs) > 1 else "student"
    for which in args.tracks.split(","):
      if args.tracks_from_export:
        if which != "ema":
          raise SystemExit("--tracks_from_export scores the export only: use --tracks ema")
        sampler = load_sampler(os.path.join(workdir, "export"))
      else:
        sampler = load_sampler(export_track(workdir, which, None))
      for i in range(args.sets):
        x = np.asarray(sampler.sample(jax.random.key(200 + i), args.num_samples, batch_size=500))
        f, _ = figures(x, pca, t_mean)
        rows.append({"model": f"{run} {which}", "set": i, **f})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "mean_image"}), flush=True)
  keys = (
    "kid_pixel",
    "kid_pixel_mean_removed",
    "mean_image_dist",
    "mean_dist_to_teacher",
    "uniform_part_of_it",
    "pixel_std",
  )
  lines = [
    "# Digits: the pixel-space KID and the mean image's offset",
    "",
    f"Sets of {args.num_samples} samples; mean (min-max) over the sets. `python benchmarks/digits_mean_offset.py "
    f"--workdir {args.workdir}`.",
    "",
    "| model | sets | " + " | ".join(keys) + " |",
    "|---|---|" + "---|" * len(keys),
  ]
  for model in dict.fromkeys(r["model"] for r in rows):
    rs = [r for r in rows if r["model"] == model]
    cells = []
    for k in keys:
      v = [r[k] for r in rs if k in r]
      cells.append(f"{np.mean(v):.4f} ({min(v):.4f}-{max(v):.4f})" if v else "")
    lines.append(f"| {model} | {len(rs)} | " + " | ".join(cells) + " |")
  # Is the offset the same across runs and generators (systematic) or different each time (jitter)?
  models = [m for m in dict.fromkeys(r["model"] for r in rows) if not m.startswith("teacher")]
  offsets = {m: np.mean([r["mean_image"] for r in rows if r["model"] == m], axis=0) - t_mean for m in models}
  lines += ["", "Cosine similarity of the offsets from the teacher's mean image (set-averaged mean images):", ""]
  lines += ["| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
  for a in models:
    cos = [offsets[a] @ offsets[b] / (np.linalg.norm(offsets[a]) * np.linalg.norm(offsets[b])) for b in models]
    lines.append(f"| {a} | " + " | ".join(f"{c:.2f}" for c in cos) + " |")
  with open(args.out + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  with open(args.out + ".json", "w") as fh:
    json.dump({"workdir": args.workdir, "rows": rows}, fh, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  main()

"""Where a digits one-step student starts, with and without the centred input (`generator.latent_mean`).

No training: the starting generator is the teacher's denoiser at `sigma_init`, `g(z) = D_T(z, sigma_init)`
("zero") or `D_T(mu + z, sigma_init)` with `mu` the Tweedie fixed point ("tweedie",
emd_jax/distill/latent_mean.py). Each is scored on `--sets` sets of `--num_samples` with the evaluator's
pixel-space figures (mean image's distance to the real digits' and to the teacher's samples', pixel std,
pixel FD and KID), next to the teacher's Heun-18 samples (`--teacher_sets` sets).

  python benchmarks/digits_latent_mean.py --out benchmarks/results/digits_latent_mean
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fidelity_common import write_level_table  # noqa: E402

from emd_jax import teachers  # noqa: E402
from emd_jax.distill import latent_mean  # noqa: E402
from emd_jax.evaluators import digits_classifier, diversity  # noqa: E402
from emd_jax.sample import sample_teacher  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--teacher", default="builtin:digits_uncond")
  ap.add_argument("--sigma_init", type=float, default=2.5)
  ap.add_argument("--num_samples", type=int, default=2000)
  ap.add_argument("--sets", type=int, default=3)
  ap.add_argument("--teacher_sets", type=int, default=2, help="Heun-18 sets (about 1 min per 2,000 on 2 cores)")
  ap.add_argument("--fixed_point_samples", type=int, default=2048, help="generator.latent_mean_samples")
  ap.add_argument("--fixed_point_iters", type=int, default=4, help="generator.latent_mean_iters")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_latent_mean"))
  args = ap.parse_args()
  pca = diversity.real_pixel_pca("train", "pad", 16)
  teacher = teachers.load(args.teacher)
  shape, s = tuple(teacher.data_shape), args.sigma_init

  def figures(x):
    return diversity.pixel_metrics(np.asarray(digits_classifier.to_classifier_input(x, "pad")), pca)

  def mean_px(x):
    return diversity.digit_pixels(np.asarray(digits_classifier.to_classifier_input(x, "pad"))).mean(0)

  t0 = time.perf_counter()
  t_sets = [
    np.asarray(sample_teacher(teacher, jax.random.key(300 + i), args.num_samples, num_steps=18, batch_size=500)[0])
    for i in range(args.teacher_sets)
  ]
  t_mean = np.mean([mean_px(x) for x in t_sets], axis=0)
  print(f"teacher sets: {time.perf_counter() - t0:.0f} s", flush=True)
  t0 = time.perf_counter()
  mu, changes = latent_mean.tweedie_fixed_point(
    teacher.denoise, shape, s, jax.random.key(0), args.fixed_point_samples, args.fixed_point_iters, 500
  )
  fp_seconds = time.perf_counter() - t0
  den = jax.jit(lambda x: teacher.denoise(x, jnp.full((x.shape[0],), s)))

  def start(centre, key):
    z = s * jax.random.normal(key, (args.num_samples, *shape))
    return np.concatenate([np.asarray(den(z[i : i + 500] + centre)) for i in range(0, args.num_samples, 500)])

  rows = []
  for name, sets in (
    ("teacher (Heun 18 steps)", t_sets),
    ("start, zero: D(z, sigma_init)", [start(0.0, jax.random.key(10 + i)) for i in range(args.sets)]),
    ("start, tweedie: D(mu + z, sigma_init)", [start(mu, jax.random.key(10 + i)) for i in range(args.sets)]),
  ):
    per = [{**figures(x), "mean_dist_to_teacher": float(np.linalg.norm(mean_px(x) - t_mean))} for x in sets]
    row = {"model": name, "sets": len(sets)}
    for k in per[0]:
      v = np.array([p[k] for p in per])
      row[k] = float(v.mean())
      row[k + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    rows.append(row)
  header = [
    f"# Where a digits student starts (`{args.teacher}`, sigma_init {s}; no training)",
    "",
    f"`python benchmarks/digits_latent_mean.py` on {os.cpu_count()} CPUs: mean (and `_std`: std) over sets of "
    f"{args.num_samples}; the teacher's mean image is the average over its {args.teacher_sets} sets (its own "
    "`mean_dist_to_teacher` is therefore biased low). Fixed point: "
    f"|mu| = {np.linalg.norm(mu):.3g}, per-pixel mean {mu.mean():.3g}, changes "
    f"{', '.join(f'{c:.3g}' for c in changes)} ({fp_seconds:.1f} s).",
    "",
  ]
  payload = {"settings": vars(args), "fixed_point": {"changes": changes, "seconds": fp_seconds}, "rows": rows}
  write_level_table(args.out, header, [("model", "model"), ("sets", "sets")], rows, ".4g", payload)


if __name__ == "__main__":
  main()

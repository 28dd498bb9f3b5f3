"""Where a one-step GMM student starts, as a function of `generator.sigma_init`.

A one-step generator is `g(z) = D(z, sigma_init)` with `z = sigma_init * N(0, I)`, and the
distillation initialises `D` from the teacher's denoiser (for the analytic mixture, the student
net regressed on the exact one: `teacher.surrogate_steps`). This script scores that starting
point with the exact denoiser, no training and no surrogate error: the exact mixture figures
(`emd_jax.evaluators.gmm.gmm_metrics`) of `D_exact(sigma_init * eps, sigma_init)` for each level,
mean +- std over sample sets. It shows how far the distillation has to move the samples before
the first step: at a high level the posterior mean is a blend of the modes, so every sample lies
between them; at a low level it lies near a mode, with the mass of each mode set by how much of
the Gaussian falls in its basin.

  python benchmarks/gmm_init.py --levels 0.5,0.7,1.0,1.5,2.5 --out benchmarks/results/gmm_init

Writes `--out`.md and `--out`.json. Seconds on 2 CPU cores.
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

from benchmarks.gmm_fidelity import FIGURES as FIDELITY_FIGURES  # noqa: E402
from configs.gmm import get_config  # noqa: E402
from emd_jax.evaluators.gmm import gmm_metrics  # noqa: E402
from emd_jax.teachers import gmm  # noqa: E402

# The figures of gmm_fidelity.py, under the evaluator's own `gmm/` keys.
FIGURES = tuple((label, "gmm/" + key, fmt) for label, key, fmt in FIDELITY_FIGURES)


def score_sets(draw, params: dict, num: int, sets: int) -> dict:
  """The exact figures of `draw(key, num)` over `sets` sample sets (set i: key 100 + i), mean and std."""
  runs = [gmm_metrics(np.asarray(draw(jax.random.PRNGKey(100 + i), num)), params, seed=i) for i in range(sets)]
  out = {}
  for _, key, _ in FIGURES:
    vals = [r[key] for r in runs]
    out[key], out[key + "_std"] = float(np.mean(vals)), float(np.std(vals))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--levels", default="0.5,0.7,1.0,1.5,2.5", help="comma-separated sigma_init values")
  ap.add_argument("--num_samples", type=int, default=20000)
  ap.add_argument("--sample_sets", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gmm_init"))
  args = ap.parse_args()
  t = get_config().teacher
  params = gmm.make_params(t.dim, t.num_modes, t.radius, t.std, t.weights)
  n, sets = args.num_samples, args.sample_sets
  rows = []
  for level in (float(v) for v in args.levels.split(",")):
    denoise = jax.jit(lambda x, s=level: gmm.denoise(params, x, s))
    draw = lambda k, m, s=level, d=denoise: d(s * jax.random.normal(k, (m, t.dim)))  # noqa: E731
    rows.append({"row": f"{level:g}", **score_sets(draw, params, n, sets)})
  floor = score_sets(lambda k, m: gmm.sample(params, k, m)[0], params, n, sets)
  rows.append({"row": "exact samples (floor)", **floor})
  lines = [
    "# Where a one-step GMM student starts: the exact denoiser at sigma_init",
    "",
    f"`D_exact(sigma_init * eps, sigma_init)` for the `configs/gmm.py` mixture; mean +- std over {args.sample_sets}"
    f" sets of {args.num_samples} samples; the last row is exact mixture samples (each figure's floor at this size).",
    "",
    "| sigma_init | " + " | ".join(f[0] for f in FIGURES) + " |",
    "|" + "---|" * (1 + len(FIGURES)),
  ]
  for r in rows:
    cells = [f"{fmt.format(r[k])} +- {fmt.format(r[k + '_std'])}" for _, k, fmt in FIGURES]
    lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
  lines += ["", "A core spread of 0 means no sample lies within 4 stds of any mode (the figure is then undefined)."]
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(args.out + ".json", "w") as f:
    json.dump({"rows": rows, "settings": vars(args)}, f, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  main()

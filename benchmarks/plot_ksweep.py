"""Figure: recall and per-pixel std against the E-step length K, EMD next to DI, SiD and SIM.

Reads the rows that `benchmarks/digits_fidelity.py --budget_passes N` wrote (one
run per variant at equal compute, so a longer chain means fewer steps) and draws
two panels: recall minus the teacher's, and pixel std over the teacher's, each
with the spread over the latent sets as error bars. Variants whose resolved
method has an E-step are drawn as lines against K (one line per M-step loss);
the others (di, sid, sim) as horizontal bands at their mean +- std.

  python benchmarks/plot_ksweep.py --rows benchmarks/results/digits_ksweep.jsonl \
      --out docs/digits_ksweep.png

Needs matplotlib (`pip install -e ".[plots]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.digits_fidelity import TABLE  # noqa: E402
from benchmarks.digits_sweep import apply_overrides  # noqa: E402
from configs.digits import get_config  # noqa: E402
from emd_jax.distill import methods  # noqa: E402

PANELS = (
  ("recall_diff", "recall - teacher's", "recall"),
  ("pixel_std_ratio", "pixel std / teacher's", "pixel_std"),
)


def resolved(overrides: dict) -> tuple[str, int]:
  """(method label, E-step K) of a variant, after the preset fills its placeholders."""
  c = get_config()
  apply_overrides(c, dict(overrides))
  methods.resolve(c)
  return c.method, int(c.estep.num_steps)


def load(path: str, which: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        if which in r:
          # Rows record the method and K they ran with; older rows are resolved against today's config.
          method, k = (r["method"], r["estep_k"]) if "estep_k" in r else resolved(r["overrides"])
          rows.append({"name": r["name"], "method": method, "k": k, "steps": r["steps"], **r[which]})
  return rows


def plot(rows: list[dict], teacher_std: float, out: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  chained = sorted({r["method"] for r in rows if r["k"] > 0})
  flat = sorted({r["method"] for r in rows if r["k"] == 0})
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  ks = sorted({r["k"] for r in rows if r["k"] > 0}) or [1]
  for ax, (key, label, base) in zip(axes, PANELS, strict=True):
    # std over the sets of the underlying figure, on the panel's scale
    def err(r, key=key, base=base):
      s = r[f"{base}_std"]
      return s / teacher_std if key == "pixel_std_ratio" else s

    for i, m in enumerate(chained):
      pts = sorted((r for r in rows if r["method"] == m and r["k"] > 0), key=lambda r: r["k"])
      ax.errorbar(
        [r["k"] for r in pts],
        [r[key] for r in pts],
        yerr=[err(r) for r in pts],
        marker="o",
        capsize=3,
        color=colors[i % len(colors)],
        label=f"{m} (E-step K)",
      )
    for j, m in enumerate(flat):
      for r in (r for r in rows if r["method"] == m):
        c = colors[(len(chained) + j) % len(colors)]
        ax.axhline(r[key], color=c, linestyle="--", label=f"{m} (no E-step, {r['steps']} steps)")
        ax.axhspan(r[key] - err(r), r[key] + err(r), color=c, alpha=0.12)
    ax.axhline(0.0 if key == "recall_diff" else 1.0, color="black", linewidth=0.8, label="teacher")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("E-step Langevin steps K (equal network passes per run)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="best")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)


def table(rows: list[dict]) -> str:
  """The rows as a markdown table, E-step methods by K, then the others."""
  lines = [
    "| variant | method | K | steps | " + " | ".join(c[0] for c in TABLE) + " |",
    "|" + "---|" * (4 + len(TABLE)),
  ]
  for r in sorted(rows, key=lambda r: (r["k"] == 0, r["method"], r["k"])):
    cells = " | ".join(fmt.format(r[key]) for _, key, fmt in TABLE)
    lines.append(f"| {r['name']} | `{r['method']}` | {r['k']} | {r['steps']} | {cells} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", required=True, help="digits_fidelity.py output (.jsonl)")
  ap.add_argument("--which", default="ema", choices=("ema", "raw"))
  ap.add_argument("--teacher_cache", default=os.path.join(ROOT, "benchmarks", "results", "digits_teacher_ref.json"))
  ap.add_argument("--out", default=os.path.join(ROOT, "docs", "digits_ksweep.png"))
  ap.add_argument("--title", default="Digits one-step students at equal compute (EMA generator, 3 sets x 2,000)")
  args = ap.parse_args()
  with open(args.teacher_cache) as f:
    teacher = json.load(f)["row"]
  rows = load(args.rows, args.which)
  plot(rows, teacher["pixel_std"], args.out, args.title)
  print(table(rows))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

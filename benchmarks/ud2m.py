"""UD2M at 9 NFE vs zero-shot restorers at 9 and 50 NFE on held-out digits.

For each task (Gaussian deblurring, random inpainting; settings of
`configs/ud2m_digits_{deblur,inpaint}.py`):

  1. the UD2M sampler export (`--{task}_export`); with `--train_steps N` and
     no export yet, it is trained first with `emd_jax.jobs.ud2m`
     (the config's settings, N steps, into `--workdir/<task>`);
  2. held-out images: the digits test split (297 images, 16x16, never seen in
     training), one fixed measurement per image (`--seed`);
  3. methods, all with the same base teacher (the export's copy):
       ud2m                 the trained sampler (3 x 3 blocks, LoRA): 9 NFE
       unfolded_zero_shot   the same structure, hand-set blocks, plain teacher: 9 NFE
       diffpir_9/50         DiffPIR (Zhu et al. 2023) at 9 and 50 NFE
       ddrm_50              DDRM (Kawar et al. 2022) at 50 NFE
     The zero-shot methods' hyperparameters are tuned per task and NFE on a
     validation set (`--num_val` digits from the train split): DiffPIR's
     (lambda, zeta) and the zero-shot blocks' (t_delta_max, lam / t_delta^2)
     over small grids, by PSNR. DDRM keeps its paper defaults (eta 0.85);
  4. PSNR, SSIM, the feature distance (L2 between the shipped digits
     classifier's penultimate features of restored and clean images) and the
     wall-clock per image (after compilation, `--batch_size` at a time).

  python benchmarks/ud2m.py --train_steps 600
  python benchmarks/ud2m.py --deblur_export runs/ud2m_deblur/export --inpaint_export runs/ud2m_inpaint/export

Writes `--out`.md, `--out`.json and `--out`.png (per task, rows: clean,
observed, then each method's restorations).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emd_jax.evaluators import digits_classifier as dc  # noqa: E402
from emd_jax.evaluators.grids import image_grid, save_png  # noqa: E402
from emd_jax.evaluators.restoration import psnr, ssim  # noqa: E402
from emd_jax.formats import ud2m_export as export_lib  # noqa: E402
from emd_jax.posterior import baselines  # noqa: E402

TASKS = {"deblur": "ud2m_digits_deblur", "inpaint": "ud2m_digits_inpaint"}
# Tuning grids, wide enough that the chosen values are inside them (not on an edge) for the
# digits tasks; the md table names the chosen values.
DIFFPIR_GRID = list(itertools.product([0.1, 0.3, 1.0, 3.0, 7.0, 20.0], [0.3, 0.6, 1.0]))  # (lambda, zeta)
ZERO_SHOT_GRID = list(
  itertools.product([0.125, 0.25, 0.5, 1.0, 2.0], [0.3, 1.0, 3.0, 10.0])
)  # (t_delta_max, lam / t_delta^2)


def load_config(name: str, arg: str = ""):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def ensure_export(task: str, export_dir: str | None, workdir: str, train_steps: int, teacher: str | None) -> str:
  if export_dir and os.path.isdir(export_dir):
    return export_dir
  if not train_steps:
    raise SystemExit(f"no export for {task} ({export_dir}); pass --train_steps N to train one")
  from emd_jax.jobs import ud2m

  c = load_config(TASKS[task])
  c.total_steps = train_steps
  c.eval_every = max(train_steps // 3, 1)
  c.checkpoint_every = max(train_steps // 3, 1)
  if teacher:
    c.teacher.checkpoint = teacher
  run_dir = os.path.join(workdir, task)
  ud2m.train_and_evaluate(c, run_dir)
  return os.path.join(run_dir, "export")


def batched(fn, y, rng, batch_size: int):
  out = [fn(y[i : i + batch_size], jax.random.fold_in(rng, i)) for i in range(0, y.shape[0], batch_size)]
  return jnp.concatenate(out)


def timed(fn, y, rng, batch_size: int) -> tuple[jax.Array, float]:
  """(restorations, seconds per image), compilation excluded."""
  batched(fn, y[:batch_size], rng, batch_size).block_until_ready()
  t0 = time.perf_counter()
  out = batched(fn, y, rng, batch_size).block_until_ready()
  return out, (time.perf_counter() - t0) / y.shape[0]


class Scorer:
  """PSNR / SSIM / classifier feature distance against fixed clean images."""

  def __init__(self, clean: jax.Array):
    self.model, self.params, _ = dc.load_classifier()
    self.clean = clean
    self.f_clean = self._features(clean)

  def _features(self, x):
    return np.concatenate(
      [dc.predict(self.model, self.params, np.asarray(x[i : i + 512]))[1] for i in range(0, len(x), 512)]
    )

  def __call__(self, restored) -> dict:
    restored = jnp.clip(restored, -1.0, 1.0)
    f = self._features(restored)
    return {
      "psnr": float(jnp.mean(psnr(restored, self.clean))),
      "ssim": float(jnp.mean(ssim(restored, self.clean))),
      "feature_dist": float(np.mean(np.linalg.norm(f - self.f_clean, axis=-1))),
    }


def zero_shot_fns(sampler, sigma_y: float):
  """Jitted zero-shot restorers with traced hyperparameters: name -> (fn(y, rng, hp), nfe, grid)."""
  teacher, op, name = sampler.teacher, sampler.operator, sampler.meta["task"]["operator"]
  denoise = lambda params: lambda x, s, labels=None: teacher.apply(params, x, s, labels)

  def diffpir(nfe):
    base = dataclasses.replace(baselines.DIFFPIR_DEFAULTS.get(name, baselines.DiffPIRConfig()), nfe=nfe)

    @jax.jit
    def run(params, y, rng, lam, zeta):
      cfg = dataclasses.replace(base, lam=lam, zeta=zeta)
      return baselines.diffpir_sample(denoise(params), op, y, rng, sigma_y=sigma_y, config=cfg)

    return lambda y, rng, hp: run(teacher.params, y, rng, *hp)

  def ddrm(nfe):
    cfg = dataclasses.replace(baselines.DDRMConfig(), nfe=nfe)
    run = jax.jit(
      lambda params, y, rng: baselines.ddrm_sample(denoise(params), op, y, rng, sigma_y=sigma_y, config=cfg)
    )
    return lambda y, rng, hp: run(teacher.params, y, rng)

  @jax.jit
  def zero_shot(params, y, rng, t_max, ratio):
    t_delta = jnp.exp(jnp.linspace(jnp.log(t_max), jnp.log(0.05), 9))  # as default_unfolded_params, traced
    p = {"log_t_delta": jnp.log(t_delta), "log_lam": jnp.log(ratio * t_delta**2)}
    return baselines.unfolded_zero_shot(denoise(params), op, y, rng, sigma_y=sigma_y, params=p)

  return {
    "unfolded_zero_shot": (lambda y, rng, hp: zero_shot(teacher.params, y, rng, *hp), 9, ZERO_SHOT_GRID),
    "diffpir_9": (diffpir(9), 9, DIFFPIR_GRID),
    "diffpir_50": (diffpir(50), 50, DIFFPIR_GRID),
    "ddrm_50": (ddrm(50), 50, [()]),
  }


def tune(fn, grid, y_val, clean_val, rng, batch_size: int) -> tuple[tuple, float]:
  best, best_psnr = grid[0], -np.inf
  if len(grid) == 1:
    return best, float("nan")
  for hp in grid:
    out = batched(lambda y, r, hp=hp: fn(y, r, hp), y_val, rng, batch_size)
    value = float(jnp.mean(psnr(jnp.clip(out, -1, 1), clean_val)))
    if np.isfinite(value) and value > best_psnr:
      best, best_psnr = hp, value
  return best, best_psnr


def run_task(task: str, export_dir: str, args) -> tuple[list[dict], np.ndarray]:
  sampler = export_lib.load_sampler(export_dir)
  clean = jnp.asarray(dc.digits_images("test")[0][: args.num_test or None])  # [N, 16, 16, 1]
  val = jnp.asarray(dc.digits_images("train")[0][-args.num_val :])  # validation: the train split's tail
  key = jax.random.PRNGKey(args.seed)
  y = sampler.observe(jax.random.fold_in(key, 0), clean)
  y_val = sampler.observe(jax.random.fold_in(key, 1), val)
  rng = jax.random.fold_in(key, 2)
  scorer = Scorer(clean)
  rows, pictures = [], {}
  restored, sec = timed(lambda yy, r: sampler.restore(yy, r, args.batch_size), y, rng, args.batch_size)
  rows.append({"task": task, "method": "ud2m", "nfe": sampler.nfe, **scorer(restored), "ms_per_image": 1e3 * sec})
  pictures["ud2m"] = restored
  for name, (fn, nfe, grid) in zero_shot_fns(sampler, sampler.sigma_y).items():
    hp, val_psnr = tune(fn, grid, y_val, val, jax.random.fold_in(key, 3), args.batch_size)
    out, sec = timed(lambda yy, r, hp=hp, fn=fn: fn(yy, r, hp), y, rng, args.batch_size)
    row = {"task": task, "method": name, "nfe": nfe, **scorer(out), "ms_per_image": 1e3 * sec}
    row.update({"tuned": list(hp), "val_psnr": val_psnr} if hp else {})
    rows.append(row)
    pictures[name] = out
    print(json.dumps(row), flush=True)
  print(json.dumps(rows[0]), flush=True)
  n = 8
  observed = sampler.operator.backproject(y)
  stack = [clean[:n], observed[:n]] + [pictures[m][:n] for m in ["ud2m", *[r["method"] for r in rows[1:]]]]
  grid = image_grid(np.concatenate([np.clip(np.asarray(s), -1, 1) for s in stack]), ncols=n)
  return rows, grid


def write_results(rows: list[dict], grids: list[np.ndarray], out: str, settings: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump({"rows": rows, "settings": settings}, f, indent=2)
  lines = [
    "| task | method | NFE | PSNR (dB) | SSIM | feature dist. | ms / image | tuned (val PSNR) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    tuned = f"{tuple(r['tuned'])} ({r['val_psnr']:.2f})" if r.get("tuned") else ""
    lines.append(
      f"| {r['task']} | {r['method']} | {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['feature_dist']:.3f} "
      f"| {r['ms_per_image']:.2f} | {tuned} |"
    )
  for task in sorted({r["task"] for r in rows}):
    ours = next(r for r in rows if r["task"] == task and r["method"] == "ud2m")
    best50 = max((r for r in rows if r["task"] == task and r["nfe"] == 50), key=lambda r: r["psnr"])
    lines.append(
      f"\n{task}: UD2M (9 NFE) {ours['psnr']:.2f} dB vs best zero-shot at 50 NFE ({best50['method']}) "
      f"{best50['psnr']:.2f} dB: {ours['psnr'] - best50['psnr']:+.2f} dB"
    )
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  pad = np.zeros((4, grids[0].shape[1], grids[0].shape[2]), np.uint8)
  save_png(out + ".png", np.concatenate([g for grid in grids for g in (grid, pad)][:-1]), scale=3)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", default="deblur,inpaint")
  p.add_argument("--deblur_export", default="runs/ud2m_deblur/export")
  p.add_argument("--inpaint_export", default="runs/ud2m_inpaint/export")
  p.add_argument("--train_steps", type=int, default=0, help="train missing exports for this many steps")
  p.add_argument("--teacher", default=None, help="teacher for training (default: the config's)")
  p.add_argument("--workdir", default="runs/bench_ud2m")
  p.add_argument("--num_test", type=int, default=0, help="test images (0: all 297)")
  p.add_argument("--num_val", type=int, default=99)
  p.add_argument("--batch_size", type=int, default=99, help="297 = 3 x 99: one compiled shape")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ud2m"))
  p.add_argument("--partial", action="store_true", help="write --out.partial.npz only (one task per process)")
  p.add_argument("--combine", default="", help="comma list of .partial.npz files: write the final outputs")
  args = p.parse_args()
  rows, grids = [], []
  if args.combine:
    for path in args.combine.split(","):
      with np.load(path, allow_pickle=False) as f:
        rows += json.loads(str(f["rows"]))
        grids.append(f["grid"])
    write_results(rows, grids, args.out, {"combined": args.combine})
    print(open(args.out + ".md").read())
    return
  for task in args.tasks.split(","):
    export_dir = ensure_export(task, getattr(args, f"{task}_export"), args.workdir, args.train_steps, args.teacher)
    r, g = run_task(task, export_dir, args)
    rows += r
    grids.append(g)
    export_meta = export_lib.load_sampler(export_dir).meta
    for row in r:
      row["export_step"] = export_meta.get("step")
  if args.partial:
    np.savez(args.out + ".partial.npz", rows=json.dumps(rows), grid=grids[0])
    return
  settings = {
    **vars(args),
    "platform": platform.platform(),
    "devices": [str(d) for d in jax.devices()],
    "note": "CPU wall-clock depends on concurrent load",
  }
  write_results(rows, grids, args.out, settings)
  print(open(args.out + ".md").read())


if __name__ == "__main__":
  main()

"""Which noise levels set the digits student's mean image? The generator loss's force on it, per level (issue 14).

The one-step digits student's mean image sits a systematic distance from the teacher's (pixel KID ~1.9x
the teacher's; with the mean removed the KID is at parity: docs/digits.md "The pixel-space KID is the
mean image"). The generator's mean moves by the average, over the batch's noise levels and samples, of
the per-sample descent direction -dL/dx0 of its loss. This script measures that average at single
levels: for a run's checkpoints and each sigma of a grid, it draws the step's own randomness (latents,
forward noise, E-step chains) with every example at that sigma, runs the configured E-step and M-step
loss exactly as the train step does (`emd_jax.distill.step`), and reports, on the 64 pixels of the
centred 8x8 digit,

- `force`: |mean_i -dL_i/dx0_i|, the push on the mean image at this level;
- `along_offset`: its component along the EMA generator's offset from the teacher's mean image (positive:
  it pushes the mean further out; negative: it pulls it back);
- `weighted_along`: `along_offset` times the generator's level density in log sigma (the config's
  `loss.noise`, per unit log sigma), i.e. this level's share of the step's average push;
- `cos_offset`: the cosine of the force with that offset; `noise_floor`: the norm the mean of n
  zero-mean forces would show from the finite sample alone.

If the mean image sat at a fixed point of the loss, the level-density-weighted pushes would cancel over the
levels (some pushing out, others pulling back); the profile shows where the mean is pushed out and where it
is pulled back, and whether they balance. The teacher's mean
image comes from its Heun samples (the benchmark's teacher row: `--teacher_steps`).

  python benchmarks/digits_mean_force.py --workdir runs/digits_seed1_2.5/emd_simloss_k1 \
      --out benchmarks/results/digits_mean_force_seed1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fidelity_common import write_level_table  # noqa: E402
from emd_jax.distill import step as step_lib  # noqa: E402
from emd_jax.evaluate import open_run, restore_state  # noqa: E402
from emd_jax.evaluators import diversity  # noqa: E402
from emd_jax.jobs import distill  # noqa: E402
from emd_jax.sample import sample_teacher  # noqa: E402

SIGMAS = (0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 80.0)


def level_density(noise, sigma: float) -> float:
  """The generator's level density per unit log sigma (lognormal `loss.noise`; clipping ignored)."""
  if noise.kind != "lognormal":
    return float("nan")
  u = (math.log(sigma) - noise.p_mean) / noise.p_std
  return math.exp(-0.5 * u * u) / (noise.p_std * math.sqrt(2 * math.pi))


def forces(setup, gen_params, fake_params, sigma: float, key, n: int, bs: int) -> np.ndarray:
  """`[n, 64]` per-sample descent directions -dL_i/dx0_i of the configured loss at level `sigma`."""
  cfg = setup.step_cfg
  cfg_b = dataclasses.replace(cfg, batch_size=bs)
  nets = step_lib.Nets.build("none", setup.net_apply, setup.teacher.apply)
  tparams = setup.teacher.params

  @jax.jit
  def one(k):
    d = step_lib.draw_randomness(cfg_b, k)
    d = d._replace(sigma=jnp.full_like(d.sigma, sigma))
    x0 = step_lib.generate(cfg_b, nets, gen_params, d.z, d)
    teacher_fn, fake_fn = step_lib._denoisers(nets, fake_params, tparams, d.labels)
    alpha, sig = cfg_b.schedule.alpha_sigma(d.sigma)
    eps, est = d.eps, None
    if cfg_b.estep_steps > 0:
      est = step_lib.run_estep(cfg_b, nets, gen_params, fake_params, tparams, d, x0)
      eps = est.eps

    loss_of_x0 = lambda x: step_lib.mstep_loss(cfg_b, teacher_fn, fake_fn, alpha, sig, eps, est)(x)[0]  # noqa: E731
    g = jax.grad(loss_of_x0)(jax.lax.stop_gradient(x0))
    return -bs * g  # the loss is a batch mean: per-example gradients are B times its gradient

  out = [diversity.digit_pixels(np.asarray(one(jax.random.fold_in(key, i)))) for i in range(n // bs)]
  return np.concatenate(out)


def net_pulls(path: str, dists: str, out: str) -> None:
  """The net push on the offset that other lognormal level distributions would give, from a saved profile:
  each level's `along_offset` weighted by lognormal(p_mean, p_std)'s density per unit log sigma, integrated
  over log sigma by trapezoids on the profile's grid (one checkpoint's profile, so a rough quadrature)."""
  with open(path) as fh:
    profile = json.load(fh)
  last = max(r["step"] for r in profile["rows"])
  rows = sorted((r for r in profile["rows"] if r["step"] == last), key=lambda r: r["sigma"])
  table = []
  for d in dists.split(","):
    p_mean, p_std = (float(v) for v in d.split(":"))
    noise = argparse.Namespace(kind="lognormal", p_mean=p_mean, p_std=p_std)
    parts = [r["along_offset"] * level_density(noise, r["sigma"]) for r in rows]
    logs = [math.log(r["sigma"]) for r in rows]
    inward = outward = 0.0
    for i in range(len(rows) - 1):
      for w in (parts[i], parts[i + 1]):
        share = 0.5 * (logs[i + 1] - logs[i]) * w
        inward, outward = inward + min(share, 0.0), outward + max(share, 0.0)
    table.append({"p_mean": p_mean, "p_std": p_std, "net": inward + outward, "inward": inward, "outward": outward})
  header = [
    "# Digits: the net push on the mean offset under other generator level distributions",
    "",
    f"From `{path}` (step {last}): `python benchmarks/digits_mean_force.py --reweight={dists} --profile {path}`. "
    "Negative: a pull back towards the teacher's mean image (per sample, density-weighted, trapezoids in log sigma).",
    "",
  ]
  write_level_table(
    out, header, [("p_mean", "p_mean"), ("p_std", "p_std")], table, ".4f", {"profile": path, "rows": table}
  )


def cached_teacher_mean(args, run, key) -> np.ndarray:
  """The teacher's mean image over `--teacher_samples` Heun samples, through `--teacher_cache` when given."""
  made_with = {
    "teacher": str(run.config.teacher.get("checkpoint", run.config.teacher.get("kind"))),
    "samples": args.teacher_samples,
    "steps": args.teacher_steps,
    "seed": args.seed,
  }
  if args.teacher_cache and os.path.exists(args.teacher_cache):
    with np.load(args.teacher_cache) as f:
      if json.loads(str(f["made_with"])) == made_with:
        print(f"teacher mean image from {args.teacher_cache}")
        return f["mean"]
    print(f"{args.teacher_cache} was made with other settings: recomputing")
  teacher = run.setup.teacher
  xt, _ = sample_teacher(teacher, jax.random.fold_in(key, 1), args.teacher_samples, num_steps=args.teacher_steps)
  mean = diversity.digit_pixels(np.asarray(xt)).mean(axis=0)
  if args.teacher_cache:
    os.makedirs(os.path.dirname(args.teacher_cache) or ".", exist_ok=True)
    np.savez(args.teacher_cache, mean=mean, made_with=json.dumps(made_with, sort_keys=True))
  return mean


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="", help="a digits distillation run's directory")
  ap.add_argument("--profile", default="", help="with --reweight: a results .json this tool wrote")
  ap.add_argument("--reweight", default="", help="P_MEAN:P_STD,...: net pulls of these level distributions")
  ap.add_argument("--steps", default="", help="checkpoint steps to read (default: every saved one)")
  ap.add_argument("--num_samples", type=int, default=4000, help="samples per level (a multiple of --batch_size)")
  ap.add_argument("--batch_size", type=int, default=500)
  ap.add_argument("--teacher_samples", type=int, default=4000)
  ap.add_argument("--teacher_steps", type=int, default=18, help="Heun steps of the teacher's reference samples")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--teacher_cache",
    default="",
    help="an .npz file for the teacher's mean image: read when it was made with the same teacher, samples, "
    "steps and seed, else computed and written (the Heun samples are most of the tool's time)",
  )
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_mean_force"))
  args = ap.parse_args()
  if args.reweight:
    if not args.profile:
      raise SystemExit("--reweight needs --profile (a results .json of this tool)")
    return net_pulls(args.profile, args.reweight, args.out)
  if not args.workdir:
    raise SystemExit("--workdir is required (or --reweight with --profile)")

  run = open_run(args.workdir)
  setup = run.setup
  if tuple(setup.teacher.data_shape) != (16, 16, 1):
    raise SystemExit(f"{args.workdir}: a {setup.teacher.data_shape} teacher; this script reads 16x16 digits runs")
  if setup.step_cfg.gen_sigmas or setup.step_cfg.adv.gen_weight:
    raise SystemExit(f"{args.workdir}: one-step students without the adversarial term only")
  steps = [int(s) for s in args.steps.split(",")] if args.steps else list(run.steps)
  missing = sorted(set(steps) - set(run.steps))
  if missing:
    raise SystemExit(f"{args.workdir}: no checkpoint at steps {missing}; saved: {list(run.steps)}")
  key = jax.random.key(args.seed)
  teacher_mean = cached_teacher_mean(args, run, key)
  shape = setup.teacher.data_shape
  z = setup.step_cfg.sigma_init * jax.random.normal(jax.random.fold_in(key, 2), (args.teacher_samples, *shape))
  rows, offsets = [], {}
  for st in steps:
    state = restore_state(run, st)
    ema_mean = diversity.digit_pixels(np.asarray(distill._generate(setup, state.gen_ema, z, batch_size=500))).mean(0)
    raw_mean = diversity.digit_pixels(np.asarray(distill._generate(setup, state.gen_params, z, batch_size=500))).mean(0)
    off = ema_mean - teacher_mean
    u = off / np.linalg.norm(off)
    offsets[st] = {"ema": float(np.linalg.norm(off)), "raw": float(np.linalg.norm(raw_mean - teacher_mean))}
    print(f"step {st}: EMA offset from the teacher's mean {offsets[st]['ema']:.3f}, raw {offsets[st]['raw']:.3f}")
    for j, sigma in enumerate(SIGMAS):
      f = forces(
        setup,
        state.gen_params,
        state.fake_params,
        sigma,
        jax.random.fold_in(key, 1000 + j),
        args.num_samples,
        args.batch_size,
      )
      m = f.mean(axis=0)
      dens = level_density(setup.step_cfg.gen_noise, sigma)
      row = {
        "step": st,
        "sigma": sigma,
        "force": float(np.linalg.norm(m)),
        "along_offset": float(m @ u),
        "weighted_along": float(m @ u) * dens,
        "cos_offset": float(m @ u / (np.linalg.norm(m) + 1e-12)),
        "noise_floor": float(np.sqrt((f.var(axis=0, ddof=1) / len(f)).sum())),
        "level_density": dens,
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  run.checkpointer.close()

  header = [
    "# Digits: the generator loss's push on the mean image, per noise level",
    "",
    f"Run `{args.workdir}`; {args.num_samples} samples per level; the teacher's mean image from "
    f"{args.teacher_samples} Heun-{args.teacher_steps} samples. `python benchmarks/digits_mean_force.py "
    f"--workdir {args.workdir}`. Forces are means of -dL/dx0 over the raw generator's samples (64 pixels); "
    "`along_offset` is their component along the EMA generator's offset from the teacher's mean.",
    "",
    "EMA / raw offsets from the teacher's mean: "
    + ", ".join(f"step {s}: {o['ema']:.3f} / {o['raw']:.3f}" for s, o in offsets.items()),
    "",
  ]
  payload = {"workdir": args.workdir, "offsets": offsets, "rows": rows}
  write_level_table(args.out, header, [("step", "step"), ("sigma", "sigma")], rows, ".4g", payload)


if __name__ == "__main__":
  main()

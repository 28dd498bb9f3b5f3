"""Does the fake denoiser's first-moment bias set the digits student's mean offset? (issue 14)

For the exact denoiser of any distribution, Tweedie's formula gives E_{x0, eps}[D(x0 + sigma eps, sigma)] = E[x0]
at every sigma. The fake denoiser is trained to be the generator's denoiser; if it lags or is biased,
E[D_fake(x_t)] - E[x0] is not zero, and every score-distillation direction (D_fake - D_teacher, and SIM's,
which differentiates the same difference) carries that bias into the generator's mean. This script
measures, for a run's newest checkpoint and at a grid of noise levels:

- `fake_bias`: |E[D_fake(x_t)] - E[x0]| over the raw generator's samples (the fake is trained on these);
- `teacher_pull`: |E[D_teacher(x_t)] - E[x0]| over the same samples (the teacher's pull on the mean);
- `teacher_bias_real`: |E[D_teacher(x_t)] - E[x0]| over the real digits (a trained network's own Tweedie
  error, the scale `fake_bias` should be compared with);
- `noise_floor`: the norm a zero-mean estimate would show from the finite sample alone;
- the cosines of the fake's bias and the teacher's pull with the generators' mean offset from the real mean;
- `cos_teacher_error_real_ema_offset`: whether the EMA generator's offset is the teacher's own first-moment
  error on the real digits (a student that matches the teacher's scores inherits it);
- `di_mean_dir`: |E[D_teacher(x_t) - D_fake(x_t)]|, the mean of the direction a Diff-Instruct-type update
  gives the generator at that level (the teacher's pull less the fake's bias).

With `--refit 100,300` the fake is then trained on, from its checkpointed parameters and optimizer state,
on the frozen raw generator's samples (the run's batch size, noise levels and optimizer) and measured again
after each count: a bias that falls with more updates is the fake's lag behind the moving generator; one
that stays is what the network can represent (compare `teacher_bias_real`).

All in the 64 pixels of the centred 8x8 digit. Norms are of 64-vectors (pixels in [-1, 1]).

  python benchmarks/digits_fake_bias.py --workdir runs/digits_seed1_2.5/emd_simloss_k1 \
      --out benchmarks/results/digits_fake_bias_seed1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fidelity_common import write_level_table  # noqa: E402
from emd_jax.distill.step import first_input  # noqa: E402
from emd_jax.evaluate import open_run, restore_state  # noqa: E402
from emd_jax.evaluators import diversity  # noqa: E402
from emd_jax.evaluators.digits_classifier import digits_images  # noqa: E402
from emd_jax.jobs import distill  # noqa: E402

SIGMAS = (0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 5.0, 20.0, 80.0)


def pixels(x) -> np.ndarray:
  return diversity.digit_pixels(np.asarray(x))


def cos(a: np.ndarray, b: np.ndarray) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="a distillation run's directory (newest checkpoint)")
  ap.add_argument("--num_samples", type=int, default=4000)
  ap.add_argument("--batch_size", type=int, default=500)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--refit", default="", help="fake-only update counts to measure after, e.g. 100,300")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_fake_bias"))
  args = ap.parse_args()

  run = open_run(args.workdir)
  step = run.steps[-1]
  state = restore_state(run, step)
  run.checkpointer.close()
  setup = run.setup
  teacher = setup.teacher
  shape = teacher.data_shape
  if tuple(shape) != (16, 16, 1):
    raise SystemExit(f"{args.workdir}: a {shape} teacher; this script reads 16x16 digits runs")
  n, bs = args.num_samples, args.batch_size
  key = jax.random.key(args.seed)
  z = setup.step_cfg.sigma_init * jax.random.normal(jax.random.fold_in(key, 0), (n, *shape))
  x_raw = np.asarray(distill._generate(setup, state.gen_params, z, batch_size=bs))
  x_ema = np.asarray(distill._generate(setup, state.gen_ema, z, batch_size=bs))
  real, _ = digits_images("train")
  real = real[np.random.default_rng(args.seed).permutation(len(real))[:n]]
  real_mean = pixels(real).mean(axis=0)
  offsets = {"raw": pixels(x_raw).mean(axis=0) - real_mean, "ema": pixels(x_ema).mean(axis=0) - real_mean}

  teach = jax.jit(lambda x, s: teacher.apply(teacher.params, x, s, None))
  net = jax.jit(setup.net_apply)

  def residual_stats(denoise, x0: np.ndarray, sigma: float, k) -> tuple[np.ndarray, float]:
    """E[D(x0 + sigma eps) - x0] (64 pixels) and the norm a zero-mean residual would show at this n."""
    res = []
    for i in range(0, len(x0), bs):
      xb = jnp.asarray(x0[i : i + bs])
      eps = jax.random.normal(jax.random.fold_in(k, i), xb.shape)
      s = jnp.full((xb.shape[0],), sigma, jnp.float32)
      res.append(pixels(denoise(xb + sigma * eps, s)) - pixels(xb))
    res = np.concatenate(res)
    return res.mean(axis=0), float(np.sqrt((res.var(axis=0, ddof=1) / len(res)).sum()))

  static = {}
  for j, sigma in enumerate(SIGMAS):
    k = jax.random.fold_in(key, 100 + j)
    tp, _ = residual_stats(teach, x_raw, sigma, k)
    tr, floor_r = residual_stats(teach, real, sigma, k)
    static[sigma] = (tp, tr, floor_r)

  def measure(fake_params, refit: int) -> list[dict]:
    out = []
    for j, sigma in enumerate(SIGMAS):
      k = jax.random.fold_in(key, 100 + j)
      fb, floor = residual_stats(lambda x, s: net(fake_params, x, s), x_raw, sigma, k)
      tp, tr, floor_r = static[sigma]
      row = {
        "refit": refit,
        "sigma": sigma,
        "fake_bias": float(np.linalg.norm(fb)),
        "noise_floor": floor,
        "teacher_pull": float(np.linalg.norm(tp)),
        "di_mean_dir": float(np.linalg.norm(tp - fb)),
        "teacher_bias_real": float(np.linalg.norm(tr)),
        "noise_floor_real": floor_r,
        "cos_fake_bias_raw_offset": cos(fb, offsets["raw"]),
        "cos_fake_bias_ema_offset": cos(fb, offsets["ema"]),
        "cos_teacher_pull_ema_offset": cos(tp, offsets["ema"]),
        "cos_teacher_pull_fake_bias": cos(tp, fb),
        "cos_teacher_error_real_ema_offset": cos(tr, offsets["ema"]),
      }
      out.append(row)
      print(json.dumps(row), flush=True)
    return out

  rows = measure(state.fake_params, 0)
  refits = sorted(int(v) for v in filter(None, args.refit.split(",")))
  if refits:
    from emd_jax.distill.fake_score import dsm_loss_and_grad

    cfg = setup.step_cfg
    b = run.config.batch_size

    @jax.jit
    def fake_update(params, opt_state, k):
      kz, ks, kn = jax.random.split(k, 3)
      zb = cfg.sigma_init * jax.random.normal(kz, (b, *shape))
      xb = setup.net_apply(state.gen_params, first_input(cfg, zb), jnp.full((b,), cfg.sigma_init, jnp.float32))
      sig = cfg.fake_noise.sample(ks, (b,))
      loss, g = dsm_loss_and_grad(
        setup.net_apply, params, xb, sig, jax.random.normal(kn, xb.shape), None, cfg.sigma_data
      )
      upd, opt_state = setup.tx_fake.update(g, opt_state, params)
      return optax.apply_updates(params, upd), opt_state, loss

    params, opt_state, done = state.fake_params, state.fake_opt_state, 0
    for target in refits:
      for i in range(done, target):
        params, opt_state, _ = fake_update(params, opt_state, jax.random.fold_in(key, 10_000 + i))
      done = target
      rows += measure(params, target)

  refit_flag = f" --refit {args.refit}" if args.refit else ""
  header = [
    "# Digits: the fake denoiser's first-moment (Tweedie) bias and the teacher's pull on the generator's mean",
    "",
    f"Run `{args.workdir}`, checkpoint step {step}; {n} samples (raw generator, and real digits for the teacher's "
    f"own bias); norms of 64-pixel vectors. `python benchmarks/digits_fake_bias.py "
    f"--workdir {args.workdir}{refit_flag}`.",
    f"Generator mean offsets from the real mean image: raw {np.linalg.norm(offsets['raw']):.3f}, "
    f"EMA {np.linalg.norm(offsets['ema']):.3f} (cosine {cos(offsets['raw'], offsets['ema']):.2f}).",
    "",
  ]
  offsets_json = {k: v.tolist() for k, v in offsets.items()}
  payload = {"workdir": args.workdir, "step": step, "offsets": offsets_json, "rows": rows}
  write_level_table(
    args.out, header, [("refit", "fake updates after the checkpoint"), ("sigma", "sigma")], rows, ".4f", payload
  )


if __name__ == "__main__":
  main()

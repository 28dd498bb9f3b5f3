"""Overhead of the fused train step over its network passes.

For the default method (EMD E-step, K = 8, + pseudo-Huber M-step) on a small U-Net, time
the full jitted train step and, in the same run, each constituent pass alone:

  teacher forward, fake forward, generator forward+backward (the VJP the step keeps),
  fake DSM forward+backward

and report `step time / sum of parts`, where the sum counts each pass as often as the step
runs it: gen VJP + fake DSM + K x (teacher fwd + fake fwd). Target: <= 1.10. The same is
reported for SIM, which backpropagates through both denoisers (its parts: gen VJP + fake
DSM + teacher and fake forward+backward-to-input).

  python benchmarks/step_overhead.py --out benchmarks/results/step_overhead.json

Runs on whatever JAX backend is present (CPU here; name the hardware with --hardware).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax import nets
from emd_jax.config.defaults import distill_config
from emd_jax.diffusion import dsm_loss_at
from emd_jax.distill.state import create_state
from emd_jax.jobs import distill as train
from emd_jax.runtime import parallel
from emd_jax.teachers import network

UNET = dict(
  arch="song_unet",
  precond="edm",
  img_resolution=16,
  in_channels=3,
  out_channels=3,
  model_channels=32,
  channel_mult=[1, 2],
  num_blocks=1,
  attn_resolutions=[8],
)


def timeit(fn, *args, repeats: int = 10) -> float:
  """Median wall time of `fn(*args)` (already compiled by one warm-up call), seconds."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def measure(method: str, batch: int, k: int, teacher_dir: str, repeats: int) -> dict:
  c = distill_config()
  c.method = method
  c.teacher.checkpoint = teacher_dir
  c.batch_size = batch
  if method.startswith("emd"):
    c.estep.num_steps = k
  train.validate_distill(c)
  setup = train.build_setup(c)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  key = jax.random.PRNGKey(0)
  abstract = train.abstract_state(setup, key)
  step, state_sh, teacher_sh = train.sharded_step(setup, mesh, abstract)
  state = jax.device_put(create_state(key, setup.teacher.params, setup.tx_gen, setup.tx_fake), state_sh)
  tparams = jax.device_put(setup.teacher.params, teacher_sh)

  holder = {"state": state}

  def run_step():
    holder["state"], m = step(holder["state"], tparams)
    return m

  t_step = timeit(run_step, repeats=repeats)

  shape = (batch, *setup.teacher.data_shape)
  x = jax.random.normal(key, shape)
  sigma = jnp.full((batch,), 0.5)
  p = setup.teacher.params
  apply = setup.net_apply
  t_teacher = timeit(jax.jit(lambda pp, xx: setup.teacher.apply(pp, xx, sigma, None)), p, x, repeats=repeats)
  t_fake = timeit(jax.jit(lambda pp, xx: apply(pp, xx, sigma, None)), p, x, repeats=repeats)

  @jax.jit
  def gen_vjp(pp, z):
    out, vjp = jax.vjp(lambda q: apply(q, z, jnp.full((batch,), 2.5), None), pp)
    return vjp(out)

  t_gen = timeit(gen_vjp, p, x, repeats=repeats)

  @jax.jit
  def fake_dsm(pp, xx):
    return jax.grad(lambda q: jnp.mean(dsm_loss_at(lambda a, s, lab: apply(q, a, s, None), xx, sigma, xx, None)))(pp)

  t_dsm = timeit(fake_dsm, p, x, repeats=repeats)

  @jax.jit
  def fwd_bwd_input(pp, xx):
    return jax.grad(lambda a: jnp.sum(apply(pp, a, sigma, None)))(xx)

  parts = {"teacher_fwd": t_teacher, "fake_fwd": t_fake, "gen_fwd_bwd": t_gen, "fake_dsm_fwd_bwd": t_dsm}
  if method.startswith("emd") and c.loss.name == "emd":
    total = t_gen + t_dsm + k * (t_teacher + t_fake)
    recipe = f"gen_fwd_bwd + fake_dsm_fwd_bwd + {k} x (teacher_fwd + fake_fwd)"
  else:
    t_in = timeit(fwd_bwd_input, p, x, repeats=repeats)
    parts["denoiser_fwd_bwd_to_input"] = t_in
    total = t_gen + t_dsm + 2 * t_in
    recipe = "gen_fwd_bwd + fake_dsm_fwd_bwd + 2 x denoiser_fwd_bwd_to_input"
  return {
    "method": method,
    "K": k if method.startswith("emd") else 0,
    "batch": batch,
    "step_s": t_step,
    "parts_s": parts,
    "sum_of_parts_s": total,
    "recipe": recipe,
    "ratio": t_step / total,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--methods", default="emd,emd_sim,sim")
  ap.add_argument("--hardware", default=f"{platform.processor() or platform.machine()} ({jax.default_backend()})")
  ap.add_argument("--out", default="benchmarks/results/step_overhead.json")
  args = ap.parse_args()
  module = nets.build(UNET)
  params = module.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)), jnp.ones((1,)))["params"]
  tdir = network.save("/tmp/emd_step_overhead_teacher", UNET, params, {"source": "random init (benchmark)"})
  rows = [measure(m, args.batch, args.k, tdir, args.repeats) for m in args.methods.split(",")]
  result = {
    "hardware": args.hardware,
    "jax": jax.__version__,
    "devices": str(jax.devices()),
    "unet": UNET,
    "rows": rows,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  lines = ["| method | K | batch | step (ms) | sum of parts (ms) | ratio |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
      f"| {r['method']} | {r['K']} | {r['batch']} | {1e3 * r['step_s']:.1f} | "
      f"{1e3 * r['sum_of_parts_s']:.1f} | {r['ratio']:.3f} |"
    )
  table = "\n".join(lines)
  with open(args.out.replace(".json", ".md"), "w") as f:
    f.write(f"Hardware: {args.hardware}, JAX {jax.__version__}\n\n{table}\n")
  print(table)


if __name__ == "__main__":
  main()

"""The prepared accelerator check: paper-size steps timed on the chip this runs on (issue 18).

One command, at most `--budget_s` (default 300 s) of wall time, for the first run on a GPU or TPU:

  python benchmarks/accelerator.py --out benchmarks/results/accelerator
  python benchmarks/accelerator.py --small --steps 2 --out /tmp/acc    # CPU smoke version (tests)

For each case, with random weights at paper size (no download):
  - `cifar10_sim`: configs/cifar10_sim.py (SIM, EDM's DDPM++ SongUNet at 32x32, 55.7M parameters);
  - `imagenet64_emd`: configs/imagenet64_emd.py (EMD, EDM's ImageNet-64 ADM, 295.9M parameters);
and for each of `--dtypes` (bf16 and f32), on all local devices (the configs' data x fsdp mesh):
compile time, step time (median of `--steps` timed steps after one warm-up), FLOPs per step from
XLA's cost analysis, achieved FLOP/s and MFU against the chip's dense bf16 peak (table `PEAK_TFLOPS`,
vendor figures; `--peak_tflops` overrides), the device's peak memory (`memory_stats`, where the
backend reports it) and XLA's compiled memory estimate, and bf16 / f32 step time. Cases are run in
order until the budget is spent; the rest are recorded as skipped. Writes `--out`.json and `--out`.md
after every case.

Not yet run on an accelerator by this project: docs/scaling.md holds CPU projections until then.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import memory  # noqa: E402
from emd_jax import nets  # noqa: E402
from emd_jax.jobs import distill as train  # noqa: E402

# Dense bf16 TFLOP/s per chip (vendor data sheets; sparsity not counted). Matched on device_kind.
PEAK_TFLOPS = {
  "H200": 989.0,
  "H100": 989.0,
  "A100": 312.0,
  "L4": 121.0,
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,
  "TPU v5e": 197.0,
  "TPU v5p": 459.0,
  "TPU v5": 459.0,
  "TPU v6 lite": 918.0,
  "TPU v6e": 918.0,
}

SMALL_SONG = dict(
  arch="song_unet",
  precond="edm",
  img_resolution=16,
  in_channels=3,
  out_channels=3,
  label_dim=0,
  model_channels=16,
  channel_mult=[1, 2],
  num_blocks=1,
  attn_resolutions=[8],
)
# name -> (config file, full-size spec, smoke spec, per-device batch)
CASES = {
  "cifar10_sim": ("cifar10_sim.py", memory.CIFAR10, SMALL_SONG, 32),
  "imagenet64_emd": ("imagenet64_emd.py", memory.ADM64, memory.SMALL, 4),
}


def peak_tflops(kind: str, override: float) -> float | None:
  if override:
    return override
  for name, tf in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return tf
  return None


def random_state(setup, spec: dict, dtype: str, state_sh, teacher_sh, key):
  """Random teacher weights and a student state (generator = fake = a copy of random weights), created sharded."""
  module = nets.build({**spec, "dtype": dtype})
  res, ch = spec["img_resolution"], spec["in_channels"]
  labels = jnp.zeros((1, spec["label_dim"]))

  def init(k):
    return module.init(k, jnp.zeros((1, res, res, ch)), jnp.ones((1,)), labels)["params"]

  teacher = jax.jit(init, out_shardings=teacher_sh)(key)
  state = jax.jit(lambda k: train.initial_state(setup, k, init(k)), out_shardings=state_sh)(jax.random.fold_in(key, 1))
  return state, teacher


def run_case(name: str, dtype: str, args) -> dict:
  config_file, full, small, per_device = CASES[name]
  spec = small if args.small else full
  per_device = args.per_device_batch or (2 if args.small else per_device)
  n = jax.local_device_count()
  step, setup, _, state_sh, _, teacher_sh, c = memory.step_for(config_file, spec, n, per_device, args.remat, dtype)
  state, teacher = random_state(setup, spec, dtype, state_sh, teacher_sh, jax.random.PRNGKey(args.seed))
  t0 = time.perf_counter()
  compiled = step.lower(state, teacher).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  mem = compiled.memory_analysis()
  times = []
  state, m = compiled(state, teacher)  # warm-up (the state is donated: always rebind it)
  jax.block_until_ready(m)
  for _ in range(args.steps):
    t = time.perf_counter()
    state, m = compiled(state, teacher)
    jax.block_until_ready((state.step, m))
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  peak = peak_tflops(dev.device_kind, args.peak_tflops)
  gib = 2.0**30
  achieved = flops / step_s / 1e12 if step_s > 0 else float("nan")
  return {
    "case": name,
    "dtype": dtype,
    "small": args.small,
    "devices": n,
    "mesh": {"data": c.mesh.data, "fsdp": c.mesh.fsdp},
    "global_batch": c.batch_size,
    "remat": args.remat,
    "K": c.estep.num_steps,
    "params_per_net": int(sum(x.size for x in jax.tree.leaves(teacher))),
    "compile_s": compile_s,
    "step_s": step_s,
    "step_s_all": times,
    "flops_per_device": flops,
    "tflops_per_s": achieved,
    "peak_tflops": peak,
    "mfu": achieved / peak if peak else None,
    "peak_memory_gib": stats["peak_bytes_in_use"] / gib if stats and "peak_bytes_in_use" in stats else None,
    "xla_temp_gib": mem.temp_size_in_bytes / gib,
    "xla_argument_gib": mem.argument_size_in_bytes / gib,
    "finite": bool(jnp.isfinite(m["loss/generator"])) if "loss/generator" in m else None,
  }


def markdown(rows: list[dict], settings: dict) -> str:
  lines = [
    "# Accelerator check: paper-size steps, random weights",
    "",
    f"Settings: {json.dumps(settings)}",
    "",
    "| case | dtype | devices | global batch | K | compile s | step s | TFLOP/step/device | TFLOP/s | MFU | "
    "peak GiB | XLA temp GiB | bf16 / f32 time |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  f32 = {r["case"]: r["step_s"] for r in rows if r.get("dtype") == "float32" and "step_s" in r}
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['case']} | {r['dtype']} | skipped: {r['skipped']} |" + " |" * 10)
      continue
    ratio = r["step_s"] / f32[r["case"]] if r["dtype"] == "bfloat16" and r["case"] in f32 else None

    def f(v, fmt):
      return "-" if v is None else fmt.format(v)

    lines.append(
      f"| {r['case']} | {r['dtype']} | {r['devices']} | {r['global_batch']} | {r['K']} | {r['compile_s']:.0f} | "
      f"{r['step_s']:.3f} | {r['flops_per_device'] / 1e12:.2f} | {r['tflops_per_s']:.1f} | {f(r['mfu'], '{:.1%}')} | "
      f"{f(r['peak_memory_gib'], '{:.2f}')} | {r['xla_temp_gib']:.2f} | {f(ratio, '{:.2f}')} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default="cifar10_sim,imagenet64_emd")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per case (after one warm-up)")
  ap.add_argument("--per_device_batch", type=int, default=0, help="0: the case's (32 CIFAR-10, 4 ImageNet-64)")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--budget_s", type=float, default=300.0)
  ap.add_argument("--peak_tflops", type=float, default=0.0, help="the chip's peak; 0: from PEAK_TFLOPS")
  ap.add_argument("--small", action="store_true", help="small networks (CPU smoke test)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="benchmarks/results/accelerator")
  args = ap.parse_args()
  for name in args.cases.split(","):
    if name not in CASES:
      raise SystemExit(f"error: --cases: unknown case {name!r}; known: {sorted(CASES)}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
  dev = jax.local_devices()[0]
  settings = {
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "devices": jax.local_device_count(),
    "jax": jax.__version__,
    "steps": args.steps,
    "budget_s": args.budget_s,
    "small": args.small,
  }
  t_start = time.perf_counter()
  rows = []
  for name in args.cases.split(","):
    for dtype in args.dtypes.split(","):
      spent = time.perf_counter() - t_start
      if spent > args.budget_s:
        rows.append({"case": name, "dtype": dtype, "skipped": f"budget spent ({spent:.0f} s)"})
      else:
        rows.append(run_case(name, dtype, args))
      print(json.dumps(rows[-1]), flush=True)
      with open(f"{args.out}.json", "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=2)
      with open(f"{args.out}.md", "w") as f:
        f.write(markdown(rows, settings))
  print(markdown(rows, settings))


if __name__ == "__main__":
  main()

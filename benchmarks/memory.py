"""Compiled memory and FLOPs of the distillation train step at paper sizes, per device.

Lowers and compiles (`jit(...).lower(...).compile()`, nothing is executed) the train step of a
paper config with random-weight networks of its size (`CASES`: CIFAR-10 SIM with EDM's DDPM++,
ImageNet-64 EMD with EDM's ADM at 295.9M parameters, an ImageNet-128 ADM stand-in, a ~1B latent
U-Net stand-in) for meshes of 1, 8 and 64 devices (fake CPU devices here: XLA's CPU memory figures
stand in for an accelerator's), and reports XLA's memory analysis (arguments, outputs,
temporaries per device), its cost analysis (FLOPs per step) and the chips whose HBM holds the peak.
`--where` adds what is alive at the peak (benchmarks/hlo_peak.py).

  python benchmarks/memory.py --out benchmarks/results/memory.json
  python benchmarks/memory.py --cases small --devices 1,8   # minutes-long smoke version
  python benchmarks/memory.py --cases cifar10,in64,in128,latent1b --out benchmarks/results/memory_paper.json
  python benchmarks/memory.py --cases in64 --devices 8 --remat none --where   # + what is alive at the peak

The batch is weak-scaled: `--per_device_batch` examples per device.
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=64")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import hlo_peak  # noqa: E402
from emd_jax import nets  # noqa: E402
from emd_jax.jobs import distill as train  # noqa: E402
from emd_jax.runtime import checkpoint as ckpt_lib  # noqa: E402
from emd_jax.runtime import parallel  # noqa: E402
from emd_jax.teachers.base import Teacher  # noqa: E402

ADM64 = dict(arch="dhariwal_unet", precond="edm", img_resolution=64, in_channels=3, out_channels=3, label_dim=1000)
SMALL = dict(
  arch="dhariwal_unet",
  precond="edm",
  img_resolution=16,
  in_channels=3,
  out_channels=3,
  label_dim=10,
  model_channels=32,
  channel_mult=[1, 2],
  num_blocks=1,
  attn_resolutions=[8],
)


CIFAR10 = dict(arch="song_unet", precond="edm", img_resolution=32, in_channels=3, out_channels=3, label_dim=0)
# ImageNet-128: EDM publishes no 128x128 network; an ADM-style stand-in (ADM's 128x128 channel
# multipliers, ImageNet-64's width and attention resolutions).
ADM128 = dict(ADM64, img_resolution=128, channel_mult=[1, 1, 2, 3, 4], attn_resolutions=[32, 16, 8])
# A latent text-to-image-sized stand-in: an ADM U-Net of about 1B parameters on 64x64x4 latents
# (Stable Diffusion's latent shape at 512 px), classes standing in for the text conditioning.
LATENT1B = dict(ADM64, in_channels=4, out_channels=4, model_channels=352)

# name -> (config file, architecture, per-device batch, remat modes, config overrides)
CASES = {
  "in64": ("imagenet64_emd.py", ADM64, 4, "none,full", {}),
  "in128": ("imagenet128_emd.py", ADM128, 2, "full", {}),
  "cifar10": ("cifar10_sim.py", CIFAR10, 32, "none", {}),
  "latent1b": ("latent_t2i_emd.py", LATENT1B, 1, "full", {"grad_accum_steps": 1}),
  "small": ("imagenet64_emd.py", SMALL, 4, "none,full", {}),
}
# HBM per chip (GiB), for the "fits" column: the per-device peak must not exceed it.
CHIPS = {"TPU v5e": 16, "TPU v4": 32, "TPU v6e": 32, "H100": 80, "TPU v5p": 95}


def fits(peak_gib: float) -> str:
  ok = [name for name, hbm in sorted(CHIPS.items(), key=lambda kv: kv[1]) if peak_gib <= hbm]
  return ", ".join(ok) if ok else "none listed"


def abstract_teacher(spec: dict, dtype: str) -> Teacher:
  spec = {**spec, "dtype": dtype}
  module = nets.build(spec)
  res, ch = spec["img_resolution"], spec["in_channels"]
  x = jnp.zeros((1, res, res, ch))
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, jnp.ones((1,)), jnp.zeros((1, spec["label_dim"])))
  return Teacher(
    apply=lambda p, xx, s, lab: module.apply({"params": p}, xx, s, lab),
    params=params["params"],
    data_shape=(res, res, ch),
    num_classes=spec["label_dim"],
    spec={"kind": "network", "net": spec},
  )


def step_for(
  config_file: str, spec: dict, devices: int, per_device_batch: int, remat: str, dtype: str, k=None, overrides=None
):
  """The sharded train step of `configs/<config_file>` with an abstract `spec` teacher on `devices` devices.

  Returns `(step, setup, abstract_state, state_shardings, teacher, teacher_shardings, config)`; `k`
  (None: the config's) is the E-step's chain length; `overrides` {top-level config key: value}.
  Shared with benchmarks/accelerator.py.
  """
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", config_file)
  mod_spec = importlib.util.spec_from_file_location(config_file.removesuffix(".py"), path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  c = mod.get_config()
  c.teacher.checkpoint = "(abstract)"
  c.batch_size = per_device_batch * devices
  c.remat = remat
  c.compute_dtype = dtype
  if k is not None:
    c.estep.num_steps = k
  from benchmarks.digits_sweep import apply_overrides  # dotted keys ("mesh.gather"); unknown ones raise

  apply_overrides(c, overrides or {})
  fsdp = min(devices, 8)
  c.mesh.fsdp = fsdp
  c.mesh.data = devices // fsdp
  from emd_jax.distill import methods

  methods.resolve(c)
  teacher = abstract_teacher(spec, dtype)
  setup = train.build_setup(c, teacher)
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:devices])
  abstract = train.abstract_state(setup, jax.random.PRNGKey(0))
  step, state_sh, teacher_sh = train.sharded_step(setup, mesh, abstract)
  return step, setup, abstract, state_sh, teacher, teacher_sh, c


def compile_step(
  config_file: str,
  spec: dict,
  devices: int,
  per_device_batch: int,
  remat: str,
  dtype: str,
  k: int,
  where: bool = False,
  overrides: dict | None = None,
) -> dict:
  """One row: XLA's memory and cost analysis of the compiled step. With `where`, also what is alive at
  the memory peak (`hlo_peak.report` on XLA's dumps of this compilation, made in a temporary directory)."""
  step, setup, abstract, state_sh, teacher, teacher_sh, c = step_for(
    config_file, spec, devices, per_device_batch, remat, dtype, k, overrides
  )
  mesh_shape = {"data": c.mesh.data, "fsdp": c.mesh.fsdp}
  t0 = time.perf_counter()
  lowered = step.lower(ckpt_lib.abstract_like(abstract, state_sh), ckpt_lib.abstract_like(teacher.params, teacher_sh))
  dump = tempfile.mkdtemp(prefix="emd_jax_hlo_") if where else None
  options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True, "xla_dump_hlo_module_re": "jit_step"} if where else None
  compiled = lowered.compile(compiler_options=options)
  seconds = time.perf_counter() - t0
  peak = None
  if where:
    mem = compiled.memory_analysis()
    allocated = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    peak = peak_of(dump, teacher, teacher_sh, per_device_batch, allocated)
    shutil.rmtree(dump, ignore_errors=True)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  n_params = sum(x.size for x in jax.tree.leaves(teacher.params))
  gib = 2.0**30
  return {
    "devices": devices,
    "mesh": mesh_shape,
    "global_batch": c.batch_size,
    "remat": remat,
    "dtype": dtype,
    "K": k,
    "overrides": overrides or {},
    "params_per_net": int(n_params),
    "argument_gib": mem.argument_size_in_bytes / gib,
    "output_gib": mem.output_size_in_bytes / gib,
    "temp_gib": mem.temp_size_in_bytes / gib,
    "alias_gib": mem.alias_size_in_bytes / gib,
    "peak_estimate_gib": (
      mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    )
    / gib,
    "flops_per_device": float(cost.get("flops", float("nan"))) if cost else float("nan"),
    "compile_s": seconds,
    **({"peak": peak} if peak else {}),
  }


def peak_of(dump_dir: str, teacher: Teacher, teacher_sh, batch: int, allocated: int) -> dict:
  """`hlo_peak.report` of the dumped step, with the network's full and per-device parameter shapes
  (generator, fake and teacher share the architecture, so the teacher's stand for all three)."""
  hlo, live = hlo_peak.dump_files(dump_dir)
  leaves, shardings = jax.tree.leaves(teacher.params), jax.tree.leaves(teacher_sh)
  full = [tuple(x.shape) for x in leaves]
  shard = [tuple(sh.shard_shape(x.shape)) for x, sh in zip(leaves, shardings, strict=True)]
  with open(hlo) as f, open(live) as g:
    rep = hlo_peak.report(f.read(), g.read(), full, shard, batch, allocated)
  # The 60 largest, and every buffer of 64 KiB or more that is not an activation (weights, their shards and
  # gradients: what differs between meshes); the totals cover all.
  rep["buffers"] = [
    b for i, b in enumerate(rep["buffers"]) if i < 60 or (b["kind"] != "activation" and b["bytes"] >= 2**16)
  ]
  return rep


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--cases", default="in64", help=f"comma-separated, of {sorted(CASES)}")
  ap.add_argument("--devices", default="1,8,64")
  ap.add_argument("--remat", default="", help="comma-separated remat modes; empty: each case's own")
  ap.add_argument("--per_device_batch", type=int, default=0, help="0: each case's own")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--out", default="benchmarks/results/memory.json")
  ap.add_argument("--where", action="store_true", help="also write what is alive at the peak to --out's _peak.md")
  ap.add_argument("--overrides", default="{}", help='JSON {config key: value}, e.g. {"keep_generator_pass": false}')
  args = ap.parse_args()
  rows = []
  for case in args.cases.split(","):
    config_file, spec, batch, remats, extra = CASES[case]
    extra = {**extra, **json.loads(args.overrides)}
    batch = args.per_device_batch or batch
    for n in [int(d) for d in args.devices.split(",")]:
      if n > jax.device_count():
        print(f"skip {n} devices: only {jax.device_count()} available")
        continue
      for remat in (args.remat or remats).split(","):
        r = compile_step(config_file, spec, n, batch, remat, args.dtype, args.k, where=args.where, overrides=extra)
        r["case"] = case
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "peak"}), flush=True)
        write(args, rows)  # after every row: a long run stopped part-way keeps its rows
  print(markdown_table(rows))


def write(args, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    archs = {c: CASES[c][1] for c in args.cases.split(",")}
    json.dump({"archs": archs, "backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, f, indent=2)
  with open(args.out.replace(".json", ".md"), "w") as f:
    f.write(
      f"{args.dtype} compute, K = {args.k}, backend {jax.default_backend()} (fake devices), JAX {jax.__version__}; "
      f"overrides {args.overrides}\n\n{markdown_table(rows)}\n"
    )
  if args.where:
    sections = [
      f"## {r['case']}: {r['devices']} devices (data {r['mesh']['data']} x fsdp {r['mesh']['fsdp']}), "
      f"remat {r['remat']}\n\n" + hlo_peak.markdown(r["peak"])
      for r in rows
    ]
    with open(args.out.replace(".json", "_peak.md"), "w") as f:
      f.write(f"What is alive at the memory peak, {args.dtype}, K = {args.k} (benchmarks/hlo_peak.py)\n\n")
      f.write("\n".join(sections))


def markdown_table(rows: list[dict]) -> str:
  lines = [
    "| case | params / net | devices | mesh (data x fsdp) | batch / device | remat | args GiB | temp GiB "
    "| peak GiB | TFLOP/device | fits (HBM >= peak) | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    m = r["mesh"]
    lines.append(
      f"| {r['case']} | {r['params_per_net'] / 1e6:.1f}M | {r['devices']} | {m['data']} x {m['fsdp']} | "
      f"{r['global_batch'] // r['devices']} | {r['remat']} | {r['argument_gib']:.2f} | {r['temp_gib']:.2f} | "
      f"{r['peak_estimate_gib']:.2f} | {r['flops_per_device'] / 1e12:.2f} | {fits(r['peak_estimate_gib'])} | "
      f"{r['compile_s']:.0f} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  main()

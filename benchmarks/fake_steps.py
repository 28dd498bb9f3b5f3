"""Cost of several fake-denoiser updates per generator step: unrolled against scanned.

Times the digits train step (`configs/digits.py`, the shipped teacher, batch 32) for
`fake.steps_per_gen_step` S in `--steps_list`, with the update loop traced as a trace-time
loop (`fake.loop=unroll`, what "auto" picks up to 8) and as a `lax.scan`. The rounds are
interleaved (every variant once per round, `--rounds` rounds, median kept), so a shared
machine's drifting load hits all of them alike. Reported per variant: seconds per step and
the marginal seconds per extra fake update, `(t(S) - t(1)) / (S - 1)`, next to the cost
of one fake update measured alone (a generator forward + a DSM forward/backward).

  python benchmarks/fake_steps.py --out benchmarks/results/fake_steps.json

A per-pass-efficient loop has marginal cost ~ the lone update; XLA:CPU's scanned form
was 3-4x that (docs/scaling.md).
"""

from __future__ import annotations

import argparse
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

from configs.digits import get_config  # noqa: E402
from emd_jax.diffusion import dsm_loss_at  # noqa: E402
from emd_jax.distill import methods  # noqa: E402
from emd_jax.distill.state import create_state  # noqa: E402
from emd_jax.jobs import distill as train  # noqa: E402
from emd_jax.runtime import parallel  # noqa: E402


def build(method: str, fake_steps: int, loop: str, batch: int):
  c = get_config()
  c.method = method
  c.batch_size = batch
  c.fake.steps_per_gen_step = fake_steps
  c.fake.loop = loop
  methods.resolve(c)
  setup = train.build_setup(c)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  key = jax.random.PRNGKey(0)
  step, state_sh, teacher_sh = train.sharded_step(setup, mesh, train.abstract_state(setup, key))
  state = jax.device_put(create_state(key, setup.teacher.params, setup.tx_gen, setup.tx_fake), state_sh)
  tparams = jax.device_put(setup.teacher.params, teacher_sh)
  holder = {"state": state}

  def run():
    holder["state"], m = step(holder["state"], tparams)
    jax.block_until_ready(m)

  run()  # compile
  run()
  return run, setup


def time_once(fn, n: int) -> float:
  t0 = time.perf_counter()
  for _ in range(n):
    fn()
  return (time.perf_counter() - t0) / n


def lone_update_seconds(setup, batch: int, n: int) -> float:
  """One fake update's network work alone: generator forward + DSM forward/backward."""
  apply, p = setup.net_apply, setup.teacher.params
  z = 2.5 * jax.random.normal(jax.random.PRNGKey(1), (batch, *setup.teacher.data_shape))
  sigma = jnp.full((batch,), 0.5)

  @jax.jit
  def update(pp, zz):
    x = apply(pp, zz, jnp.full((batch,), 2.5), None)
    return jax.grad(lambda q: jnp.mean(dsm_loss_at(lambda a, s, lab: apply(q, a, s, None), x, sigma, x, None)))(pp)

  jax.block_until_ready(update(p, z))
  return time_once(lambda: jax.block_until_ready(update(p, z)), n)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--method", default="di", help="a cheap M-step isolates the fake updates' cost")
  ap.add_argument("--steps_list", default="1,2,4")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--per_round", type=int, default=3, help="train steps timed per variant per round")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fake_steps.json"))
  args = ap.parse_args()
  counts = [int(s) for s in args.steps_list.split(",")]
  variants = {(1, "unroll"): None}
  for s in counts:
    if s > 1:
      variants[(s, "unroll")] = variants[(s, "scan")] = None
  setup = None
  for key in variants:
    variants[key], setup = build(args.method, key[0], key[1], args.batch)
  times = {key: [] for key in variants}
  lone = []
  for _ in range(args.rounds):
    for key, fn in variants.items():
      times[key].append(time_once(fn, args.per_round))
    lone.append(lone_update_seconds(setup, args.batch, args.per_round))
  base = float(np.median(times[(1, "unroll")]))
  rows = []
  for (s, loop), ts in times.items():
    t = float(np.median(ts))
    rows.append(
      {
        "fake_steps": s,
        "loop": loop,
        "step_s": t,
        "step_s_all_rounds": ts,
        "marginal_s_per_extra_update": (t - base) / (s - 1) if s > 1 else None,
      }
    )
  result = {
    "method": args.method,
    "batch": args.batch,
    "lone_update_s": float(np.median(lone)),
    "rows": rows,
    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.default_backend()}",
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"lone fake update: {result['lone_update_s']:.3f} s")
  for r in rows:
    extra = "" if r["marginal_s_per_extra_update"] is None else f", +{r['marginal_s_per_extra_update']:.3f} s/extra"
    print(f"S={r['fake_steps']} {r['loop']}: {r['step_s']:.3f} s/step{extra}")


if __name__ == "__main__":
  main()

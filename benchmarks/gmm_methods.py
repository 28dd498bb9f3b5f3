"""Every distillation method on the default GMM teacher, same wall-clock budget each.

For each preset of `emd_jax.distill.methods.PRESETS` (ALGORITHMS.md section 6):

  1. timing probes, all methods back to back before any training: the jitted
     train step of each method, timed for `--probe_seconds` after compilation
     (random student weights: the rate does not depend on their values);
  2. `total_steps = seconds * rate` (or `--steps` for a fixed count), then
     `emd_jax.jobs.distill.train_and_evaluate(config, WORKDIR/<method>)`: the real
     run, surrogate fit included, from the default `configs/gmm.py`;
  3. the export is reloaded with `emd_jax.formats.generator_export.load_sampler` and scored with
     `emd_jax.evaluators.gmm.gmm_metrics` on `--num_samples` samples (the same
     latents for every method).

Two reference rows come first: the teacher's own 18-step EDM Heun samples
(`emd_jax.sample.sample_teacher`, 35 NFE) and exact mixture samples (the
sampling floor of every metric at this sample size).

  python benchmarks/gmm_methods.py --seconds 300
  python benchmarks/gmm_methods.py --methods emd_sim,di --steps 2000 --overwrite

Writes `--out`.md (a markdown table) and `--out`.json (rows + settings).
CPU timings depend on what else runs on the machine: the table reports the
realised steps/s of each training run next to the probe's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.gmm import get_config  # noqa: E402
from emd_jax.config.validation import validate_distill  # noqa: E402
from emd_jax.distill.methods import PRESETS  # noqa: E402
from emd_jax.distill.state import create_state  # noqa: E402
from emd_jax.distill.step import make_train_step  # noqa: E402
from emd_jax.evaluators.gmm import gmm_metrics  # noqa: E402
from emd_jax.formats.generator_export import load_sampler  # noqa: E402
from emd_jax.jobs import distill as train_lib  # noqa: E402
from emd_jax.sample import sample_teacher  # noqa: E402
from emd_jax.teachers import gmm  # noqa: E402

COLUMNS = (
  ("method", "method", "{}"),
  ("steps", "steps", "{}"),
  ("steps/s", "steps_per_sec", "{:.1f}"),
  ("probe steps/s", "probe_steps_per_sec", "{:.1f}"),
  ("mode-mass TV", "mode_mass_tv", "{:.4f}"),
  ("dropped", "dropped_modes", "{:g}"),
  ("off-mode", "off_mode_fraction", "{:.4f}"),
  ("basin spread", "basin_spread_ratio", "{:.3f}"),
  ("inside", "inside_fraction", "{:.3f}"),
  ("core spread", "spread_ratio", "{:.3f}"),
  ("SW-1", "sliced_wasserstein", "{:.4f}"),
  ("log p", "mean_log_prob", "{:.3f}"),
  ("skipped", "nonfinite_steps", "{}"),
)


def method_config(method: str, seed: int, config_arg: str = ""):
  """The default GMM config with `method` selected (presets fill the rest)."""
  config = get_config(config_arg)
  config.method = method
  config.seed = seed
  return config


def probe_rate(config, seconds: float, min_steps: int = 20) -> float:
  """Train steps per second of `config`'s method, measured after compilation.

  Uses freshly initialised (untrained) student weights: the cost of a step does
  not depend on their values, and the probe must not spend time on a surrogate.
  """
  config = copy_config(config)
  validate_distill(config)
  setup = train_lib.build_setup(config)
  x = jnp.zeros((1, *setup.teacher.data_shape))
  params = setup.module.init(jax.random.PRNGKey(0), x, jnp.ones((1,)), None)["params"]
  state = create_state(jax.random.PRNGKey(1), params, setup.tx_gen, setup.tx_fake)
  step = jax.jit(
    make_train_step(setup.step_cfg, setup.net_apply, setup.teacher.apply, setup.tx_gen, setup.tx_fake),
    donate_argnums=0,
  )
  teacher_params = setup.teacher.params
  state, m = step(state, teacher_params)  # compile
  jax.block_until_ready(m)
  n, t0 = 0, time.perf_counter()
  while n < min_steps or time.perf_counter() - t0 < seconds:
    state, m = step(state, teacher_params)
    n += 1
    if n % 10 == 0:
      jax.block_until_ready(m)
  jax.block_until_ready(m)
  return n / (time.perf_counter() - t0)


def copy_config(config):
  import ml_collections

  return ml_collections.ConfigDict(config.to_dict())


def score(samples: np.ndarray, teacher_params: dict, seed: int) -> dict:
  """The exact GMM figures, without the `gmm/` prefix and per-mode masses."""
  m = gmm_metrics(np.asarray(samples), teacher_params, seed=seed)
  out = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("gmm/")}
  masses = {int(re.sub(r"\D", "", k)): v for k, v in m.items() if "mass_mode" in k or "mass/mode" in k}
  out["mode_mass"] = [masses[i] for i in sorted(masses)]
  return out


def score_sets(sample_fn, n_sets: int, teacher_params: dict, seed: int = 0) -> dict:
  """Every exact figure as the mean over `n_sets` sample sets, with `<key>_std` beside it.

  `sample_fn(key)` draws one set; set i uses key `PRNGKey(1000 + seed + i)`. The per-mode
  masses are those of the first set.
  """
  sets = [
    score(np.asarray(sample_fn(jax.random.PRNGKey(1000 + seed + i))), teacher_params, seed + i) for i in range(n_sets)
  ]
  out = {"mode_mass": sets[0]["mode_mass"], "sample_sets": n_sets}
  for k in sets[0]:
    if k == "mode_mass":
      continue
    vals = [float(s[k]) for s in sets]
    out[k], out[f"{k}_std"] = float(np.mean(vals)), float(np.std(vals))
  return out


def train_method(config, workdir: str) -> tuple[dict, float]:
  """Runs `train_and_evaluate`; returns its result and the realised steps/s.

  The rate comes from the loop's own progress lines ("step N/M | R steps/s"),
  leaving out the first interval (it holds the compilation): the time of the
  step loop without set-up, surrogate fit or compilation.
  """
  buf = io.StringIO()
  with contextlib.redirect_stdout(_Tee(buf, sys.stdout)):
    result = train_lib.train_and_evaluate(config, workdir)
  found = [(int(a), float(b)) for a, b in re.findall(r"step (\d+)/\d+ .*?\| ([0-9.]+) steps/s", buf.getvalue())]
  steps = seconds = 0.0
  for (prev, _), (cur, rate) in zip(found, found[1:], strict=False):
    steps += cur - prev
    seconds += (cur - prev) / max(rate, 1e-9)
  return result, (steps / seconds if seconds else float("nan"))


class _Tee(io.TextIOBase):
  def __init__(self, *streams):
    self.streams = streams

  def write(self, s: str) -> int:
    for st in self.streams:
      st.write(s)
    return len(s)

  def flush(self) -> None:
    for st in self.streams:
      st.flush()


def reference_rows(config, num: int, seed: int, n_sets: int = 1) -> list[dict]:
  """Teacher Heun (18 steps, 35 NFE) and exact samples: the rows to beat."""
  teacher = train_lib.teachers.from_config(config.teacher)
  params = jax.device_get(teacher.params)
  rows = []
  t0 = time.perf_counter()
  heun = lambda k: sample_teacher(teacher, k, num, num_steps=18)[0]  # noqa: E731
  rows.append(
    {
      "method": "teacher Heun-18 (35 NFE)",
      **score_sets(heun, n_sets, params, seed),
      "seconds": time.perf_counter() - t0,
    }
  )
  exact = lambda k: gmm.sample(teacher.params, k, num)[0]  # noqa: E731
  rows.append({"method": "exact samples (floor)", **score_sets(exact, n_sets, params, seed)})
  return rows


def run_benchmark(args) -> dict:
  methods = [m.strip() for m in args.methods.split(",") if m.strip()] or list(PRESETS)
  unknown = [m for m in methods if m not in PRESETS]
  if unknown:
    raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(PRESETS)}")
  base = method_config(methods[0], args.seed, args.config)
  rows = reference_rows(base, args.num_samples, args.seed, args.sample_sets)
  teacher_params = jax.device_get(train_lib.teachers.from_config(base.teacher).params)
  result = {
    "rows": rows,
    "settings": {
      "methods": methods,
      "seed": args.seed,
      "seconds": None if args.steps else args.seconds,
      "steps": args.steps or None,
      "num_samples": args.num_samples,
      "sample_sets": args.sample_sets,
      "config_arg": args.config,
      "config": base.to_dict(),
      "presets": {m: list(PRESETS[m][:4]) for m in methods},
      "jax": jax.__version__,
      "devices": [str(d) for d in jax.devices()],
      "cpu_count": os.cpu_count(),
      "machine": platform.platform(),
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    },
  }
  for method in methods:
    workdir = os.path.join(args.workdir, method)
    if os.path.exists(workdir) and not args.overwrite:
      raise SystemExit(f"{workdir} exists (it would be resumed): pass --overwrite or another --workdir")
  # All probes first, back to back: on a shared machine the load drifts over a
  # long benchmark, and adjacent probes keep the methods' relative costs honest.
  rates = {}
  if not args.steps:
    for method in methods:
      rates[method] = probe_rate(method_config(method, args.seed, args.config), args.probe_seconds)
      print(f"[gmm_methods] probe {method}: {rates[method]:.1f} steps/s", flush=True)
  for method in methods:
    config = method_config(method, args.seed, args.config)
    workdir = os.path.join(args.workdir, method)
    if os.path.exists(workdir):
      shutil.rmtree(workdir)
    rate = rates.get(method)
    steps = args.steps or max(int(args.seconds * rate), 1)
    config.total_steps = steps
    config.eval_every = steps  # one in-loop evaluation, at the end
    config.checkpoint_every = steps
    config.log_every = max(min(config.log_every, steps // 10), 1)
    print(f"[gmm_methods] {method}: {steps} steps", flush=True)
    t0 = time.perf_counter()
    try:
      trained, realised = train_method(config, workdir)
    except train_lib.TrainingError as e:  # e.g. repeated non-finite steps: a row, not a crash
      row = {"method": method, "steps": steps, "probe_steps_per_sec": rate, "error": str(e)}
      print(f"[gmm_methods] {method} failed: {e}", flush=True)
      rows.append(row)
      write_outputs(result, args.out)
      continue
    wall = time.perf_counter() - t0
    sampler = load_sampler(os.path.join(workdir, "export"))
    state = trained["state"]
    row = {
      "method": method,
      "steps": int(state.step),
      "steps_per_sec": realised,
      "probe_steps_per_sec": rate,
      "wall_seconds": wall,
      "nonfinite_steps": int(state.nonfinite_count),
      **score_sets(lambda k, s=sampler: s.sample(k, args.num_samples), args.sample_sets, teacher_params, args.seed),
    }
    print(f"[gmm_methods] {json.dumps(row)}", flush=True)
    rows.append(row)
    write_outputs(result, args.out)  # partial results survive an interrupted run
  return result


def markdown(result: dict) -> str:
  s = result["settings"]
  budget = f"{s['steps']} steps each" if s["steps"] else f"{s['seconds']:g} s of training each"
  lines = [
    "# GMM benchmark: every method, same budget",
    "",
    f"Default `configs/gmm.py`, seed {s['seed']}, {budget}, "
    f"{s.get('sample_sets', 1)} sets of {s['num_samples']} samples per row (mean +- std over the sets), "
    f"{s['cpu_count']} CPUs ({s['date']}).",
    "",
    "| " + " | ".join(c[0] for c in COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  for row in result["rows"]:
    cells = []
    for _, key, fmt in COLUMNS:
      v = row.get(key)
      cell = "" if v is None else fmt.format(v)
      if v is not None and row.get(f"{key}_std") and s.get("sample_sets", 1) > 1:
        cell += " +- " + fmt.format(row[f"{key}_std"])
      cells.append(cell)
    if "error" in row:
      cells[4] = f"failed: {row['error'][:80]}"
    lines.append("| " + " | ".join(cells) + " |")
  lines += [
    "",
    "TV: total variation of nearest-mode masses vs the true weights; dropped: modes "
    "under 10% of their weight; off-mode: fraction farther than 3.7 std from every mean "
    "(exact samples: 0.001); basin spread: RMS distance to the nearest mean over its whole basin "
    "(half the distance to the next mode) / true std; inside: fraction within 4 std of a mean; core "
    "spread: the same RMS within 4 std (1 is exact); SW-1: sliced Wasserstein to exact samples; "
    "log p: mean exact teacher log-density; skipped: non-finite steps. "
    "steps/s: realised in the training loop (shared CPUs: compare within a run only).",
    "",
  ]
  return "\n".join(lines)


def write_outputs(result: dict, out: str) -> None:
  """`out`.json (rows + settings) and `out`.md (the table)."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2, default=str)
  with open(out + ".md", "w") as f:
    f.write(markdown(result))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default="", help="comma list of presets (default: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--seconds", type=float, default=300.0, help="training budget per method")
  p.add_argument("--steps", type=int, default=0, help="fixed step count (overrides --seconds)")
  p.add_argument("--probe_seconds", type=float, default=10.0)
  p.add_argument("--num_samples", type=int, default=20000)
  p.add_argument("--sample_sets", type=int, default=3, help="independent sample sets per row (mean +- std)")
  p.add_argument("--workdir", default="runs/bench_gmm")
  p.add_argument("--out", default="benchmarks/results/gmm_methods")
  p.add_argument("--config", default="", help="configs/gmm.py variant ('' or 'tiny')")
  p.add_argument("--overwrite", action="store_true", help="delete existing method workdirs")
  args = p.parse_args(argv)
  result = run_benchmark(args)
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()

"""Checkpoint sweep: score every saved checkpoint and every EMA track of a distillation run.

  python -m emd_jax.evaluate --workdir runs/gmm
  python -m emd_jax.evaluate --workdir runs/gmm --ema ema,ema9999 --protocol edm --out runs/gmm/sweep_edm

Reads the run's config from its checkpoints (`W/checkpoints`, the `meta` item), builds the run's
evaluator (`jobs.distill.build_setup`: the same one training uses) and, without retraining, scores
each (checkpoint step, track) pair: `raw` (the generator itself), `ema` (the default EMA) and every
`generator.ema_tracks` entry (default: all of them). It writes to `--out` (default `W/sweep`):

  sweep.jsonl  one JSON row per (step, track, protocol, seeds): the aggregated `metrics` and the
               `per_seed` values; appended as each row is done, so a killed sweep reruns only the
               missing rows (rows already there are skipped)
  sweep.md     the table of this protocol's rows (the `*_detail/*` figures are in the jsonl only)
  sweep.png    each figure against the step, one line per track (drawn with pillow)

Seeds: seed block `i` draws its inputs from `fold_in(PRNGKey(--seed), i)`, the same for every step
and track, so rows differ only by the parameters. `--protocol edm` reports each figure's minimum
over the seed blocks (EDM's FID protocol: the best of three; meant for lower-is-better figures such
as FD/FID); `--protocol sid` its mean and standard deviation (`<figure>_std`) over the trials (SiD's).
Both default to 3 seeds; without `--protocol` one seed is scored as is.

Bad input (no workdir, no checkpoints, an unknown track) is one `error: ...` line, exit status 2.
From Python: `sweep(workdir, ...)` returns the rows; `open_run` / `restore_state` load a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import numpy as np

from emd_jax.errors import UserInputError

PROTOCOLS = ("none", "edm", "sid")
DEFAULT_PROTOCOL_SEEDS = 3


@dataclasses.dataclass
class Run:
  """A distillation run read from its workdir: config, setup (evaluator built), checkpoints."""

  workdir: str
  config: object
  setup: object
  checkpointer: object
  steps: list[int]
  abstract: object  # the state's ShapeDtypeStructs on the first local device

  @property
  def tracks(self) -> tuple[str, ...]:
    """Every generator this run can be scored or exported as: `raw`, `ema`, then the configured tracks."""
    from emd_jax.jobs import distill

    return ("raw", "ema", *distill.track_names(self.setup))


def open_run(workdir: str) -> Run:
  """Reads `workdir`'s config (from its newest checkpoint's meta) and builds its setup; checks its checkpoints."""
  import ml_collections

  from emd_jax.jobs import distill
  from emd_jax.runtime import checkpoint as ckpt_lib
  from emd_jax.runtime.loop import fingerprint_diff

  if not workdir or not os.path.isdir(workdir):
    raise UserInputError(f"--workdir {workdir!r}: no such run directory")
  ck_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ck_dir):
    raise UserInputError(f"--workdir {workdir}: has no checkpoints ({ck_dir} does not exist)")
  ck = ckpt_lib.Checkpointer(ck_dir, read_only=True)
  steps = ck.all_steps()
  if not steps:
    ck.close()
    raise UserInputError(f"--workdir {workdir}: {ck_dir} holds no saved checkpoint")
  try:
    meta = ck.restore_meta(steps[-1])
  except ckpt_lib.CorruptCheckpointError as e:
    ck.close()
    raise UserInputError(f"--workdir {workdir}: {e}") from None
  if not meta.get("config"):
    ck.close()
    raise UserInputError(f"--workdir {workdir}: checkpoint step {steps[-1]} records no config")
  config = ml_collections.ConfigDict(meta["config"])
  if config.get("job", "distill") != "distill":
    ck.close()
    raise UserInputError(f"--workdir {workdir}: a {config.job!r} run; the sweep scores distillation runs")
  setup = distill.build_setup(config, measure_correction=False)  # the sweep never calls the teacher
  diff = fingerprint_diff(meta.get("fingerprint"), distill.config_fingerprint(config, setup))
  if diff:
    ck.close()
    raise UserInputError(f"--workdir {workdir}: its checkpoints do not match its own config ({'; '.join(diff)})")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = distill.abstract_state(setup, jax.random.PRNGKey(0))  # shapes only: the key is restored
  abstract = ckpt_lib.abstract_like(abstract, jax.tree.map(lambda _: device, abstract))
  return Run(workdir, config, setup, ck, steps, abstract)


def restore_state(run: Run, step: int):
  """The distillation state saved at `step` (checksums verified); a bad step is a `UserInputError`."""
  from emd_jax.runtime import checkpoint as ckpt_lib

  if step not in run.steps:
    raise UserInputError(f"--step {step}: no checkpoint at that step in {run.workdir}; saved steps: {run.steps}")
  try:
    state, _ = run.checkpointer.restore(step, run.abstract)
  except ckpt_lib.CorruptCheckpointError as e:
    raise UserInputError(f"--workdir {run.workdir}: {e}") from None
  return state


def export_track(workdir: str, name: str = "ema", step: int | None = None, directory: str | None = None) -> str:
  """Writes the export of track `name` at checkpoint `step` (default: the newest); returns its directory.

  Default directory: `W/exports/<name>_step<step>` (the export after training, `W/export`, is left alone).
  """
  from emd_jax.jobs import distill

  run = open_run(workdir)
  try:
    (name,) = check_tracks(run, [name])
    step = run.steps[-1] if step is None else step
    state = restore_state(run, step)
    directory = directory or os.path.join(workdir, "exports", f"{name}_step{step}")
    return distill.export(run.config, run.setup, state, workdir, ema=name, directory=directory)
  finally:
    run.checkpointer.close()


def check_tracks(run: Run, names: list[str] | None) -> list[str]:
  """`names` (default: all of the run's tracks), each checked against the run's tracks."""
  if not names:
    return list(run.tracks)
  bad = [n for n in names if n not in run.tracks]
  if bad:
    raise UserInputError(f"--ema {','.join(bad)}: no such EMA track in this run; it has: {', '.join(run.tracks)}")
  if len(set(names)) != len(names):
    raise UserInputError(f"--ema {','.join(names)}: a track is named twice")
  return list(names)


def aggregate(per_seed: dict[str, list[float]], protocol: str) -> dict[str, float]:
  """One figure per metric from its seed values: as is (`none`, one seed), min (`edm`), mean and `_std` (`sid`)."""
  out = {}
  for k, values in per_seed.items():
    v = np.asarray(values, np.float64)
    if protocol == "edm":
      out[k] = float(v.min())
    elif protocol == "sid":
      out[k] = float(v.mean())
      out[f"{k}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    else:
      out[k] = float(v.mean())  # one seed
  return out


def score(run: Run, params, seeds: int, protocol: str, seed: int = 0) -> dict:
  """`{"metrics": aggregated, "per_seed": {metric: [one value per seed block]}}` for generator `params`."""
  from emd_jax.jobs import distill

  per_seed: dict[str, list[float]] = {}
  for i in range(seeds):
    scalars, _ = distill.evaluate(run.config, run.setup, params, jax.random.fold_in(jax.random.PRNGKey(seed), i))
    for k, v in scalars.items():
      per_seed.setdefault(k, []).append(float(v))
  return {"metrics": aggregate(per_seed, protocol), "per_seed": per_seed}


# ----------------------------------------------------------------------------
# The results files.


def _key(row: dict) -> tuple:
  return (int(row["step"]), row["track"], row["protocol"], int(row["seeds"]), int(row.get("seed", 0)))


def read_rows(path: str) -> list[dict]:
  """The complete rows of a sweep's jsonl; a torn last line (a killed write) is dropped from the file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split("\n")
  rows, torn = [], False
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1 and any(ln.strip() for ln in lines[i + 1 :]):
        raise UserInputError(
          f"{path}: line {i + 1} is not JSON; move the file aside to start the sweep afresh"
        ) from None
      torn = True
  if torn or (lines and lines[-1].strip()):  # rewrite without the torn line / with a final newline
    _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
  return rows


def _append_row(path: str, row: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _write_text(path: str, text: str) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _shown(rows: list[dict]) -> list[str]:
  """The metrics of the table and the plot: all but `*_detail/*` and the `_std` companions."""
  keys = sorted({k for r in rows for k in r["metrics"]})
  return [k for k in keys if "_detail/" not in k and not (k.endswith("_std") and k[: -len("_std")] in keys)]


def markdown_table(rows: list[dict]) -> str:
  """A markdown table, one line per (step, track); `sid` rows show `mean ± std`."""
  keys = _shown(rows)
  lines = ["| step | track | " + " | ".join(keys) + " |", "|---:|---|" + "---:|" * len(keys)]
  for r in sorted(rows, key=lambda r: (r["step"], r["track"])):
    m = r["metrics"]
    cells = []
    for k in keys:
      if k not in m:
        cells.append("")
      elif f"{k}_std" in m:
        cells.append(f"{m[k]:.4g} ± {m[f'{k}_std']:.2g}")
      else:
        cells.append(f"{m[k]:.4g}")
    lines.append(f"| {r['step']} | {r['track']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str = "") -> None:
  """Each shown metric against the step (one panel each), one line per track, std bars for `sid` rows."""
  from emd_jax.evaluators import charts, grids

  series: dict[str, dict[str, list[tuple]]] = {}
  for k in _shown(rows):
    for r in rows:
      if k in r["metrics"]:
        pt = (r["step"], float(r["metrics"][k]), float(r["metrics"].get(f"{k}_std", 0.0)))
        series.setdefault(k, {}).setdefault(r["track"], []).append(pt)
  grids.save_png(path, charts.panels(series, title))


def sweep(
  workdir: str,
  tracks: list[str] | None = None,
  seeds: int | None = None,
  protocol: str = "none",
  out: str | None = None,
  seed: int = 0,
  log=print,
) -> list[dict]:
  """Scores every checkpoint of `workdir` for every track in `tracks`; writes and returns this protocol's rows."""
  if protocol not in PROTOCOLS:
    raise UserInputError(f"--protocol {protocol!r}: must be one of {', '.join(PROTOCOLS)}")
  seeds = seeds if seeds is not None else (1 if protocol == "none" else DEFAULT_PROTOCOL_SEEDS)
  if seeds < 1:
    raise UserInputError(f"--seeds: must be >= 1, got {seeds}")
  if protocol == "none" and seeds != 1:
    raise UserInputError(f"--seeds {seeds}: several seeds need --protocol edm (minimum) or sid (mean and std)")
  if out is not None and os.path.exists(out) and not os.path.isdir(out):
    raise UserInputError(f"--out {out}: exists and is not a directory")
  run = open_run(workdir)
  try:
    names = check_tracks(run, tracks)
    if run.setup.evaluator is None:
      raise UserInputError(f"--workdir {workdir}: this run has no evaluator (a vector teacher other than the GMM)")
    out = out or os.path.join(workdir, "sweep")
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "sweep.jsonl")
    done = {_key(r) for r in read_rows(jsonl)}
    for step in run.steps:
      todo = [t for t in names if (step, t, protocol, seeds, seed) not in done]
      if not todo:
        continue
      state = restore_state(run, step)
      from emd_jax.jobs import distill

      for t in todo:
        result = score(run, distill.generator_params(state, t), seeds, protocol, seed)
        row = {"step": step, "track": t, "protocol": protocol, "seeds": seeds, "seed": seed, **result}
        _append_row(jsonl, row)
        done.add(_key(row))
        log(f"step {step} {t}: " + ", ".join(f"{k}={v:.4g}" for k, v in row["metrics"].items() if "_detail/" not in k))
    wanted = {(s, t) for s in run.steps for t in names}
    rows = [
      r
      for r in read_rows(jsonl)
      if (r["protocol"], r["seeds"], r.get("seed", 0)) == (protocol, seeds, seed) and (r["step"], r["track"]) in wanted
    ]
    _write_text(os.path.join(out, "sweep.md"), markdown_table(rows))
    title = f"{os.path.basename(os.path.abspath(workdir))}: protocol {protocol}, {seeds} seed(s)"
    plot(rows, os.path.join(out, "sweep.png"), title)
    log(f"wrote {len(rows)} rows to {out}/sweep.jsonl, sweep.md, sweep.png")
    return rows
  finally:
    run.checkpointer.close()


def main(argv: list[str] | None = None) -> None:
  from emd_jax import cli

  parser = cli.ArgumentParser(prog="emd_jax.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's directory (its checkpoints are in W/checkpoints)")
  parser.add_argument(
    "--ema", help="comma-separated tracks to score (raw, ema, or generator.ema_tracks names); default all"
  )
  parser.add_argument("--seeds", type=int, help="seed blocks per row (default 1; 3 with --protocol)")
  parser.add_argument("--protocol", default="none", help="none | edm (min over seeds) | sid (mean and std)")
  parser.add_argument("--seed", type=int, default=0, help="base seed of the evaluation inputs")
  parser.add_argument("--out", help="output directory (default W/sweep)")
  args = parser.parse_args(argv)
  tracks = [t.strip() for t in args.ema.split(",") if t.strip()] if args.ema else None
  sweep(args.workdir, tracks, args.seeds, args.protocol, args.out, args.seed)


def run_in_process(argv: list[str]) -> int:
  """The command line without a new process (tests); returns the exit code."""
  from emd_jax import cli

  return cli.run_argv(main, ["emd_jax.evaluate", *argv])


def entry() -> None:
  """The command line: bad input is one `error: ...` line and exit status 2 (`--debug`: traceback)."""
  from emd_jax import cli

  raise SystemExit(cli.run_argv(main))


if __name__ == "__main__":
  entry()

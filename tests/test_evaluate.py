"""`python -m emd_jax.evaluate`: the checkpoint x track sweep of a tiny 3-checkpoint GMM run."""

import json
import os

import jax
import numpy as np
import pytest
from helpers import gmm_tiny

from emd_jax import evaluate as sweep_lib
from emd_jax import sample
from emd_jax.evaluators import charts
from emd_jax.jobs import distill as train

TRACKS = ("raw", "ema", "slow")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 3-step run with a checkpoint after every step and one extra track; its final result."""
  workdir = str(tmp_path_factory.mktemp("sweep") / "run")
  c = gmm_tiny(
    total_steps=3,
    checkpoint_every=1,
    max_checkpoints=5,
    eval_every=100,
    method="sim",
    eval_num_samples=1000,
    **{"teacher.surrogate_steps": 10},
  )
  c.generator.ema_tracks = "slow:0.5"
  result = train.train_and_evaluate(c, workdir)
  return workdir, result


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_sweep_rows_resume_table_and_plot(run, tmp_path):
  workdir, result = run
  out = str(tmp_path / "sweep")
  assert sweep_lib.run_in_process(["--workdir", workdir, "--out", out]) == 0
  jsonl = os.path.join(out, "sweep.jsonl")
  rows = _rows(jsonl)
  assert sorted((r["step"], r["track"]) for r in rows) == sorted((s, t) for s in (1, 2, 3) for t in TRACKS)
  by = {(r["step"], r["track"]): r["metrics"] for r in rows}
  # Raw and averaged generators score differently; the rows are computed from the named parameters:
  # the `ema` and `raw` rows of the last step equal the evaluation of the final state's EMA / generator.
  assert by[(3, "raw")] != by[(3, "ema")] and by[(3, "slow")] != by[(3, "ema")]
  c = sweep_lib.open_run(workdir)
  try:
    for track, params in (("ema", result["state"].gen_ema), ("raw", result["state"].gen_params)):
      mine, _ = train.evaluate(c.config, c.setup, params, jax.random.fold_in(jax.random.PRNGKey(0), 0))
      assert by[(3, track)]["gmm/sliced_wasserstein"] == pytest.approx(mine["gmm/sliced_wasserstein"], rel=1e-12)
  finally:
    c.checkpointer.close()
  # Resumable: a rerun after losing the last row computes exactly that row again, the same values.
  with open(jsonl) as f:
    lines = f.read().splitlines(keepends=True)
  with open(jsonl, "w") as f:
    f.writelines(lines[:-1])
    f.write(lines[-1][: len(lines[-1]) // 2])  # and a torn half line, as a kill mid-write leaves
  logged = []
  again = sweep_lib.sweep(workdir, out=out, log=logged.append)
  computed = [line for line in logged if line.startswith("step ")]
  last = json.loads(lines[-1])
  assert computed == [computed[0]] and computed[0].startswith(f"step {last['step']} {last['track']}:")
  assert _rows(jsonl) == rows[:-1] + [last] and len(again) == 9
  # A rerun with everything present computes nothing.
  logged.clear()
  sweep_lib.sweep(workdir, out=out, log=logged.append)
  assert not [line for line in logged if line.startswith("step ")]
  # The table: a header, a rule, one line per (step, track).
  with open(os.path.join(out, "sweep.md")) as f:
    table = f.read().splitlines()
  assert len(table) == 2 + 9 and "gmm/sliced_wasserstein" in table[0] and "detail" not in table[0]
  # The plot is a real PNG image.
  png = os.path.join(out, "sweep.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  from PIL import Image

  img = np.asarray(Image.open(png).convert("RGB"))
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  # one colour per track, each drawn (the first three chart colours)
  for colour in charts.COLOURS[:3]:
    assert np.all(img == np.asarray(colour, np.uint8), axis=-1).sum() > 20, colour


def test_seed_protocols(run, tmp_path):
  workdir, _ = run
  assert sweep_lib.aggregate({"a": [3.0, 1.0, 2.0]}, "edm") == {"a": 1.0}
  assert sweep_lib.aggregate({"a": [3.0, 1.0, 2.0]}, "sid") == {"a": 2.0, "a_std": 1.0}
  out = str(tmp_path / "edm")
  assert (
    sweep_lib.run_in_process(["--workdir", workdir, "--ema", "ema", "--protocol", "edm", "--seeds", "2", "--out", out])
    == 0
  )
  rows = _rows(os.path.join(out, "sweep.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3] and all(r["track"] == "ema" and r["seeds"] == 2 for r in rows)
  for r in rows:
    sw = r["per_seed"]["gmm/sliced_wasserstein"]
    assert len(sw) == 2 and sw[0] != sw[1]  # the seed blocks draw different inputs
    assert r["metrics"]["gmm/sliced_wasserstein"] == min(sw)
  # SiD's protocol in the same directory: new rows next to the edm ones, mean and std of its trials.
  rows_sid = sweep_lib.sweep(workdir, ["ema"], 2, "sid", out, log=lambda _: None)
  assert len(rows_sid) == 3 and len(_rows(os.path.join(out, "sweep.jsonl"))) == 6
  for r in rows_sid:
    sw = r["per_seed"]["gmm/sliced_wasserstein"]
    assert r["metrics"]["gmm/sliced_wasserstein"] == pytest.approx(np.mean(sw))
    assert r["metrics"]["gmm/sliced_wasserstein_std"] == pytest.approx(np.std(sw, ddof=1))


def test_bad_inputs_are_one_error_line(run, tmp_path, capsys):
  workdir, _ = run
  cases = [
    (
      ["--workdir", workdir, "--ema", "ema,unknown"],
      "--ema unknown: no such EMA track in this run; it has: raw, ema, slow",
    ),
    (["--workdir", str(tmp_path / "nope")], "no such run directory"),
    (["--workdir", str(tmp_path)], "has no checkpoints"),
    (["--workdir", workdir, "--protocol", "best"], "--protocol 'best'"),
    (["--workdir", workdir, "--seeds", "3"], "--protocol"),
  ]
  for argv, words in cases:
    capsys.readouterr()
    assert sweep_lib.run_in_process(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
  assert not os.path.exists(os.path.join(workdir, "sweep"))  # nothing was written


def test_sample_a_named_track_from_a_checkpoint(run, tmp_path, capsys):
  workdir, result = run
  out = str(tmp_path / "s.npz")
  assert sample.run_in_process(["--workdir", workdir, "--ema", "slow", "--step", "2", "--num", "16", "--out", out]) == 0
  assert np.load(out)["samples"].shape == (16, 2)
  from emd_jax.formats.generator_export import read_export

  meta, params = read_export(os.path.join(workdir, "exports", "slow_step2"))
  assert meta["ema"] == "slow" and meta["step"] == 2
  capsys.readouterr()
  assert sample.run_in_process(["--workdir", workdir, "--ema", "fast", "--out", out]) == 2
  assert "no such EMA track" in capsys.readouterr().err

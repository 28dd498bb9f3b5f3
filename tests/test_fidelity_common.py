"""benchmarks/fidelity_common.write_level_table: the per-level diagnostics' results files."""

import json

import numpy as np

from benchmarks.fidelity_common import write_level_table


def test_level_table_has_one_row_per_dict_with_lead_columns_first(tmp_path, capsys):
  rows = [
    {"force": 0.123456, "sigma": 0.5, "step": 1300, "cos": -0.25},
    {"force": 1.5e-5, "sigma": 80.0, "step": 1300, "cos": 0.75},
  ]
  out = str(tmp_path / "sub" / "res")
  write_level_table(out, ["# title", ""], [("step", "checkpoint"), ("sigma", "sigma")], rows, ".3g", {"rows": rows})
  lines = open(out + ".md").read().splitlines()
  assert lines[:2] == ["# title", ""]
  # The lead columns come first, in the given order and under their titles; the rest in the rows' key order.
  assert lines[2] == "| checkpoint | sigma | force | cos |"
  assert lines[3] == "|---|---|---|---|"
  assert lines[4] == "| 1300 | 0.5 | 0.123 | -0.25 |"
  assert lines[5] == "| 1300 | 80 | 1.5e-05 | 0.75 |"
  assert len(lines) == 6
  assert json.load(open(out + ".json")) == {"rows": rows}
  assert "| 1300 | 80 | 1.5e-05 | 0.75 |" in capsys.readouterr().out


def test_level_table_prints_strings_as_they_are(tmp_path):
  rows = [{"model": "teacher (Heun 18 steps)", "sets": 2, "fd": np.float32(0.30799)}]
  out = str(tmp_path / "res")
  write_level_table(out, [], [("model", "model"), ("sets", "sets")], rows, ".3g", {})
  assert open(out + ".md").read().splitlines()[2] == "| teacher (Heun 18 steps) | 2 | 0.308 |"

"""benchmarks/compare_rows.py: the row-by-row check that a code change leaves a benchmark's figures alone."""

import json

from benchmarks import compare_rows


def _write(path, rows, jsonl: bool):
  with open(path, "w") as f:
    if jsonl:
      f.write("".join(json.dumps(r) + "\n" for r in rows))
    else:
      json.dump({"settings": {}, "rows": rows}, f)


def test_identical_rows_pass_and_any_changed_number_fails(tmp_path, capsys):
  row = {"name": "a", "seconds": 12.0, "ema": {"fd": 1.5, "sets": [1.0, 2.0]}, "trajectory": [{"step": 1, "fd": 3.0}]}
  other = {"name": "b", "ema": {"fd": 9.0}}
  _write(tmp_path / "old.jsonl", [other, row], jsonl=True)
  # The same figures, another wall-clock time, in a .json `rows` file under the `model` key.
  _write(tmp_path / "same.json", [{**row, "name": None, "model": "a", "seconds": 99.0}], jsonl=False)
  assert compare_rows.main([f"{tmp_path}/old.jsonl:a", f"{tmp_path}/same.json:a"]) == 0
  assert "5 of 5 compared values identical" in capsys.readouterr().out

  # One nested list element moved by one ulp-sized step is reported, with its dotted key.
  changed = json.loads(json.dumps(row))
  changed["ema"]["sets"][1] = 2.0000000000000004
  changed["extra"] = 1
  _write(tmp_path / "new.jsonl", [changed], jsonl=True)
  assert compare_rows.main([f"{tmp_path}/old.jsonl:a", f"{tmp_path}/new.jsonl:a"]) == 1
  out = capsys.readouterr().out
  assert "4 of 5 compared values identical" in out
  assert "differs: ema.sets.1: 2.0 -> 2.0000000000000004" in out
  assert "only in new: extra" in out


def test_missing_row_names_the_rows_there(tmp_path):
  _write(tmp_path / "r.jsonl", [{"name": "x"}, {"name": "y"}], jsonl=True)
  try:
    compare_rows.load_row(f"{tmp_path}/r.jsonl:z")
  except SystemExit as e:
    assert "no row named 'z'" in str(e) and "x, y" in str(e)
  else:
    raise AssertionError("a missing row must be an error")

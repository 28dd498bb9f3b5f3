"""Compare two benchmark result rows number by number: did a code change alter what training computes?

The fidelity benchmarks (`gmm_fidelity.py`, `digits_fidelity.py`, `digits.py`) write one JSON row per
run. Rerun a committed row on the current code and compare the two:

  python benchmarks/compare_rows.py OLD.jsonl:NAME NEW.jsonl:NAME [--ignore seconds,name]

`FILE:NAME` picks the row whose `name` (or `model`) is NAME from a .jsonl file (one row per line) or a
.json file with a `rows` list. Every number of the two rows (nested dicts and lists flattened to dotted
keys) is compared exactly; the report says how many are bit-identical, lists the rest with their relative
difference, and lists keys present on one side only. Exit status 0 when every compared number is
identical, 1 otherwise. Wall-clock fields (`seconds`, `train_seconds`, `sample_ms`, `sample_seconds`)
are ignored by default.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

WALL_CLOCK = ("seconds", "train_seconds", "sample_ms", "sample_seconds")


def load_row(spec: str) -> dict:
  """The row NAME of `FILE:NAME` (the last one when a file holds several rows of that name)."""
  path, sep, name = spec.rpartition(":")
  if not sep or not path:
    raise SystemExit(f"{spec!r}: expected FILE:NAME")
  with open(path) as f:
    text = f.read()
  if path.endswith(".jsonl"):
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  else:
    rows = json.loads(text)["rows"]
  found = [r for r in rows if name in (r.get("name"), r.get("model"))]
  if not found:
    labels = sorted({str(r.get("name", r.get("model"))) for r in rows})
    raise SystemExit(f"{path}: no row named {name!r}; rows: {', '.join(labels)}")
  return found[-1]


def flatten(value, prefix: str = "") -> dict[str, object]:
  """Nested dicts and lists as {dotted key: leaf}."""
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  if isinstance(value, list):
    out = {}
    for i, v in enumerate(value):
      out.update(flatten(v, f"{prefix}{i}."))
    return out
  return {prefix[:-1]: value}


def compare(old: dict, new: dict, ignore: tuple[str, ...]) -> dict:
  """{'same': n, 'differ': [(key, old, new, rel)], 'only_old': [...], 'only_new': [...]} over numbers."""

  def keep(key: str) -> bool:
    return not any(key == i or key.endswith("." + i) or key.startswith(i + ".") for i in ignore)

  a = {k: v for k, v in flatten(old).items() if keep(k)}
  b = {k: v for k, v in flatten(new).items() if keep(k)}
  report = {"same": 0, "differ": [], "only_old": sorted(set(a) - set(b)), "only_new": sorted(set(b) - set(a))}
  for key in sorted(set(a) & set(b)):
    x, y = a[key], b[key]
    if x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
      report["same"] += 1
      continue
    rel = None
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
      rel = abs(x - y) / max(abs(x), abs(y), 1e-30)
    report["differ"].append((key, x, y, rel))
  return report


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("old", help="FILE:NAME")
  ap.add_argument("new", help="FILE:NAME")
  ap.add_argument("--ignore", default="name,model", help="comma-separated keys left out, besides wall-clock fields")
  args = ap.parse_args(argv)
  ignore = tuple(filter(None, args.ignore.split(","))) + WALL_CLOCK
  report = compare(load_row(args.old), load_row(args.new), ignore)
  n = report["same"] + len(report["differ"])
  print(f"{report['same']} of {n} compared values identical ({args.old} vs {args.new})")
  for key, x, y, rel in report["differ"]:
    print(f"  differs: {key}: {x!r} -> {y!r}" + (f" (relative {rel:.2e})" if rel is not None else ""))
  for side in ("only_old", "only_new"):
    if report[side]:
      print(f"  {side.replace('_', ' in ')}: {', '.join(report[side])}")
  return 0 if not report["differ"] else 1


if __name__ == "__main__":
  sys.exit(main())

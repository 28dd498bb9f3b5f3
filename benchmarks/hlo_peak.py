"""What is alive at a compiled program's memory peak, from XLA's own dumps.

XLA writes, for a module compiled with `--xla_dump_to=DIR --xla_dump_hlo_as_text`, the optimised
HLO (`*after_optimizations.txt`) and its live ranges (`*after_optimizations-live-range.txt`), which
end with the list of buffers live at the peak ("Live ranges at T (peak)", name and bytes). This
module joins the two: each peak buffer gets its shape and its `op_name` (the JAX name stack, so the
`jax.named_scope` of the step part that made it), and a kind read from the shape:

- `argument`: an entry parameter (the sharded state and teacher weights);
- `full weight`: an array whose shape is (up to a transpose) a network parameter's *unsharded*
  shape: a gathered weight, or a weight-sized gradient or cast (on one device, every weight);
- `weight shard`: the shape of a parameter's shard on this device;
- `activation`: anything else with at least one dimension equal to the per-device batch;
- `other`.

The kind is a heuristic on shapes (an activation could share a weight's dimensions; none does
in the ADM/DDPM++ networks, whose weights carry a 3x3 kernel or a channel pair); the names and
op_names printed next to each buffer let a reader check it.

Used by `benchmarks/memory.py --where`.
"""

from __future__ import annotations

import collections
import glob
import os
import re

_PEAK = re.compile(r"^\s*Live ranges at (\d+) \(peak\):\s*$")
_PEAK_ROW = re.compile(r"^\s*(\S+?)(\{[^}]*\})?: (\d+) bytes")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\([^=]*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?) ")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def dump_files(dump_dir: str, module: str = "jit_step") -> tuple[str, str]:
  """`(hlo_text_path, live_range_path)` of the (last) module named like `module` in `dump_dir`."""
  ranges = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations-live-range.txt")))
  if not ranges:
    raise FileNotFoundError(f"no {module} live-range dump in {dump_dir} (compiled with --xla_dump_to?)")
  live = ranges[-1]
  hlo = live.replace("-live-range.txt", ".txt")
  return hlo, live


def peak_buffers(live_range_text: str) -> tuple[int, list[tuple[str, int]]]:
  """`(peak position, [(instruction name, bytes), ...])` from a live-range dump."""
  lines = live_range_text.splitlines()
  for i, line in enumerate(lines):
    m = _PEAK.match(line)
    if m:
      rows = []
      for row in lines[i + 1 :]:
        r = _PEAK_ROW.match(row)
        if not r:
          break
        rows.append((r.group(1), int(r.group(3))))
      return int(m.group(1)), rows
  raise ValueError("no 'Live ranges at ... (peak)' section in the live-range dump")


def instructions(hlo_text: str) -> tuple[dict[str, tuple[str, str]], set[str]]:
  """`({name: (shape, op_name)}, entry parameter names)` of an optimised HLO module's text."""
  info, entry_params, in_entry = {}, set(), False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY "):
      in_entry = True
    elif line.startswith("}"):
      in_entry = False
    m = _INSTR.match(line)
    if not m:
      continue
    op = _OPNAME.search(line)
    info[m.group(1)] = (m.group(2), op.group(1) if op else "")
    if in_entry and " parameter(" in line:
      entry_params.add(m.group(1))
  return info, entry_params


def array_dims(shape: str) -> tuple[int, ...] | None:
  """The dimensions of an array shape string (`bf16[4,64,64,192]{...}`); None for a tuple."""
  if shape.startswith("("):
    return None
  m = _ARRAY.match(shape)
  return tuple(int(x) for x in m.group(2).split(",") if x) if m else None


def kind_of(name, shape, entry_params, full_shapes, shard_shapes, batch) -> str:
  if name in entry_params:
    return "argument"
  dims = array_dims(shape)
  if dims is None:
    return "other"
  key = tuple(sorted(dims))
  if key in full_shapes:  # on a mesh that does not shard it, a weight's shard is the full weight
    return "full weight"
  if key in shard_shapes:
    return "weight shard"
  if batch in dims:
    return "activation"
  return "other"


# The `jax.named_scope`s of `emd_jax.distill.step.train_step` and `generator_grads`.
STEP_PARTS = (
  "draw_randomness",
  "backward_simulation",
  "generator_pass",
  "fake_update",
  "generator_grads",
  "estep",
  "mstep_loss",
  "generator_pullback",
  "generator_update",
  "ema_update",
  "nonfinite_guard",
)


def part_of(op_name: str) -> str:
  """The step part of an op (its named scopes, outer first, e.g. `generator_grads/estep`) and
  whether it is a backward pass (`transpose(...)` in the name stack); `(no op_name)` if none."""
  if not op_name:
    return "(no op_name)"
  parts = [p for p in op_name.split("/") if p in STEP_PARTS]
  name = "/".join(parts) if parts else "(outside the named parts)"
  return name + (" [backward]" if "transpose(" in op_name else "")


def report(
  hlo_text: str,
  live_range_text: str,
  param_shapes: list[tuple],
  shard_shapes: list[tuple],
  batch: int,
  allocated_bytes: int | None = None,
):
  """The peak's buffers joined with their shapes, kinds and parts, and totals per kind and part.

  `param_shapes` / `shard_shapes`: every network parameter's full / per-device shape;
  `allocated_bytes`, if given (arguments + outputs - aliases + temporaries of
  `Compiled.memory_analysis()`), is printed next to the live-range total as a check: the live-range
  view sums values, so it can miss a buffer that lives for a single instruction or count twice one
  that buffer assignment lets two values share.
  """
  at, peak = peak_buffers(live_range_text)
  info, entry = instructions(hlo_text)
  full = {tuple(sorted(s)) for s in param_shapes if len(s) >= 2}
  shard = {tuple(sorted(s)) for s in shard_shapes if len(s) >= 2}
  rows = []
  for name, nbytes in peak:
    shape, op = info.get(name, ("?", ""))
    rows.append(
      {
        "name": name,
        "bytes": nbytes,
        "shape": shape.split("{")[0],
        "kind": kind_of(name, shape, entry, full, shard, batch),
        "part": part_of(op),
        "op_name": op,
      }
    )
  by_kind, by_part, by_kind_part = collections.Counter(), collections.Counter(), collections.Counter()
  for r in rows:
    part = r["part"] if r["kind"] != "argument" else "(arguments)"
    by_kind[r["kind"]] += r["bytes"]
    by_part[part] += r["bytes"]
    by_kind_part[f"{r['kind']} | {part}"] += r["bytes"]
  return {
    "peak_position": at,
    "total_bytes": sum(r["bytes"] for r in rows),
    "num_buffers": len(rows),
    "allocated_bytes": allocated_bytes,
    "by_kind": dict(by_kind.most_common()),
    "by_part": dict(by_part.most_common()),
    "by_kind_part": dict(by_kind_part.most_common()),
    "buffers": sorted(rows, key=lambda r: -r["bytes"]),
  }


def markdown(rep: dict, top: int = 25) -> str:
  gib = 2.0**30
  total = rep["total_bytes"]
  out = [f"Live at the peak (position {rep['peak_position']}): {total / gib:.2f} GiB in {rep['num_buffers']} buffers."]
  if rep.get("allocated_bytes"):
    out[0] += (
      f" XLA's memory analysis (arguments + outputs - aliases + temporaries): {rep['allocated_bytes'] / gib:.2f} GiB."
    )
  out.append("")
  out += ["| kind | GiB | share |", "|---|---|---|"]
  out += [f"| {k} | {v / gib:.2f} | {v / total:.0%} |" for k, v in rep["by_kind"].items()]
  out += ["", "| step part (named scope) | GiB | share |", "|---|---|---|"]
  out += [f"| {k} | {v / gib:.2f} | {v / total:.0%} |" for k, v in rep["by_part"].items() if v / total >= 0.005]
  out += ["", "| kind | step part | MiB |", "|---|---|---|"]
  out += [
    f"| {k} | {v / 2**20:.1f} |"
    for k, v in rep.get("by_kind_part", {}).items()
    if k.split(" | ")[0] != "activation" and v >= 2**20 / 10
  ]
  out += ["", f"The {top} largest buffers:", "", "| buffer | shape | kind | GiB | op_name |", "|---|---|---|---|---|"]
  for r in rep["buffers"][:top]:
    op = r["op_name"].removeprefix("jit(step)/")
    op = op if len(op) <= 90 else op[:87] + "..."
    out.append(f"| {r['name']} | {r['shape']} | {r['kind']} | {r['bytes'] / gib:.3f} | {op} |")
  return "\n".join(out) + "\n"

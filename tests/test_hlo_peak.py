"""benchmarks/hlo_peak.py: the buffers live at a compiled program's peak, read from XLA's dumps.

A small program whose peak is known by construction: a weight sharded over 8 devices is gathered
whole inside a named scope and multiplied by a per-device batch. The report must find the
gathered weight (full shape, kind `full weight`, the scope's name), the sharded arguments, and
totals that agree with XLA's own memory analysis.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import hlo_peak


def _compile(tmp_path):
  mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8], axis_types=(jax.sharding.AxisType.Auto,))
  w_sh = NamedSharding(mesh, P("fsdp", None))
  x_sh = NamedSharding(mesh, P("fsdp", None))

  def f(w, x):
    with jax.named_scope("fake_update"):
      full = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))  # gathered: [1024, 512] on every device
      h = jnp.tanh(x @ full)
      h = jnp.tanh(h @ full.T)  # the gathered weight stays alive over several ops (as FSDP's do)
    with jax.named_scope("generator_grads"):
      return jnp.sum(h @ full)

  w = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=w_sh)
  x = jax.ShapeDtypeStruct((8 * 4, 1024), jnp.float32, sharding=x_sh)
  dump = str(tmp_path / "dump")
  compiled = (
    jax.jit(f)
    .lower(w, x)
    .compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True, "xla_dump_hlo_module_re": "jit_f"})
  )
  return compiled, dump


def test_peak_report_finds_the_gathered_weight(tmp_path):
  compiled, dump = _compile(tmp_path)
  hlo, live = hlo_peak.dump_files(dump, module="jit_f")
  assert os.path.exists(hlo)
  rep = hlo_peak.report(
    open(hlo).read(), open(live).read(), param_shapes=[(1024, 512)], shard_shapes=[(128, 512)], batch=4
  )
  gathered = [b for b in rep["buffers"] if b["kind"] == "full weight"]
  assert gathered, rep["buffers"][:5]
  big = gathered[0]
  assert tuple(sorted(hlo_peak.array_dims(big["shape"]))) == (512, 1024)
  assert big["bytes"] == 1024 * 512 * 4
  assert big["part"].startswith("fake_update"), big
  # The sharded weight and the batch shard are the program's arguments.
  assert rep["by_kind"].get("argument", 0) >= 128 * 512 * 4
  # Live at the peak: about everything XLA allocates (the live-range view counts values, buffer
  # assignment may let a few share storage: a 2% margin), at least the gathered weight.
  mem = compiled.memory_analysis()
  ceiling = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  assert big["bytes"] <= rep["total_bytes"] <= 1.02 * ceiling
  assert np.isclose(sum(rep["by_kind"].values()), rep["total_bytes"])
  md = hlo_peak.markdown(rep)
  assert "full weight" in md and "fake_update" in md


def test_parsers_on_dump_lines():
  live = "\n".join(
    [
      "HloLiveRange (max 10):",
      "  Live ranges at 7 (peak):",
      "    fusion.3{}: 4096 bytes (cumulative: 4096 bytes)",
      "    param.1{}: 1024 bytes (cumulative: 5120 bytes)",
      "  Stack trace breakdown for peak usage: 5120 bytes",
    ]
  )
  at, rows = hlo_peak.peak_buffers(live)
  assert at == 7 and rows == [("fusion.3", 4096), ("param.1", 1024)]
  hlo = "\n".join(
    [
      "ENTRY %main (param.1: f32[16,16]) -> f32[] {",
      "  %param.1 = f32[16,16]{1,0} parameter(0)",
      '  %fusion.3 = f32[4,16,16]{2,1,0} fusion(%param.1), kind=kLoop, metadata={op_name="jit(step)/generator_grads/'
      'estep/transpose(jvp(EDMPrecond))/model/conv"}',
      "}",
    ]
  )
  info, entry = hlo_peak.instructions(hlo)
  assert entry == {"param.1"}
  assert info["fusion.3"][0].startswith("f32[4,16,16]")
  assert hlo_peak.part_of(info["fusion.3"][1]) == "generator_grads/estep [backward]"
  assert hlo_peak.kind_of("fusion.3", info["fusion.3"][0], entry, set(), set(), 4) == "activation"
  assert hlo_peak.kind_of("param.1", info["param.1"][0], entry, set(), set(), 4) == "argument"

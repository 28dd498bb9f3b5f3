"""benchmarks/accelerator.py runs end to end (small networks on the CPU): timed steps, FLOPs, a results file."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_check_smoke(tmp_path):
  out = tmp_path / "acc"
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  args = ["--small", "--steps", "2", "--cases", "cifar10_sim,imagenet64_emd", "--dtypes", "float32", "--out", str(out)]
  subprocess.run([sys.executable, "benchmarks/accelerator.py", *args], cwd=REPO, env=env, check=True, timeout=900)
  rows = json.loads((tmp_path / "acc.json").read_text())["rows"]
  assert [r["case"] for r in rows] == ["cifar10_sim", "imagenet64_emd"]
  for r in rows:
    assert r["finite"] is True
    assert r["step_s"] > 0 and len(r["step_s_all"]) == 2
    assert r["flops_per_device"] > 0 and r["tflops_per_s"] > 0
    assert r["mfu"] is None  # no peak is known for a CPU
  assert rows[1]["K"] > 0  # EMD runs its E-step
  assert "imagenet64_emd" in (tmp_path / "acc.md").read_text()

"""Scale features: gradient accumulation, rematerialisation, bf16, cross-mesh restore, multi-process."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from configs.gmm import get_config
from emd_jax.distill.state import create_state
from emd_jax.jobs import distill as train
from emd_jax.runtime import checkpoint as ckpt_lib
from emd_jax.runtime import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(**overrides):
  c = get_config("tiny")
  c.batch_size = 32
  for k, v in overrides.items():
    c[k] = v
  train.validate_distill(c)
  return c, train.build_setup(c)


def _run_steps(setup, mesh, n=2, method_params=None):
  key = jax.random.PRNGKey(0)
  params = setup.module.init(key, jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  abstract = train.abstract_state(setup, key)
  step, state_sh, teacher_sh = train.sharded_step(setup, mesh, abstract)
  state = jax.device_put(create_state(key, params, setup.tx_gen, setup.tx_fake), state_sh)
  for _ in range(n):
    state, m = step(state, jax.device_put(setup.teacher.params, teacher_sh))
  return jax.device_get(state), m


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("method", ["emd_sim", "sim"])
def test_gradient_accumulation_equals_one_big_batch(method):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  _, s1 = _setup(method=method)
  _, s4 = _setup(method=method, grad_accum_steps=4)
  a, _ = _run_steps(s1, mesh)
  b, _ = _run_steps(s4, mesh)
  _close(a.gen_params, b.gen_params, rtol=2e-4, atol=2e-6)
  _close(a.fake_params, b.fake_params, rtol=2e-4, atol=2e-6)


def test_remat_changes_memory_not_results():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  _, s_none = _setup()
  _, s_full = _setup(remat="full")
  a, _ = _run_steps(s_none, mesh)
  b, _ = _run_steps(s_full, mesh)
  _close(a.gen_params, b.gen_params, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_master_weights():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  _, s_bf = _setup(compute_dtype="bfloat16")
  _, s_32 = _setup()
  a, m = _run_steps(s_bf, mesh, n=3)
  b, _ = _run_steps(s_32, mesh, n=3)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(a.gen_params))
  assert int(m["nonfinite/total"]) == 0
  # bf16 activations perturb the update slightly, not wildly.
  pairs = zip(jax.tree.leaves(a.gen_params), jax.tree.leaves(b.gen_params), strict=True)
  da = np.concatenate([np.ravel(x - y) for x, y in pairs])
  assert 0 < np.abs(da).max() < 1e-2


def test_checkpoint_written_on_one_mesh_restores_on_another(tmp_path):
  c, setup = _setup()
  c.mesh.fsdp = 1
  state8, _ = _run_steps(setup, parallel.make_mesh({"data": 8, "fsdp": 1}))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), asynchronous=False)
  ck.save(2, jax.device_put(state8), {"fingerprint": {}})
  ck.wait()
  key = jax.random.PRNGKey(0)
  abstract = train.abstract_state(setup, key)
  for shape in [(4, 2), (1, 1)]:
    devices = jax.devices() if shape != (1, 1) else jax.devices()[:1]
    mesh = parallel.make_mesh({"data": shape[0], "fsdp": shape[1]}, devices=devices)
    sh = parallel.tree_shardings(abstract, mesh, min_size=1)  # shard even tiny leaves, to exercise resharding
    restored, _ = ck.restore(2, ckpt_lib.abstract_like(abstract, sh))
    assert jax.tree.leaves(restored.gen_params)[0].sharding.mesh.shape == mesh.shape
    _close(state8.gen_params, jax.device_get(restored.gen_params), rtol=0, atol=0)
  ck.close()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # about 80 s on 2 cores (two JAX processes over gloo); --runslow
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 4 CPU devices over loopback (gloo) == 1 process x 8 devices."""
  common = [
    "--config",
    "configs/gmm.py:tiny",
    "--config.total_steps=6",
    "--config.eval_every=100",
    "--config.checkpoint_every=3",
    "--config.log_every=3",
  ]
  base_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  one = subprocess.run(
    [sys.executable, "-m", "emd_jax.main", *common, "--workdir", str(tmp_path / "one")],
    cwd=REPO,
    env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  env = {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "emd_jax.main",
        *common,
        "--workdir",
        str(tmp_path / "two"),
        "--coordinator_address",
        f"127.0.0.1:{port}",
        "--num_processes",
        "2",
        "--process_id",
        str(i),
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)

  def load(d):
    with open(tmp_path / d / "export" / "params.msgpack", "rb") as f:
      return serialization.msgpack_restore(f.read())

  _close(load("one"), load("two"), rtol=1e-5, atol=1e-6)
  assert (tmp_path / "two" / "checkpoints" / "6").exists()

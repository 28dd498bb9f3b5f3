"""`runtime.runner.run_job` with a fake job: sharded init, training, checkpoints, exact resume, eval, export."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emd_jax.runtime import checkpoint as ckpt_lib
from emd_jax.runtime import runner

SHAPE = (256, 128)  # big enough (2**15 elements) for the FSDP rules to shard it
TX = optax.sgd(0.1)


@struct.dataclass
class QuadState:
  step: jax.Array  # int32 []
  w: jax.Array  # [256, 128]
  opt_state: optax.OptState


def _config(total_steps: int, fsdp: int = 2, **overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    {
      "seed": 0,
      "total_steps": total_steps,
      "batch_size": 8,
      "log_every": 1,
      "eval_every": 3,
      "checkpoint_every": 2,
      "mesh": {"data": -1, "fsdp": fsdp},
    }
  )
  c.update(overrides)
  return c


def _host_batch(step: int) -> np.ndarray:
  """The batch of update `step + 1`: [8, 128], different for every step."""
  return np.random.default_rng(step).normal(size=(8, SHAPE[1])).astype(np.float32)


class QuadJob:
  """Minimises 0.5 ||w - target - 0.1 mean(batch)||^2 with SGD, recording what the runner asked of it."""

  def __init__(self, crash_at: int | None = None):
    self.crash_at = crash_at  # the batch iterator raises before this update (a crash mid-run)
    self.init_traced: list[bool] = []
    self.batch_starts: list[int] = []
    self.eval_steps: list[int] = []
    self.exported: list[int] = []

  def init(self, w0):
    self.init_traced.append(isinstance(w0, jax.core.Tracer))
    w = w0 * 1.0
    return QuadState(step=jnp.zeros((), jnp.int32), w=w, opt_state=TX.init(w))

  def step(self, state: QuadState, target, batch):
    def loss_fn(w):
      return 0.5 * jnp.sum((w - target - 0.1 * jnp.mean(batch, axis=0)) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(state.w)
    updates, opt_state = TX.update(g, state.opt_state, state.w)
    new = QuadState(step=state.step + 1, w=optax.apply_updates(state.w, updates), opt_state=opt_state)
    return new, {"loss/quad": loss}

  def batches(self, start: int):
    self.batch_starts.append(start)
    step = start
    while True:
      if self.crash_at is not None and step + 1 == self.crash_at:
        raise RuntimeError(f"simulated crash before update {self.crash_at}")
      yield _host_batch(step)
      step += 1

  def evaluate(self, state: QuadState, step: int):
    self.eval_steps.append(step)
    return {"eval/w_mean": float(jnp.mean(state.w))}, {}

  def export(self, state: QuadState, last_eval: dict):
    self.exported.append(int(state.step))
    return {"exported_step": int(state.step)}

  def job(self) -> runner.Job:
    w0 = np.linspace(-1.0, 1.0, SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE)
    target = np.full(SHAPE, 0.5, np.float32)
    abstract = jax.eval_shape(self.init, jax.ShapeDtypeStruct(SHAPE, jnp.float32))
    self.init_traced.clear()  # count the runner's calls only
    return runner.Job(
      abstract_state=abstract,
      init=self.init,
      init_inputs=lambda: (w0,),
      make_step=lambda mesh: self.step,
      fingerprint={"shape": list(SHAPE)},
      args=(target,),
      batches=self.batches,
      make_evaluate=lambda mesh, args: self.evaluate,
      export=self.export,
      console_keys=("loss/quad",),
    )


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_initial_state_is_created_sharded_not_put(tmp_path, monkeypatch):
  """A fresh state comes out of the jitted init on the mesh; no host-built state is ever device_put."""
  put_states = []
  real_put = jax.device_put

  def spy(x, *a, **k):
    put_states.extend(
      leaf for leaf in jax.tree.leaves(x, is_leaf=lambda t: isinstance(t, QuadState)) if isinstance(leaf, QuadState)
    )
    return real_put(x, *a, **k)

  monkeypatch.setattr(jax, "device_put", spy)
  fake = QuadJob()
  out = runner.run_job(fake.job(), _config(0, fsdp=8), str(tmp_path))
  state = out["state"]
  assert fake.init_traced == [True]  # init ran under jit (tracers), never eagerly
  assert not put_states
  mesh = state.w.sharding.mesh
  assert state.w.sharding == NamedSharding(mesh, P("fsdp", None))
  assert len(state.w.sharding.device_set) == 8 and not state.w.sharding.is_fully_replicated
  assert {s.data.shape for s in state.w.addressable_shards} == {(SHAPE[0] // 8, SHAPE[1])}
  for leaf in jax.tree.leaves(state):  # nothing committed to one device only
    assert len(leaf.sharding.device_set) == 8, leaf.sharding
  w0 = np.linspace(-1.0, 1.0, SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE)
  np.testing.assert_array_equal(np.asarray(state.w), w0)
  assert int(state.step) == 0 and fake.exported == [0]


def test_trains_checkpoints_resumes_exactly_evaluates_and_exports_once(tmp_path, monkeypatch):
  closed = []
  real_close = ckpt_lib.Checkpointer.close

  def close(self):
    closed.append(self.directory)
    real_close(self)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "close", close)

  straight = QuadJob()
  full = runner.run_job(straight.job(), _config(6), str(tmp_path / "straight"))
  assert full["step"] == 6 and int(full["state"].step) == 6
  assert straight.eval_steps == [3, 6] and full["eval/w_mean"] == pytest.approx(float(jnp.mean(full["state"].w)))
  assert straight.exported == [6] and full["exported_step"] == 6
  assert straight.batch_starts == [0]
  # It trained, exactly as SGD should: w <- w - 0.1 (w - target - 0.1 mean(batch_n)), batches of steps 0..5.
  w = np.linspace(-1.0, 1.0, SHAPE[0] * SHAPE[1], dtype=np.float64).reshape(SHAPE)
  for n in range(6):
    w = w - 0.1 * (w - 0.5 - 0.1 * _host_batch(n).astype(np.float64).mean(0))
  np.testing.assert_allclose(np.asarray(full["state"].w), w, rtol=1e-5, atol=1e-6)
  # Checkpoints at 2, 4, 6 (checkpoint_every=2).
  assert sorted(int(d) for d in os.listdir(tmp_path / "straight" / "checkpoints") if d.isdigit()) == [2, 4, 6]

  # A crash before update 5: the last checkpoint is step 4, and the checkpointer is still closed.
  work = str(tmp_path / "crashed")
  crashed = QuadJob(crash_at=5)
  n_closed = len(closed)
  with pytest.raises(RuntimeError, match="simulated crash"):
    runner.run_job(crashed.job(), _config(6), work)
  assert len(closed) == n_closed + 1 and crashed.exported == []
  assert crashed.init_traced == [True]

  resumed_job = QuadJob()
  resumed = runner.run_job(resumed_job.job(), _config(6), work)
  assert resumed_job.init_traced == []  # resumed from the checkpoint: no init at all
  assert resumed_job.batch_starts == [4]  # the data continue at the restored step
  assert resumed_job.eval_steps == [6] and resumed_job.exported == [6]
  for a, b in zip(_leaves(full["state"]), _leaves(resumed["state"]), strict=True):
    np.testing.assert_array_equal(a, b)

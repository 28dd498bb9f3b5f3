"""Strided micro-batches (`step.micro_batch`): every micro-step spans the whole mesh, nothing moves.

The step's batch is sharded in contiguous blocks over the data axis. A contiguous micro-batch
`[i * micro, (i + 1) * micro)` would live on `1 / accum` of the devices (or be resharded to all of
them every micro-step); the strided one, examples `i, i + accum, ...`, has `B / (accum * devices)`
examples on every device. Gradients of accumulation against the full batch are in
tests/test_step_parts.py and tests/test_scale.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emd_jax.distill import step as step_lib

B, S, D, ACCUM = 32, 2, 3, 2


def _draws() -> step_lib.Draws:
  r = np.arange(B * D, dtype=np.float32).reshape(B, D)
  return step_lib.Draws(
    z=jnp.asarray(r),
    labels=None,
    sigma=jnp.arange(B, dtype=jnp.float32),
    eps=jnp.asarray(-r),
    chain_keys=jax.random.split(jax.random.key(0), B),
    fake_z=jnp.asarray(np.stack([r + 1000 * s for s in range(S)])),
    fake_sigma=jnp.asarray(np.stack([np.arange(B, dtype=np.float32) + 100 * s for s in range(S)])),
    fake_noise=jnp.zeros((S, B, D)),
  )


def _mesh():
  """8 devices on the data axis, axis type Auto as `runtime.parallel.make_mesh` builds them."""
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _shardings(mesh, d):
  def spec(k, v):
    return None if v is None else NamedSharding(mesh, P(None, "data") if k in step_lib.STEP_MAJOR else P("data"))

  return d._replace(**{k: spec(k, v) for k, v in d._asdict().items()})


def test_strided_micro_batch_takes_every_accum_th_example():
  d = _draws()
  for i in range(ACCUM):
    m = jax.jit(step_lib.micro_batch, static_argnums=2)(d, jnp.int32(i), ACCUM)
    np.testing.assert_array_equal(m.z, np.asarray(d.z)[i::ACCUM])
    np.testing.assert_array_equal(m.sigma, np.asarray(d.sigma)[i::ACCUM])
    np.testing.assert_array_equal(m.fake_z, np.asarray(d.fake_z)[:, i::ACCUM])
    np.testing.assert_array_equal(jax.random.key_data(m.chain_keys), jax.random.key_data(d.chain_keys)[i::ACCUM])


def test_micro_batch_spans_every_device_without_communication():
  mesh = _mesh()
  d = _draws()
  sh = _shardings(mesh, d)
  d = jax.device_put(d, sh)
  fn = jax.jit(lambda d, i: step_lib.micro_batch(d, i, ACCUM), in_shardings=(sh, None))
  hlo = fn.lower(d, jnp.int32(1)).compile().as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert op not in hlo, f"micro_batch moves data between devices ({op})"
  m = fn(d, jnp.int32(1))
  per_device = B // (ACCUM * 8)
  for name, arr in (("z", m.z), ("sigma", m.sigma)):
    devices = {s.device for s in arr.addressable_shards}
    assert len(devices) == 8, name
    assert all(s.data.shape[0] == per_device for s in arr.addressable_shards), name
  assert all(s.data.shape[1] == per_device for s in m.fake_z.addressable_shards)
  np.testing.assert_array_equal(np.asarray(m.z), np.arange(B * D, dtype=np.float32).reshape(B, D)[1::ACCUM])


def test_a_contiguous_micro_batch_would_move_data():
  """The control: the contiguous slice that `micro_batch` used to take does need communication
  here, so the test above can tell the two apart."""
  mesh = _mesh()
  z = jax.device_put(jnp.zeros((B, D)), NamedSharding(mesh, P("data")))
  micro = B // ACCUM
  fn = jax.jit(
    lambda z, i: jax.lax.with_sharding_constraint(
      jax.lax.dynamic_slice_in_dim(z, i * micro, micro, axis=0), NamedSharding(mesh, P("data"))
    )
  )
  hlo = fn.lower(z, jnp.int32(1)).compile().as_text()
  assert any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"))


def test_accumulating_train_step_moves_no_examples_between_devices():
  """The whole distillation step with 2 micro-batches on an 8-device data mesh: its compiled HLO has
  all-reduces (each device computed its own examples; the gradients are summed) and no all-gather /
  all-to-all / collective-permute of the batch. With the former contiguous slice XLA compiled the
  micro-step replicated, every device computing the whole micro-batch (no all-reduce at all): this
  test failed on it (checked by swapping the slice back)."""
  from helpers import gmm_tiny

  from emd_jax.jobs import distill as train
  from emd_jax.runtime import checkpoint as ckpt_lib
  from emd_jax.runtime import parallel

  c = gmm_tiny(batch_size=32, grad_accum_steps=2, **{"mesh.data": 8, "mesh.fsdp": 1})
  train.validate_distill(c)
  setup = train.build_setup(c)
  mesh = parallel.make_mesh(c.mesh)
  abstract = train.abstract_state(setup, jax.random.PRNGKey(0))
  step, state_sh, teacher_sh = train.sharded_step(setup, mesh, abstract)
  hlo = (
    step.lower(ckpt_lib.abstract_like(abstract, state_sh), ckpt_lib.abstract_like(setup.teacher.params, teacher_sh))
    .compile()
    .as_text()
  )
  assert "all-reduce" in hlo
  for op in ("all-gather", "all-to-all", "collective-permute"):
    assert op not in hlo, f"the accumulating step moves data between devices ({op})"

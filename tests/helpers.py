"""Helpers shared by the tests: pytree comparisons, tiny configs with dotted overrides, a recording optimizer.

Fixtures built from these live in conftest.py; test modules import the plain functions from here
(`from helpers import assert_trees_close`), since conftest.py itself is not meant to be imported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _paired_leaves(a, b):
  """Leaves of `a` and `b` (host numpy), after checking the two trees have the same structure."""
  ta, tb = jax.tree.structure(a), jax.tree.structure(b)
  if ta != tb:
    raise AssertionError(f"tree structures differ:\n{ta}\n{tb}")
  return [(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]


def trees_equal(a, b) -> bool:
  """True iff `a` and `b` have one structure and bit-identical leaves (same shapes and values)."""
  try:
    pairs = _paired_leaves(a, b)
  except AssertionError:
    return False
  return all(x.shape == y.shape and np.array_equal(x, y) for x, y in pairs)


def assert_trees_equal(a, b, err_msg: str = "") -> None:
  """Same structure, same shapes, bit-identical values (NaNs compare equal)."""
  for i, (x, y) in enumerate(_paired_leaves(a, b)):
    np.testing.assert_array_equal(x, y, err_msg=f"{err_msg} leaf {i}", strict=True)


def assert_trees_close(a, b, rtol: float = 1e-6, atol: float = 0.0, err_msg: str = "") -> None:
  """Same structure, and every leaf pair within `atol + rtol * |b|` elementwise."""
  for i, (x, y) in enumerate(_paired_leaves(a, b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{err_msg} leaf {i}")


def flat(tree) -> np.ndarray:
  """All leaves of `tree` raveled and concatenated, float64 `[N]`."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def rel_err(a, b) -> float:
  """`||flat(a) - flat(b)|| / ||flat(b)||` over whole pytrees."""
  fa, fb = flat(a), flat(b)
  return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


def override(config, **dotted):
  """Sets `config[a][b] = v` for each `a.b=v` (keys with dots given as `**{"a.b": v}`); returns `config`."""
  for key, value in dotted.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def gmm_tiny(**dotted):
  """`configs/gmm.py:tiny` with dotted overrides."""
  from configs.gmm import get_config

  return override(get_config("tiny"), **dotted)


def recording_optimizer() -> optax.GradientTransformation:
  """An optimizer whose update is zero and whose new state is the gradient it was given.

  After one train step with it, `state.gen_opt_state` / `state.fake_opt_state` ARE the generator's and
  the fake denoiser's gradients, exactly, and the parameters have not moved.
  """
  return optax.GradientTransformation(
    init=lambda p: jax.tree.map(jnp.zeros_like, p),
    update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
  )


def init_student_params(setup, key):
  """Random student parameters for `setup` (a `jobs.distill.Setup`): no surrogate fit, shapes only matter."""
  data_shape = setup.teacher.data_shape
  labels = jnp.zeros((1, setup.teacher.num_classes)) if setup.teacher.num_classes else None
  return setup.module.init(key, jnp.zeros((1, *data_shape)), jnp.ones((1,)), labels)["params"]


def step_gradients(config, mesh_shape=(1, 1), devices=None, seed: int = 0):
  """The generator's and the fake denoiser's gradients of ONE distillation step, exactly.

  Builds the configured step through `jobs.distill.sharded_step` on a `data x fsdp` mesh (`mesh_shape`,
  over `devices`, default the first `data * fsdp`) with `recording_optimizer` for both networks, runs
  it once from random student parameters, and returns `(gen_grads, fake_grads, metrics)` on the host.
  """
  import dataclasses

  from emd_jax.distill.state import create_state
  from emd_jax.jobs import distill
  from emd_jax.runtime import parallel

  distill.validate_distill(config)
  rec = recording_optimizer()
  setup = dataclasses.replace(distill.build_setup(config), tx_gen=rec, tx_fake=rec)
  key = jax.random.PRNGKey(seed)
  params = init_student_params(setup, key)
  n = mesh_shape[0] * mesh_shape[1]
  mesh = parallel.make_mesh({"data": mesh_shape[0], "fsdp": mesh_shape[1]}, devices=devices or jax.devices()[:n])
  step, state_sh, teacher_sh = distill.sharded_step(setup, mesh, distill.abstract_state(setup, key))
  state = jax.device_put(create_state(key, params, rec, rec), state_sh)
  new, metrics = step(state, jax.device_put(setup.teacher.params, teacher_sh))
  new, metrics = jax.device_get((new, metrics))
  if int(metrics["nonfinite/skipped"]):
    raise AssertionError("the step was skipped as non-finite: its recorded gradients are zeros")
  return new.gen_opt_state, new.fake_opt_state, metrics


TINY_UNET_SPEC = dict(
  arch="song_unet",
  precond="edm",
  img_resolution=16,
  in_channels=1,
  model_channels=8,
  channel_mult=[1],
  num_blocks=1,
  attn_resolutions=[16],
  dropout=0.0,
)


def save_tiny_unet_teacher(path: str, channels: int = 1, seed: int = 0) -> str:
  """Writes an untrained one-level SongUNet teacher (16 x 16 x `channels`, 8 channels) to `path`; returns it.

  For tests of the pipelines (distillation, UD2M, the notebook), where the teacher's quality is not under test.
  """
  from emd_jax.nets import build
  from emd_jax.teachers import network

  spec = {**TINY_UNET_SPEC, "in_channels": channels}
  x = jnp.zeros((1, 16, 16, channels))
  params = jax.jit(build(spec).init)(jax.random.PRNGKey(seed), x, jnp.ones((1,)), None)["params"]
  return network.save(path, spec, params, meta={"source": "tests: untrained tiny SongUNet"})

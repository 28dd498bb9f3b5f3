"""UD2M training job: loss goes down, base frozen bit for bit, exact resume, export + restore CLI, configs.

Every run uses a tiny randomly initialised one-level SongUNet teacher (saved
with `teachers.network.save`), never the shipped digits teacher, so the tests
do not depend on its quality.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import override, save_tiny_unet_teacher

from emd_jax import cli, restore
from emd_jax.formats import ud2m_export as export_lib
from emd_jax.jobs import ud2m
from emd_jax.nets import lora as lora_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, teacher: str, **overrides):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  c.teacher.checkpoint = teacher
  return override(c, **overrides)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return save_tiny_unet_teacher(str(tmp_path_factory.mktemp("ud2m") / "teacher"))


@pytest.fixture(scope="module")
def run_2(teacher_dir, tmp_path_factory):
  """The deblurring config's 2-step tiny run; its export feeds the CLI test."""
  workdir = str(tmp_path_factory.mktemp("ud2m_run"))
  return workdir, ud2m.train_and_evaluate(_config("ud2m_digits_deblur", teacher_dir), workdir)


@pytest.fixture(scope="module")
def deblur_step(teacher_dir):
  """The deblurring config (UD2M's own LoRA targets, a high lr) with its step jitted once for two tests."""
  hp = {"optim.lr": 1e-2, "optim.unfolded_lr_mult": 3.0, "loss.weighting": "x0", "loss.adversarial_weight": 0.0}
  # UD2M's own targets (the digits configs adapt every layer): only those may change below.
  hp["lora.targets"] = lora_lib.DEFAULT_TARGETS
  c = _config("ud2m_digits_deblur", teacher_dir, **hp)
  setup = ud2m.build_setup(c)
  return c, setup, jax.jit(ud2m.make_train_step(setup))


def test_step_reduces_loss_and_keeps_base_bit_identical(deblur_step):
  c, setup, step = deblur_step
  state = ud2m.init_state(setup, jax.random.PRNGKey(0), jax.random.PRNGKey(1))
  base = setup.teacher.params
  base_before = jax.tree.map(np.array, base)
  from emd_jax.evaluators.digits_classifier import digits_images

  x = jnp.asarray(digits_images("test")[0][:8])  # one fixed batch [8, 16, 16, 1]
  s = c.sampler

  @jax.jit
  def fixed_mse(params):  # the MSE term at fixed noise, outer indices and measurement
    loss, _ = ud2m.unfolded_training_loss(
      setup.denoiser(base, params["lora"]),
      setup.operator,
      x,
      jax.random.PRNGKey(7),
      params["unfolded"],
      s.num_outer,
      s.num_inner,
      setup.sigma_y,
      setup.timesteps,
      weighting="x0",
    )
    return loss.mean()

  before = float(fixed_mse(state.params))
  for _ in range(8):
    state, metrics = step(state, base, setup.feature_params, x)
  after = float(fixed_mse(state.params))
  assert np.isfinite(float(metrics["loss/total"])) and int(state.nonfinite_count) == 0
  assert after < 0.9 * before, (before, after)
  # The base weights are untouched, and the adapter really moved.
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(base_before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert float(optax_norm(state.params["lora"], "lora_b")) > 0
  # The optimizer itself gives the base exactly zero updates, whatever its gradient.
  full = {"base": base, **state.params}
  noisy = jax.tree.map(lambda v: jnp.ones_like(v), full)
  updates, _ = setup.tx.update(noisy, state.opt_state, full)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["base"]))
  # Only the targeted weights (attention, output layer) differ in the merged tree.
  merged = lora_lib.merge(base, state.params["lora"])
  changed = {
    jax.tree_util.keystr(p)
    for (p, m), b in zip(jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(base), strict=True)
    if not np.array_equal(np.asarray(m), np.asarray(b))
  }
  assert changed and all(("qkv" in k or "proj" in k or "aux_conv" in k) for k in changed), changed


def test_step_key_comes_from_the_state_not_a_closure(deblur_step):
  """The step is a pure function of (state, args): its randomness is `state.rng`, nothing captured."""
  import inspect

  assert list(inspect.signature(ud2m.make_train_step).parameters) == ["setup", "batch_sharding"]
  c, setup, step = deblur_step
  assert hash(setup.step_cfg) == hash(ud2m.UD2MStepConfig.from_config(c, setup.sigma_y))  # static, hashable
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 1)), jnp.float32)
  base = setup.teacher.params

  def one_step(rng_seed: int):
    state = ud2m.init_state(setup, jax.random.PRNGKey(0), jax.random.PRNGKey(rng_seed))
    new, metrics = step(state, base, setup.feature_params, x)
    return jax.tree.map(np.asarray, new), float(metrics["loss/mse"])

  a, loss_a = one_step(1)
  a_again, loss_a_again = one_step(1)
  b, loss_b = one_step(2)
  assert _leaves_equal(a, a_again) and loss_a == loss_a_again  # same rng: the same update, bit for bit
  assert loss_a != loss_b  # another rng: other noise, outer indices and measurement noise
  assert not _leaves_equal(a.params["unfolded"], b.params["unfolded"])
  np.testing.assert_array_equal(a.rng, np.asarray(jax.random.PRNGKey(1)))  # the key is carried, unchanged


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def optax_norm(tree, leaf_name: str):
  leaves = [v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0] if p[-1].key == leaf_name]
  return sum(jnp.sum(v**2) for v in leaves)


@pytest.mark.slow
def test_resume_is_exact(teacher_dir, run_2, tmp_path):
  """1 step, then resumed to 2 (checkpoint at 1) == 2 steps straight, bit for bit."""
  _, straight = run_2
  first = ud2m.train_and_evaluate(_config("ud2m_digits_deblur", teacher_dir, total_steps=1), str(tmp_path))
  resumed = ud2m.train_and_evaluate(_config("ud2m_digits_deblur", teacher_dir), str(tmp_path))
  assert first["step"] == 1 and resumed["step"] == 2 and straight["step"] == 2
  for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # trains a UD2M run for its fixture, about 80 s; --runslow
def test_export_and_restore_cli_round_trip(teacher_dir, run_2, tmp_path):
  workdir, result = run_2
  assert result["step"] == 2 and np.isfinite(result["eval/psnr"]) and 0 < result["eval/ssim"] <= 1
  export_dir = os.path.join(workdir, "export")
  sampler = export_lib.load_sampler(export_dir)
  assert sampler.task == "deblur" and sampler.nfe == 9 and sampler.meta["step"] == 2
  assert sampler.meta["teacher"]["copied"] and os.path.isfile(os.path.join(export_dir, "teacher", "teacher.json"))
  np.testing.assert_allclose(
    sampler.unfolded["log_lam"], np.asarray(result["state"].params["unfolded"]["log_lam"]), rtol=1e-6
  )
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 1)).astype(np.uint8)
  np.savez(tmp_path / "clean_u8.npz", images=images)
  np.savez(tmp_path / "clean_f.npz", samples=images.astype(np.float32)[..., 0] / 127.5 - 1.0)  # [N, H, W]
  argv = ["restore", f"--sampler={export_dir}", "--task=deblur", "--seed=3", "--batch_size=2"]
  code = restore.run_in_process([*argv[1:], f"--input={tmp_path}/clean_u8.npz", f"--out={tmp_path}/u8.npz"])
  assert code == 0
  with np.load(tmp_path / "u8.npz") as f:
    assert {"clean", "observed", "restored", "psnr", "ssim"} <= set(f.keys())
    for k in ("clean", "observed", "restored"):
      assert f[k].shape == (4, 16, 16, 1) and f[k].dtype == np.uint8
    np.testing.assert_array_equal(f["clean"], images)
    assert f["psnr"].shape == (4,) and f["psnr"].dtype == np.float32
  out = restore.run(
    str(tmp_path / "clean_f.npz"), str(tmp_path / "f.npz"), "deblur", 3, sampler_dir=export_dir, batch_size=2
  )
  with np.load(tmp_path / "f.npz") as f:
    assert all(f[k].shape == (4, 16, 16, 1) and f[k].dtype == np.float32 for k in ("clean", "observed", "restored"))
  assert out["nfe"] == 9 and np.isfinite(out["psnr"])
  # A baseline from the teacher directory, and clean one-line errors.
  base = restore.run(
    str(tmp_path / "clean_u8.npz"),
    str(tmp_path / "b.npz"),
    "deblur",
    0,
    baseline="unfolded_zero_shot",
    teacher_path=teacher_dir,
    settings={"std": 1.5, "kernel_size": 15},
    batch_size=2,
  )
  assert base["nfe"] == 9 and np.isfinite(base["psnr"])
  wrong = [*argv, "--task=inpaint", f"--input={tmp_path}/clean_u8.npz", f"--out={tmp_path}/x.npz"]
  assert restore.run_in_process(wrong[1:]) == cli.USAGE_EXIT_CODE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ud2m_digits_inpaint", "ud2m_imagenet_deblur"])
def test_config_two_step_tiny_run(name, tmp_path):
  if name == "ud2m_imagenet_deblur":  # the paper's settings at a tiny size: 3 channels, digits as data
    teacher = save_tiny_unet_teacher(str(tmp_path / "teacher3"), channels=3)
    c = _config(name, teacher, **{"data.name": "digits", "data.resolution": 16, "data.preprocess": "auto"})
    c.eval_split = "test"
  else:
    c = _config(name, save_tiny_unet_teacher(str(tmp_path / "teacher")))
  out = ud2m.train_and_evaluate(c, str(tmp_path / "run"))
  assert out["step"] == 2 and np.isfinite(out["eval/psnr"])
  sampler = export_lib.load_sampler(str(tmp_path / "run" / "export"))
  assert sampler.nfe == 9 and sampler.meta["sampler"]["timesteps"] == [999, 444, 111]
  assert sampler.meta["teacher"]["copied"] == (name != "ud2m_imagenet_deblur")

"""Matched precision: teacher, fake denoiser and generator compute in one dtype, the score gap in float32.

With `compute_dtype="bfloat16"` and the fake denoiser a copy of the teacher (step 0), the score gap
`D_fake - D_teacher` that drives every method is exactly zero, so every method's generator gradient is
exactly zero; a float32 teacher next to a bf16 fake (the old behaviour) gives bf16 round-off instead.
"""

import jax
import numpy as np
import pytest
from helpers import gmm_tiny, save_tiny_unet_teacher

from emd_jax.distill.methods import PRESETS
from emd_jax.distill.step import Nets, draw_randomness, generator_grads
from emd_jax.jobs import distill
from emd_jax.teachers import network


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return save_tiny_unet_teacher(str(tmp_path_factory.mktemp("prec") / "teacher"))


def _setup(teacher_dir, method, dtype="bfloat16"):
  c = gmm_tiny(
    batch_size=8,
    method=method,
    compute_dtype=dtype,
    **{"teacher.kind": "checkpoint", "teacher.checkpoint": teacher_dir},
  )
  distill.validate_distill(c)
  return distill.build_setup(c)


def _grads_at_step0(setup, teacher_apply):
  """The M-step's `(grads, metrics)` with generator = fake = teacher parameters (step 0's fake score)."""
  cfg = setup.step_cfg
  nets = Nets.build("none", setup.net_apply, teacher_apply)
  p = setup.teacher.params

  @jax.jit
  def run(p):
    d = draw_randomness(cfg, jax.random.PRNGKey(1))
    _, grads, metrics = generator_grads(cfg, nets, p, p, p, d)
    return grads, metrics

  return jax.device_get(run(p))


# About 40 s per method on 2 shared cores (build, compile): "sim" and "emd_sim" (the E-step's exact
# noise cancellation) by default, every row of the methods table with --runslow.
FAST = ("sim", "emd_sim")


@pytest.mark.parametrize(
  "method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in sorted(PRESETS)]
)
def test_bf16_step0_score_gap_and_gradient_are_exactly_zero(teacher_dir, method):
  setup = _setup(teacher_dir, method)
  assert setup.net_spec["dtype"] == "bfloat16"
  grads, metrics = _grads_at_step0(setup, setup.teacher.apply)
  for key in ("loss/score_gap", "estep/score_gap_norm", "estep/eps_nc_norm", "loss/direction_norm"):
    if key in metrics:
      assert float(metrics[key]) == 0.0, (key, float(metrics[key]))
  leaves = jax.tree.leaves(grads)
  assert all(np.all(g == 0) for g in leaves), max(float(np.abs(g).max()) for g in leaves)
  assert distill.init_score_gap(setup) == 0.0


def test_float32_teacher_next_to_bf16_fake_gives_a_nonzero_gap(teacher_dir):
  """The old behaviour (teacher float32, fake and generator bf16): the gap is bf16 round-off, not 0."""
  setup = _setup(teacher_dir, "sim")
  f32_teacher = network.load(teacher_dir)  # its spec has no dtype: computes in float32
  grads, metrics = _grads_at_step0(setup, f32_teacher.apply)
  assert float(metrics["loss/score_gap"]) > 0.0
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 0.0
  mismatched = distill.DistillSetup(**{**setup.__dict__, "teacher": f32_teacher})
  assert distill.init_score_gap(mismatched) > 0.0


def test_float32_compute_keeps_the_loaded_teacher(teacher_dir):
  """compute_dtype float32 (the default): the teacher is the loader's own, unchanged (default runs keep their bits)."""
  t = network.load(teacher_dir)
  assert network.with_compute_dtype(t, "float32") is t
  assert network.with_compute_dtype(t, None) is t
  assert network.with_compute_dtype(t, "bfloat16").spec == t.spec  # fingerprints and exports unchanged

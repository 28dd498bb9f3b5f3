"""Digits end to end: tiny distillation of a network teacher -> export + PNG grid; the sample CLI on images."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import digits as digits_config
from configs.teacher_digits import get_config as teacher_config
from emd_jax import nets
from emd_jax.jobs import distill as train
from emd_jax.jobs import teacher as teacher_train
from emd_jax.teachers import network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
  """An untrained tiny SongUNet teacher directory (the pipeline, not the quality, is under test)."""
  spec = teacher_train.net_spec(teacher_config("tiny"))
  params = teacher_train.init_params(nets.build(spec), jax.random.PRNGKey(0), (16, 16, 1), 0)
  return network.save(str(tmp_path_factory.mktemp("teacher") / "teacher"), spec, params, meta={"source": "test"})


@pytest.fixture(scope="module")
def distilled(tiny_teacher, tmp_path_factory) -> tuple[str, dict]:
  c = digits_config.get_config("tiny")
  c.teacher.checkpoint = tiny_teacher
  workdir = str(tmp_path_factory.mktemp("digits"))
  return workdir, train.train_and_evaluate(c, workdir)


def test_shipped_configs_load():
  for arg in ("", "cond", "tiny"):
    c = digits_config.get_config(arg)
    assert c.teacher.kind == "checkpoint" and c.teacher.checkpoint.startswith("builtin:digits_")
  assert teacher_config("cond").net.label_dim == 10


@pytest.mark.slow
def test_tiny_distillation_writes_export_grid_and_scores(distilled):
  workdir, out = distilled
  assert int(out["state"].step) == 2
  assert {"fd", "coverage", "precision", "recall"} <= set(out)
  assert os.path.exists(os.path.join(workdir, "samples_step2.png"))
  with open(os.path.join(workdir, "export", "generator.json")) as f:
    meta = json.load(f)
  assert meta["data_shape"] == [16, 16, 1] and meta["net"]["arch"] == "song_unet"


def _sample_cli(*args: str) -> None:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  subprocess.run([sys.executable, "-m", "emd_jax.sample", *args], cwd=REPO, env=env, check=True, capture_output=True)


@pytest.mark.slow
def test_sample_cli_generator_writes_images_and_grid(distilled, tmp_path):
  workdir, _ = distilled
  out, grid = tmp_path / "s.npz", tmp_path / "g.png"
  _sample_cli("--generator", os.path.join(workdir, "export"), "--num", "6", "--out", str(out), "--grid", str(grid))
  data = np.load(out)
  assert data["samples"].dtype == np.float32 and data["samples"].shape == (6, 16, 16, 1)
  assert data["images"].dtype == np.uint8 and data["images"].shape == (6, 16, 16, 1)
  assert grid.exists()


@pytest.mark.slow
def test_sample_cli_teacher_heun(tiny_teacher, tmp_path):
  out, grid = tmp_path / "t.npz", tmp_path / "t.png"
  _sample_cli(
    "--config",
    "configs/digits.py:tiny",
    f"--config.teacher.checkpoint={tiny_teacher}",
    "--teacher",
    "--num_steps",
    "2",
    "--num",
    "4",
    "--out",
    str(out),
    "--grid",
    str(grid),
  )
  data = np.load(out)
  assert data["images"].shape == (4, 16, 16, 1) and data["images"].dtype == np.uint8
  assert grid.exists()

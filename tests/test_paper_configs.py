"""Every paper config runs 2 distillation steps with a tiny teacher of its architecture family."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emd_jax import nets
from emd_jax.jobs import distill as train
from emd_jax.teachers import network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny members of each architecture family: XLA's CPU compile time of a whole distillation step
# grows with the number of network layers, so one level and 4x4 images keep a run near a minute.
SONG = dict(
  arch="song_unet",
  precond="vp",
  img_resolution=4,
  in_channels=3,
  out_channels=3,
  model_channels=8,
  channel_mult=[1],
  num_blocks=1,
  attn_resolutions=[],
  augment_dim=9,
)
ADM = dict(
  arch="dhariwal_unet",
  precond="edm",
  img_resolution=4,
  in_channels=3,
  out_channels=3,
  model_channels=8,
  channel_mult=[1],
  num_blocks=1,
  attn_resolutions=[4],
  label_dim=10,
)
LATENT = dict(SONG, precond="edm", in_channels=4, out_channels=4, augment_dim=0)

slow = pytest.mark.slow
# The default suite runs one config (EMD + ADM + class labels); the rest are --runslow.
CASES = [
  pytest.param("imagenet64_emd", "", ADM, marks=slow),  # about 40 s: --runslow
  pytest.param("cifar10_sim", "", SONG, marks=slow),
  pytest.param("cifar10_sim_cond", "cond", dict(SONG, label_dim=10), marks=slow),
  pytest.param("ffhq64_sim", "", SONG, marks=slow),
  pytest.param("afhqv2_64_sim", "", SONG, marks=slow),
  pytest.param("imagenet128_emd", "", ADM, marks=slow),
  pytest.param("latent_t2i_emd", "", LATENT, marks=slow),
]


def _load_config(name: str, variant: str):
  path = os.path.join(REPO, "configs", name.replace("_cond", "") + ".py")
  spec = importlib.util.spec_from_file_location("cfg_" + name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(",".join(v for v in (variant, "tiny") if v))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """Builds (once per architecture) a randomly initialised tiny teacher checkpoint."""
  cache = {}

  def get(arch: dict) -> str:
    key = repr(sorted(arch.items()))
    if key not in cache:
      module = nets.build(arch)
      res, ch = arch["img_resolution"], arch["in_channels"]
      labels = jnp.zeros((1, arch["label_dim"])) if arch.get("label_dim") else None
      x = jnp.zeros((1, res, res, ch))
      params = jax.jit(module.init)(jax.random.PRNGKey(0), x, jnp.ones((1,)), labels)["params"]
      cache[key] = network.save(str(tmp_path_factory.mktemp("teacher") / "t"), arch, params, {"source": "test"})
    return cache[key]

  return get


@pytest.mark.parametrize("name, variant, arch", CASES)
def test_paper_config_runs_two_steps(name, variant, arch, teacher_dir, tmp_path):
  c = _load_config(name, variant)
  assert c.total_steps == 2
  c.teacher.checkpoint = teacher_dir(arch)
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  state = out["state"]
  assert int(state.step) == 2 and int(state.nonfinite_count) == 0
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(jax.device_get(state.gen_params)))
  assert os.path.exists(tmp_path / "run" / "export" / "generator.json")


def test_paper_configs_need_a_teacher():
  from emd_jax.config.validation import ConfigError

  c = _load_config("cifar10_sim", "")
  with pytest.raises(ConfigError, match="teacher.checkpoint"):
    train.validate_distill(c)

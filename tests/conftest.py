"""Test set-up: 8 fake CPU devices before JAX is first imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# One persistent compilation cache per test session: the same train step compiled by several
# tests (identical shapes) is built once.
# Under pytest-xdist the workers of one run share it (keyed by the run's id), so a step compiled in one
# worker is read from disk by the other.
_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_cache = os.path.join(tempfile.gettempdir(), f"emd-jax-cache-{_run_id}") if _run_id else None
jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get("EMD_TEST_JAX_CACHE") or _cache or tempfile.mkdtemp(prefix="emd-jax-cache-"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip_slow)


# ----------------------------------------------------------------------------
# Shared fixtures. The plain helpers behind them (tree comparisons, dotted config overrides, the
# recording optimizer, one step's gradients) are in tests/helpers.py, importable from any test module.


@pytest.fixture
def gmm_tiny():
  """`configs/gmm.py:tiny` with dotted overrides: `gmm_tiny(batch_size=32, **{"estep.gamma_z": 0.01})`."""
  import helpers

  return helpers.gmm_tiny


@pytest.fixture(scope="session")
def tiny_unet_teacher(tmp_path_factory) -> str:
  """Directory of an untrained one-level 16 x 16 x 1 SongUNet teacher (quality not under test)."""
  import helpers

  return helpers.save_tiny_unet_teacher(str(tmp_path_factory.mktemp("tiny_unet") / "teacher"))

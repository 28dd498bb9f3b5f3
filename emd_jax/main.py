"""The command line: `python -m emd_jax.main --config configs/<file>.py --workdir DIR`.

Any config field can be overridden as `--config.a.b=value`; the config is
locked, so an unknown key or a value of the wrong type stops the run before
anything is computed. `config.job` picks what runs: "distill" (default),
and further jobs registered in `JOBS`. Rerunning the same command resumes
from the latest checkpoint in DIR.
"""

from __future__ import annotations

import importlib

from absl import app, flags
from ml_collections import config_flags

from emd_jax.cli import UserError, run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (python, get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_COORD = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs off TPU).")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
_PID = flags.DEFINE_integer("process_id", -1, "This process' index (with --coordinator_address).")

# job name -> "module:function(config, workdir)"
JOBS = {
  "distill": "emd_jax.train:train_and_evaluate",
  "teacher": "emd_jax.teacher_train:train_and_evaluate",
  "ud2m": "emd_jax.posterior.train:train_and_evaluate",
}


def run(config, workdir: str) -> dict:
  job = config.get("job", "distill")
  if job not in JOBS:
    raise UserError(f"config.job: unknown job {job!r}; known: {sorted(JOBS)}")
  module_name, fn = JOBS[job].split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    raise UserError(f"config.job: job {job!r} is not available in this installation ({e})") from e
  return getattr(module, fn)(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  from emd_jax import parallel

  parallel.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  run(_CONFIG.value, _WORKDIR.value)


def entry():
  from emd_jax.config_validation import ConfigError
  from emd_jax.train import TrainingError

  run_app(main, (ConfigError, TrainingError))


if __name__ == "__main__":
  entry()

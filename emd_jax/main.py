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

from emd_jax.cli import UserError


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None) -> dict:
  """Defines the trainer's flags on `flag_values`; returns their holders by name.

  `sys_argv` is the command line the `--config.*` overrides are read from (default: `sys.argv`).
  """
  fv = flag_values
  return {
    "config": config_flags.DEFINE_config_file(
      "config", None, "Config file (python, get_config()).", flag_values=fv, lock_config=True, sys_argv=sys_argv
    ),
    "workdir": flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.", flag_values=fv),
    "coordinator_address": flags.DEFINE_string(
      "coordinator_address", "", "host:port of process 0 (multi-process runs off TPU).", flag_values=fv
    ),
    "num_processes": flags.DEFINE_integer(
      "num_processes", 0, "Number of processes (with --coordinator_address).", flag_values=fv
    ),
    "process_id": flags.DEFINE_integer(
      "process_id", -1, "This process' index (with --coordinator_address).", flag_values=fv
    ),
  }


# job name -> "module:function(config, workdir)"
JOBS = {
  "distill": "emd_jax.jobs.distill:train_and_evaluate",
  "teacher": "emd_jax.jobs.teacher:train_and_evaluate",
  "ud2m": "emd_jax.jobs.ud2m:train_and_evaluate",
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


def main(argv, holders: dict):
  f = holders
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = f["config"].value  # ml_collections reports a file that failed to load lazily, on first use
    if config is not None:
      config.get("job")
  except Exception as e:  # noqa: BLE001  (whatever the config file raised)
    raise UserError(f"--config: the config file failed to load: {type(e).__name__}: {e}") from e
  if config is None:
    raise app.UsageError("--config is required")
  if not f["workdir"].value:
    raise app.UsageError("--workdir is required")
  import jax

  from emd_jax.runtime import parallel, preemption

  parallel.initialize_distributed(f["coordinator_address"].value, f["num_processes"].value, f["process_id"].value)
  # Multi-process: JAX's preemption service owns SIGTERM; in-process (tests): the caller's handlers stay.
  if jax.process_count() == 1 and not holders.get("in_process"):
    preemption.exit_on_signal_outside_loop()
  run(config, f["workdir"].value)
  preemption.mark_finished()


def _user_errors() -> tuple[type[BaseException], ...]:
  from emd_jax.config.validation import ConfigError
  from emd_jax.jobs.distill import TrainingError

  return (ConfigError, TrainingError)


def run_in_process(argv: list[str]) -> int:
  """The command line without a new process (tests): fresh flags, returns the exit code.

  `argv` excludes the program name, e.g. `["--config", "configs/gmm.py:tiny", "--workdir", d]`.
  """
  from emd_jax import cli

  def define(fv, sys_argv):  # marked: the in-process run leaves the caller's signal handlers alone
    return {**define_flags(fv, sys_argv), "in_process": True}

  return cli.run_in_process("emd_jax.main", define, main, argv, _user_errors())


def entry():
  from emd_jax import cli

  cli.run_command(define_flags, main, _user_errors())


if __name__ == "__main__":
  entry()

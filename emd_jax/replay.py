"""Replay one distillation update exactly: its input state, its key, its metrics.

A skipped (non-finite) step is logged with its number N; its key is
`fold_in(base key, N - 1)` and its input is the state after update N - 1, so it
can be rebuilt from the newest checkpoint before N by rerunning the updates in
between (resume is bit-exact, see docs/reliability.md):

  python -m emd_jax.replay --config configs/gmm.py --workdir runs/gmm --step 1234

prints the update's metrics; from Python, `replay_step(config, workdir, step)`
also returns the input state and the key, to inspect in a notebook. Injected
faults (`config.debug.nan_at_steps`) are replayed too.
"""

from __future__ import annotations

import os

import jax
import ml_collections


def replay_step(config: ml_collections.ConfigDict, workdir: str, step: int) -> dict:
  """Recomputes update `step` (1-based) of the run in `workdir`.

  Returns `{"state": input state, "key": the update's key, "metrics": its metrics,
  "from_checkpoint": the step restored (None: from initialisation)}`.
  """
  from emd_jax.distill.state import create_state
  from emd_jax.errors import UserError
  from emd_jax.jobs import distill as train
  from emd_jax.runtime import checkpoint as ckpt_lib
  from emd_jax.runtime import faults, parallel, runner

  config = ml_collections.ConfigDict(config)
  train.validate_distill(config)
  if step is None or step < 1:
    raise UserError(f"--step: update numbers start at 1, got {step}")
  from emd_jax.formats import paths

  if not paths.isdir(workdir):
    raise UserError(f"--workdir {workdir}: no such run directory")
  ck_dir = os.path.join(workdir, "checkpoints")
  setup = train.build_setup(config)
  mesh = parallel.make_mesh(config.mesh)
  k_state, k_init, _ = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  abstract = train.abstract_state(setup, k_state)
  step_fn, state_sh, teacher_sh = train.sharded_step(setup, mesh, abstract)
  teacher = jax.device_put(setup.teacher.params, teacher_sh)
  plan = faults.FaultPlan.from_config(config.get("debug"))

  ck = ckpt_lib.Checkpointer(ck_dir) if paths.isdir(ck_dir) else None  # never creates the directory
  before = [s for s in ck.all_steps() if s < step] if ck else []
  if before:
    try:
      state, _ = ck.restore(before[-1], ckpt_lib.abstract_like(abstract, state_sh))
    except ckpt_lib.CorruptCheckpointError as e:
      raise UserError(
        f"--workdir {workdir}: checkpoint step {before[-1]} is unusable ({e}); nothing was changed"
      ) from e
    finally:
      ck.close()
  else:
    if ck:
      ck.close()
    params = train.initial_student_params(config, setup, k_init)
    init = lambda p: create_state(k_state, p, setup.tx_gen, setup.tx_fake)  # noqa: E731
    state = runner.sharded_init(init, state_sh, (params,), mesh)  # as run_job creates it
  for n in range(int(state.step) + 1, step):
    state, _ = step_fn(state, faults.poisoned(teacher) if plan.poison_step(n) else teacher)
  inputs = jax.device_get(state)
  key = jax.random.fold_in(jax.random.wrap_key_data(inputs.rng, impl="threefry2x32"), inputs.step)
  _, metrics = step_fn(state, faults.poisoned(teacher) if plan.poison_step(step) else teacher)
  return {
    "state": inputs,
    "key": key,
    "metrics": jax.device_get(metrics),
    "from_checkpoint": before[-1] if before else None,
  }


def define_flags(fv=None, sys_argv: list[str] | None = None) -> dict:
  """Defines the replay flags on `fv` (default: absl's global flags); returns their holders by name."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FLAGS if fv is None else fv
  return {
    "config": config_flags.DEFINE_config_file(
      "config", None, "The run's config file.", lock_config=True, flag_values=fv, sys_argv=sys_argv
    ),
    "workdir": flags.DEFINE_string("workdir", None, "The run's directory.", flag_values=fv),
    "step": flags.DEFINE_integer("step", None, "The update to replay (as logged).", flag_values=fv),
  }


def main(argv: list[str], holders: dict) -> None:
  from emd_jax.errors import UserError

  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("config", "workdir", "step"):
    if holders[name].value is None:
      raise UserError(f"--{name} is required")
  step = holders["step"].value
  out = replay_step(holders["config"].value, holders["workdir"].value, step)
  origin = f"checkpoint {out['from_checkpoint']}" if out["from_checkpoint"] is not None else "initialisation"
  print(f"update {step} replayed from {origin}; key data {jax.random.key_data(out['key']).tolist()}")
  for k, v in sorted(out["metrics"].items()):
    print(f"  {k} = {float(v):.6g}")


def _user_errors() -> tuple[type[BaseException], ...]:
  from emd_jax.config.validation import ConfigError

  return (ConfigError, ValueError)


def run_in_process(argv: list[str]) -> int:
  """The command line without a new process (tests): fresh flags, returns the exit code."""
  from emd_jax import cli

  return cli.run_in_process("emd_jax.replay", define_flags, main, argv, _user_errors())


def entry() -> None:
  from emd_jax import cli

  cli.run_command(define_flags, main, _user_errors())


if __name__ == "__main__":
  entry()

"""Create, set up, run, watch and delete Cloud TPU VM slices for emd_jax training.

  python launch/tpu_vm.py create  --name emd-v4 --zone us-central2-b --accelerator_type v4-64 --spot
  python launch/tpu_vm.py queued create --name emd-v4 --zone us-central2-b --spot --wait
  python launch/tpu_vm.py setup   --name emd-v4 --zone us-central2-b --copy_from .
  python launch/tpu_vm.py run     --name emd-v4 --zone us-central2-b \\
      --config configs/imagenet64_emd.py --bucket gs://my-bucket --run_name in64 \\
      [--restart_on_preemption --copy_from .] [--config.batch_size=512]
  python launch/tpu_vm.py logs    --name emd-v4 --zone us-central2-b --run_name in64 --follow
  python launch/tpu_vm.py delete  --name emd-v4 --zone us-central2-b

The workdir must be a gs:// path: every worker sees it, and the trainer writes all of it there
(Orbax checkpoints, TensorBoard events, PNG grids, the export with its _COMPLETE marker; see
docs/reliability.md, "Workdirs on object stores"). A teacher may also be read from gs://.

Every subcommand takes --dry_run, which prints the exact commands (one per line; notes are
`#` comments) and runs nothing. `--config.<field>=<value>` flags are passed to the trainer.
See launch/README.md.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

if __package__ in (None, ""):  # run as `python launch/tpu_vm.py`: make `launch` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import tpu_commands as tc  # noqa: E402
from launch.common import LaunchError, Runner, split_overrides  # noqa: E402

Sleep = Callable[[float], None]


# --------------------------------------------------------------------------------- flags


def _zone_flags() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  return p


def _tpu_flags() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, parents=[_zone_flags()])
  p.add_argument("--name", required=True, help="TPU VM (node) name")
  p.add_argument(
    "--queued",
    action="store_true",
    help="the slice is (to be) provisioned through a queued resource",
  )
  p.add_argument("--queued_id", default=None, help="queued-resource id (default: --name)")
  return p


def _provision_flags() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--accelerator_type", default="v4-64", help="e.g. v4-8, v4-64, v5litepod-16")
  p.add_argument(
    "--version",
    default="tpu-ubuntu2204-base",
    help="TPU runtime, e.g. tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e)",
  )
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible, cheap)")
  capacity.add_argument("--preemptible", action="store_true", help="legacy preemptible VMs")
  capacity.add_argument("--reserved", action="store_true", help="reserved capacity (queued only)")
  p.add_argument(
    "--valid_until_duration",
    default=None,
    help="queued only: stop waiting for capacity after this long, e.g. 6h",
  )
  return p


def _source_flags() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  src = p.add_mutually_exclusive_group()
  src.add_argument("--repo_url", default=None, help="git URL cloned (or updated) on each worker")
  src.add_argument("--copy_from", default=None, help="local checkout packed and copied instead")
  p.add_argument("--branch", default="main")
  p.add_argument("--remote_dir", default="$HOME/emd_jax", help="where the code lives on workers")
  p.add_argument("--python", default="python3", help="python on the workers")
  p.add_argument("--jax_spec", default="jax[tpu]", help="pip requirement for JAX on TPU")
  p.add_argument("--extra_pip", action="append", default=[], help="more pip requirements")
  return p


def _run_name_flags() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--run_name", default="emd", help="tmux session / log file / workdir name")
  p.add_argument(
    "--detach",
    choices=("tmux", "nohup"),
    default="tmux",
    help="how the trainer outlives the ssh session",
  )
  p.add_argument("--log_dir", default="$HOME/emd_logs", help="per-worker log directory")
  return p


def _run_flags() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--config", required=True, help="e.g. configs/imagenet64_emd.py")
  p.add_argument("--workdir", default=None, help="gs://bucket/path (default: <bucket>/runs/<run>)")
  p.add_argument("--bucket", default=None, help="gs://bucket for the workdir and compile cache")
  p.add_argument("--allow_local_workdir", action="store_true")
  p.add_argument(
    "--compilation_cache_dir",
    default=None,
    help="JAX compilation cache (default: <bucket>/jax_cache)",
  )
  p.add_argument("--no_compilation_cache", action="store_true")
  p.add_argument("--libtpu_init_args", default=None, help="TPU compiler flags (optional)")
  p.add_argument("--xla_flags", default=None, help="XLA_FLAGS (optional)")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the trainer")
  p.add_argument("--module", default="emd_jax.main", help="trainer module")
  p.add_argument(
    "--restart_on_preemption",
    action="store_true",
    help="stay in the foreground; when preempted, recreate + setup + run again",
  )
  p.add_argument("--poll_seconds", type=float, default=300.0)
  p.add_argument(
    "--retry_seconds",
    type=float,
    default=120.0,
    help="wait between failed recreation attempts (no capacity)",
  )
  p.add_argument("--max_restarts", type=int, default=100, help="preemptions to recover from")
  p.add_argument(
    "--max_relaunch_attempts",
    type=int,
    default=100,
    help="failed recreate/setup/run attempts per relaunch before giving up",
  )
  return p


def build_parser() -> argparse.ArgumentParser:
  """The CLI: create, queued {create,list,describe,wait,delete}, setup, run, stop, logs, delete."""
  parser = argparse.ArgumentParser(
    prog="tpu_vm.py",
    description=__doc__,
    allow_abbrev=False,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  tpu, prov, src, name = _tpu_flags(), _provision_flags(), _source_flags(), _run_name_flags()

  sub.add_parser("create", parents=[tpu, prov], help="tpu-vm create", allow_abbrev=False)
  queued = sub.add_parser("queued", help="queued resources", allow_abbrev=False)
  qsub = queued.add_subparsers(dest="action", required=True)
  qcreate = qsub.add_parser("create", parents=[tpu, prov], allow_abbrev=False)
  qcreate.add_argument("--wait", action="store_true", help="poll until ACTIVE")
  qcreate.add_argument("--poll_seconds", type=float, default=60.0)
  qsub.add_parser("list", parents=[_zone_flags()], allow_abbrev=False)
  for action in ("describe", "delete"):
    qsub.add_parser(action, parents=[tpu], allow_abbrev=False)
  qwait = qsub.add_parser("wait", parents=[tpu], allow_abbrev=False)
  qwait.add_argument("--poll_seconds", type=float, default=60.0)

  sub.add_parser("setup", parents=[tpu, src], help="install the code on all workers", allow_abbrev=False)
  sub.add_parser(
    "run",
    parents=[tpu, prov, src, name, _run_flags()],
    help="start training on all workers",
    allow_abbrev=False,
  )
  sub.add_parser("stop", parents=[tpu, name], help="stop the run on all workers", allow_abbrev=False)
  logs = sub.add_parser("logs", parents=[tpu, name], help="tail worker logs", allow_abbrev=False)
  logs.add_argument("--worker", default="0", help="worker index, or 'all'")
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true")
  sub.add_parser("delete", parents=[tpu], help="delete the TPU (or queued resource)", allow_abbrev=False)
  return parser


def tpu_spec(args: argparse.Namespace) -> tc.TpuSpec:
  """TpuSpec from parsed flags (provisioning flags take defaults where a subcommand lacks them)."""
  get = lambda key, default=None: getattr(args, key, default)
  return tc.TpuSpec(
    name=get("name", ""),
    zone=args.zone,
    project=args.project,
    accelerator_type=get("accelerator_type", "v4-64"),
    version=get("version", "tpu-ubuntu2204-base"),
    spot=get("spot", False),
    preemptible=get("preemptible", False),
    queued=get("queued", False) or args.command == "queued",
    queued_id=get("queued_id"),
    valid_until_duration=get("valid_until_duration"),
    reserved=get("reserved", False),
  )


def source_spec(args: argparse.Namespace) -> tc.SourceSpec:
  copy_from = str(pathlib.Path(args.copy_from).resolve()) if args.copy_from else None
  return tc.SourceSpec(
    remote_dir=args.remote_dir,
    repo_url=args.repo_url,
    branch=args.branch,
    copy_from=copy_from,
    python=args.python,
    jax_spec=args.jax_spec,
    extra_pip=tuple(args.extra_pip),
  )


def bucket_of(path: str) -> str | None:
  """gs://bucket/a/b -> gs://bucket."""
  if not path.startswith("gs://"):
    return None
  return "gs://" + path[len("gs://") :].split("/", 1)[0]


def run_spec(args: argparse.Namespace, overrides: Sequence[str] = ()) -> tc.RunSpec:
  """RunSpec for `run` (trainer, workdir, env) or, without --config, for `stop` / `logs`."""
  if getattr(args, "config", None) is None:
    return tc.RunSpec(config="", workdir="", run_name=args.run_name, detach=args.detach, log_dir=args.log_dir)
  if args.workdir is None and args.bucket is None:
    raise LaunchError("run needs --workdir gs://... or --bucket gs://...")
  workdir = args.workdir or tc.join_bucket(args.bucket, "runs", args.run_name)
  tc.workdir_check(workdir, args.allow_local_workdir)
  bucket = args.bucket or bucket_of(workdir)
  cache = None
  if not args.no_compilation_cache:
    cache = args.compilation_cache_dir or (tc.join_bucket(bucket, "jax_cache") if bucket else None)
  env = tc.default_env(cache, args.libtpu_init_args, args.xla_flags, tc.env_pairs(args.env))
  return tc.RunSpec(
    config=args.config,
    workdir=workdir,
    run_name=args.run_name,
    overrides=tuple(overrides),
    remote_dir=args.remote_dir,
    python=args.python,
    env=env,
    detach=args.detach,
    log_dir=args.log_dir,
    module=args.module,
  )


# ------------------------------------------------------------------------- state watching


def wait_until_ready(runner: Runner, spec: tc.TpuSpec, poll_seconds: float, sleep: Sleep = time.sleep) -> None:
  """Polls the queued resource (or node) until it is ready; raises if it fails or vanishes."""
  if runner.dry_run:
    runner.note(
      f"poll every {poll_seconds:g}s until the state is {'/'.join(tc.QUEUED_READY if spec.queued else tc.NODE_READY)}:"
    )
    runner.output(tc.state_cmd(spec))
    return
  while True:
    rc, state = runner.output(tc.state_cmd(spec))
    status = tc.classify_state(spec, state if rc == 0 else "")
    runner.note(f"{spec.qr_id if spec.queued else spec.name}: {state or 'not found'}")
    if status == "ready":
      return
    if status == "gone":
      raise LaunchError(f"{spec.name} will not become ready (state: {state or 'not found'})")
    sleep(poll_seconds)


def _provision(runner: Runner, spec: tc.TpuSpec, poll_seconds: float, sleep: Sleep) -> None:
  if spec.queued:
    runner.run(tc.queued_create_cmd(spec))
    wait_until_ready(runner, spec, poll_seconds, sleep)
  else:
    runner.run(tc.create_cmd(spec))


def relaunch(
  runner: Runner,
  spec: tc.TpuSpec,
  src: tc.SourceSpec,
  run: tc.RunSpec,
  retry_seconds: float,
  sleep: Sleep = time.sleep,
  max_attempts: int = 100,
) -> None:
  """Deletes what is left of the slice, recreates it, sets it up and starts the run again.

  A failed attempt (e.g. no spot capacity for a direct create) is retried every `retry_seconds`,
  at most `max_attempts` times; a queued resource waits in its queue instead, which does not
  count as failing. The trainer resumes from the latest checkpoint in the workdir by itself.
  """
  for attempt in range(1, max_attempts + 1):
    runner.run(tc.delete_cmd(spec), check=False)
    try:
      _provision(runner, spec, retry_seconds, sleep)
      for cmd in tc.setup_commands(spec, src) + tc.run_commands(spec, run):
        runner.run(cmd)
      return
    except (subprocess.CalledProcessError, LaunchError) as e:
      if runner.dry_run:
        raise
      why = e if isinstance(e, LaunchError) else f"`{shlex.join(e.cmd[:6])} ...` exit {e.returncode}"
      runner.note(f"relaunch attempt {attempt}/{max_attempts} failed: {why}")
      if attempt < max_attempts:
        sleep(retry_seconds)
  raise LaunchError(f"could not relaunch {spec.name} in {max_attempts} attempts")


def watch_and_relaunch(
  runner: Runner,
  spec: tc.TpuSpec,
  src: tc.SourceSpec,
  run: tc.RunSpec,
  poll_seconds: float,
  retry_seconds: float,
  max_restarts: int,
  sleep: Sleep = time.sleep,
  max_relaunch_attempts: int = 100,
) -> int:
  """Host-side loop: returns 0 when the trainer finishes; relaunches after each preemption.

  Each poll reads the slice's state. While it is ready, worker 0's exit file says whether the
  trainer finished (0: done) or crashed (non-zero: raise, since relaunching would not help).
  When the slice is preempted, suspended, failed or missing, it is recreated.
  """
  restarts = 0
  while True:
    rc, state = runner.output(tc.state_cmd(spec))
    status = tc.classify_state(spec, state if rc == 0 else "")
    if status == "ready":
      rc, code = runner.output(tc.exit_status_cmd(spec, run))
      if rc == 0 and code:
        if code == "0":
          runner.note(f"{run.run_name} finished after {restarts} relaunch(es)")
          return 0
        if code == "75":  # the trainer was preempted and saved a checkpoint: start it again in place
          if restarts >= max_restarts:
            raise LaunchError(f"gave up after {max_restarts} relaunches")
          restarts += 1
          runner.note(f"{run.run_name} exited 75 (preempted, checkpoint saved): rerun {restarts}/{max_restarts}")
          for cmd in tc.run_commands(spec, run):
            runner.run(cmd)
          continue
        raise LaunchError(f"trainer exited with status {code} on worker 0 (not a preemption); see `tpu_vm.py logs`")
    elif status == "gone":
      if restarts >= max_restarts:
        raise LaunchError(f"gave up after {max_restarts} relaunches")
      restarts += 1
      runner.note(f"{spec.name} is {state or 'missing'}: relaunch {restarts}/{max_restarts}")
      relaunch(runner, spec, src, run, retry_seconds, sleep, max_relaunch_attempts)
      continue
    sleep(poll_seconds)


def print_restart_plan(
  runner: Runner,
  spec: tc.TpuSpec,
  src: tc.SourceSpec,
  run: tc.RunSpec,
  poll_seconds: float,
  max_restarts: int,
) -> None:
  """The dry-run transcript of `watch_and_relaunch`: what it polls and what it reruns."""
  ready = tc.QUEUED_READY if spec.queued else tc.NODE_READY
  gone = tc.QUEUED_GONE if spec.queued else tc.NODE_GONE
  runner.note(f"restart loop (host side): every {poll_seconds:g}s read the state:")
  runner.output(tc.state_cmd(spec))
  runner.note(
    f"while {'/'.join(ready)}: read worker 0's exit code "
    "(empty: running, 0: done -> exit, other: error -> exit non-zero):"
  )
  runner.output(tc.exit_status_cmd(spec, run))
  runner.note(
    f"when {'/'.join(gone)} or not found (at most {max_restarts} times): "
    "delete, recreate, setup, run (the trainer resumes from its latest checkpoint):"
  )
  runner.run(tc.delete_cmd(spec))
  _provision(runner, spec, poll_seconds, time.sleep)
  for cmd in tc.setup_commands(spec, src) + tc.run_commands(spec, run):
    runner.run(cmd)


# ---------------------------------------------------------------------------- subcommands


def execute(args: argparse.Namespace, overrides: Sequence[str], runner: Runner, sleep: Sleep = time.sleep) -> int:
  """Runs (or prints) one parsed subcommand; returns the exit code."""
  spec = tpu_spec(args)
  if args.command == "create":
    runner.run(tc.create_cmd(spec))
  elif args.command == "queued":
    if args.action == "create":
      runner.run(tc.queued_create_cmd(spec))
      if args.wait:
        wait_until_ready(runner, spec, args.poll_seconds, sleep)
    elif args.action == "list":
      runner.run(tc.queued_list_cmd(spec))
    elif args.action == "describe":
      runner.run(tc.queued_describe_cmd(spec))
    elif args.action == "wait":
      wait_until_ready(runner, spec, args.poll_seconds, sleep)
    elif args.action == "delete":
      runner.run(tc.queued_delete_cmd(spec))
  elif args.command == "setup":
    for cmd in tc.setup_commands(spec, source_spec(args)):
      runner.run(cmd)
  elif args.command == "run":
    run = run_spec(args, overrides)
    src = source_spec(args)
    if args.restart_on_preemption and not (src.repo_url or src.copy_from):
      raise LaunchError("--restart_on_preemption needs --repo_url or --copy_from to set up the recreated slice")
    for cmd in tc.run_commands(spec, run):
      runner.run(cmd)
    if args.restart_on_preemption:
      if runner.dry_run:
        print_restart_plan(runner, spec, src, run, args.poll_seconds, args.max_restarts)
      else:
        return watch_and_relaunch(
          runner,
          spec,
          src,
          run,
          args.poll_seconds,
          args.retry_seconds,
          args.max_restarts,
          sleep,
          args.max_relaunch_attempts,
        )
  elif args.command == "stop":
    runner.run(tc.stop_cmd(spec, run_spec(args)))
  elif args.command == "logs":
    runner.run(tc.logs_cmd(spec, run_spec(args), args.worker, args.lines, args.follow))
  elif args.command == "delete":
    runner.run(tc.delete_cmd(spec))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Parses `argv`, runs the subcommand, and turns expected failures into one-line errors."""
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  try:
    overrides = split_overrides(extra)
    if overrides and args.command != "run":
      raise LaunchError("--config.<field> overrides only go with `run`")
    return execute(args, overrides, Runner(dry_run=args.dry_run))
  except (LaunchError, ValueError) as e:
    print(f"tpu_vm.py {args.command}: error: {e}", file=sys.stderr)
    return 2
  except subprocess.CalledProcessError as e:
    print(
      f"tpu_vm.py {args.command}: command failed with exit code {e.returncode}: {' '.join(map(str, e.cmd))}",
      file=sys.stderr,
    )
    return e.returncode or 1
  except KeyboardInterrupt:
    print("interrupted: the TPU and its run keep going (see `stop` / `delete`)", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())

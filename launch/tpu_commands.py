"""The gcloud command lines and remote shell scripts that `tpu_vm.py` runs.

Everything here is a pure function from small dataclasses to argv lists or bash text, so the
exact commands are testable without gcloud. Remote scripts are passed to
`gcloud compute tpus tpu-vm ssh --worker=all --command=<script>`; `$HOME` and `$(hostname)` in
them expand on each worker.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence

from launch.common import Command, main_command

# Node states (`tpu-vm describe --format=value(state)`) and queued-resource states
# (`queued-resources describe --format=value(state.state)`), grouped by what the loop does.
NODE_READY = ("READY",)
NODE_GONE = ("PREEMPTED", "TERMINATED", "STOPPED", "DELETING")
QUEUED_READY = ("ACTIVE",)
QUEUED_GONE = ("SUSPENDING", "SUSPENDED", "FAILED", "DELETING")


@dataclasses.dataclass(frozen=True)
class TpuSpec:
  """Which TPU slice, where, and how it is provisioned."""

  name: str
  zone: str
  project: str | None = None
  accelerator_type: str = "v4-64"
  version: str = "tpu-ubuntu2204-base"
  spot: bool = False
  preemptible: bool = False
  queued: bool = False  # provisioned through a queued resource (recreated the same way)
  queued_id: str | None = None  # queued-resource id; defaults to the node name
  valid_until_duration: str | None = None  # e.g. "6h": give up waiting for capacity after this
  reserved: bool = False

  @property
  def qr_id(self) -> str:
    return self.queued_id or self.name


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """Where each worker gets the code, and what it installs."""

  remote_dir: str = "$HOME/emd_jax"
  repo_url: str | None = None  # git clone/pull this ...
  branch: str = "main"
  copy_from: str | None = None  # ... or pack this local checkout and scp it
  tarball: str = "/tmp/emd_jax_src.tar.gz"  # local path of the packed checkout
  python: str = "python3"
  jax_spec: str = "jax[tpu]"
  extra_pip: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What to run on every worker, and where it logs."""

  config: str
  workdir: str
  run_name: str = "emd"
  overrides: tuple[str, ...] = ()
  remote_dir: str = "$HOME/emd_jax"
  python: str = "python3"
  env: Mapping[str, str] = dataclasses.field(default_factory=dict)
  detach: str = "tmux"  # "tmux" or "nohup"
  log_dir: str = "$HOME/emd_logs"
  module: str = "emd_jax.main"

  @property
  def log_file(self) -> str:
    return f"{self.log_dir}/{self.run_name}.$(hostname).log"

  @property
  def exit_file(self) -> str:
    return f"{self.log_dir}/{self.run_name}.exit"

  @property
  def pid_file(self) -> str:
    return f"{self.log_dir}/{self.run_name}.pid"


def default_env(
  bucket_cache: str | None,
  libtpu_init_args: str | None = None,
  xla_flags: str | None = None,
  extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
  """Environment for the trainer on a TPU VM.

  Args:
    bucket_cache: JAX persistent compilation cache directory (a gs:// path shared by all
      workers and by relaunches, so a resumed run skips recompiling), or None.
    libtpu_init_args: TPU compiler flags (LIBTPU_INIT_ARGS), optional.
    xla_flags: host XLA flags (XLA_FLAGS), optional.
    extra: further KEY=VALUE pairs; they win over the defaults.
  """
  env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
  if bucket_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = bucket_cache
  if libtpu_init_args:
    env["LIBTPU_INIT_ARGS"] = libtpu_init_args
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  env.update(extra or {})
  return env


def _gcloud(spec: TpuSpec, *parts: str) -> Command:
  cmd = ["gcloud", "compute", "tpus", *parts, f"--zone={spec.zone}"]
  if spec.project:
    cmd.append(f"--project={spec.project}")
  return cmd


# ----------------------------------------------------------------------------- TPU VM nodes


def create_cmd(spec: TpuSpec) -> Command:
  """`tpu-vm create`: provisions the slice directly (fails at once if there is no capacity)."""
  cmd = _gcloud(spec, "tpu-vm", "create", spec.name)
  cmd += [f"--accelerator-type={spec.accelerator_type}", f"--version={spec.version}"]
  if spec.spot:
    cmd.append("--spot")
  if spec.preemptible:
    cmd.append("--preemptible")
  return cmd


def describe_cmd(spec: TpuSpec) -> Command:
  """Prints the node's state (READY, CREATING, PREEMPTED, ...)."""
  return _gcloud(spec, "tpu-vm", "describe", spec.name) + ["--format=value(state)"]


def delete_cmd(spec: TpuSpec) -> Command:
  """Deletes the node, or the queued resource and its node when `spec.queued`."""
  if spec.queued:
    return queued_delete_cmd(spec)
  return _gcloud(spec, "tpu-vm", "delete", spec.name) + ["--quiet"]


def ssh_cmd(spec: TpuSpec, script: str, worker: str = "all") -> Command:
  """Runs `script` (bash) on one worker or, with worker="all", on every worker of the slice."""
  return _gcloud(spec, "tpu-vm", "ssh", spec.name) + [f"--worker={worker}", f"--command={script}"]


def scp_cmd(spec: TpuSpec, local: str, remote: str, worker: str = "all") -> Command:
  """Copies a local file to `remote` (relative to $HOME) on the workers."""
  return _gcloud(spec, "tpu-vm", "scp", local, f"{spec.name}:{remote}") + [f"--worker={worker}"]


# ------------------------------------------------------------------------- queued resources


def queued_create_cmd(spec: TpuSpec) -> Command:
  """`queued-resources create`: waits in line for capacity (spot or reserved) instead of failing."""
  if spec.preemptible:
    raise ValueError("queued resources take --spot (or --reserved), not --preemptible")
  cmd = _gcloud(spec, "queued-resources", "create", spec.qr_id)
  cmd += [
    f"--node-id={spec.name}",
    f"--accelerator-type={spec.accelerator_type}",
    f"--runtime-version={spec.version}",
  ]
  if spec.spot:
    cmd.append("--spot")
  if spec.reserved:
    cmd.append("--reserved")
  if spec.valid_until_duration:
    cmd.append(f"--valid-until-duration={spec.valid_until_duration}")
  return cmd


def queued_describe_cmd(spec: TpuSpec) -> Command:
  """Prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...)."""
  return _gcloud(spec, "queued-resources", "describe", spec.qr_id) + ["--format=value(state.state)"]


def queued_list_cmd(spec: TpuSpec) -> Command:
  return _gcloud(spec, "queued-resources", "list")


def queued_delete_cmd(spec: TpuSpec) -> Command:
  """Deletes the queued resource; --force also deletes its TPU node."""
  return _gcloud(spec, "queued-resources", "delete", spec.qr_id) + ["--force", "--quiet"]


def state_cmd(spec: TpuSpec) -> Command:
  """The command whose output the restart loop watches."""
  return queued_describe_cmd(spec) if spec.queued else describe_cmd(spec)


def classify_state(spec: TpuSpec, state: str) -> str:
  """'ready', 'gone' (preempted/failed/missing: recreate) or 'pending' (keep waiting)."""
  ready, gone = (QUEUED_READY, QUEUED_GONE) if spec.queued else (NODE_READY, NODE_GONE)
  if state in ready:
    return "ready"
  if not state or state in gone:
    return "gone"
  return "pending"


# ---------------------------------------------------------------------------------- setup


def pack_cmd(src: SourceSpec) -> Command:
  """Packs the local checkout (no .git, run outputs or caches) for `scp`."""
  assert src.copy_from is not None
  excludes = [".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".venv"]
  return ["tar", "-czf", src.tarball] + [f"--exclude={e}" for e in excludes] + ["-C", src.copy_from, "."]


def setup_script(src: SourceSpec) -> str:
  """Bash run on every worker: fetch the code into `remote_dir`, then pip-install it with JAX."""
  d = src.remote_dir
  lines = ["set -euo pipefail"]
  if src.copy_from:
    remote_tar = "$HOME/" + src.tarball.rsplit("/", 1)[-1]
    lines += [f"mkdir -p {d}", f"tar -xzf {remote_tar} -C {d}"]
  elif src.repo_url:
    url, branch = shlex.quote(src.repo_url), shlex.quote(src.branch)
    lines += [
      f"if [ -d {d}/.git ]; then git -C {d} fetch --depth=1 origin {branch} && "
      f"git -C {d} checkout --force FETCH_HEAD; "
      f"else git clone --depth=1 --branch {branch} {url} {d}; fi"
    ]
  else:
    raise ValueError("setup needs --repo_url or --copy_from")
  pip = f"{src.python} -m pip install --quiet"
  packages = " ".join(shlex.quote(p) for p in (src.jax_spec, *src.extra_pip))
  lines += [
    f"{pip} --upgrade pip",
    f"{pip} -e {d} {packages}",
    f"{src.python} -c 'import emd_jax, jax; print(\"jax\", jax.__version__)'",
  ]
  return "; ".join(lines)


def setup_commands(spec: TpuSpec, src: SourceSpec) -> list[Command]:
  """Local packing + copy (with --copy_from), then the per-worker install."""
  cmds = []
  if src.copy_from:
    cmds += [pack_cmd(src), scp_cmd(spec, src.tarball, src.tarball.rsplit("/", 1)[-1])]
  return cmds + [ssh_cmd(spec, setup_script(src))]


# ------------------------------------------------------------------------------------ run


def trainer_script(run: RunSpec) -> str:
  """The detached part: env, trainer, log to a per-worker file, exit code to a file."""
  exports = "".join(f"export {k}={shlex.quote(v)} && " for k, v in run.env.items())
  trainer = shlex.join(main_command(run.python, run.config, run.workdir, run.overrides, run.module))
  return f"cd {run.remote_dir} && {exports}{trainer} >> {run.log_file} 2>&1; echo $? > {run.exit_file}"


def stop_script(run: RunSpec) -> str:
  """Ends this run's previous session on a worker, if any (by tmux session name or pid file)."""
  if run.detach == "tmux":
    return f"tmux kill-session -t {run.run_name} 2>/dev/null || true"
  return f"if [ -f {run.pid_file} ]; then kill -- -$(cat {run.pid_file}) 2>/dev/null || true; rm -f {run.pid_file}; fi"


def run_script(run: RunSpec) -> str:
  """Bash run on every worker: stop a previous session, start the trainer detached."""
  inner = shlex.quote(trainer_script(run))
  if run.detach == "tmux":
    start = f"tmux new-session -d -s {run.run_name} bash -c {inner}"
  elif run.detach == "nohup":
    start = f"setsid nohup bash -c {inner} > /dev/null 2>&1 < /dev/null & echo $! > {run.pid_file}"
  else:
    raise ValueError(f"detach must be 'tmux' or 'nohup', not {run.detach!r}")
  return "; ".join(
    [
      f"mkdir -p {run.log_dir}",
      stop_script(run),
      f"rm -f {run.exit_file}",
      start,
      f"echo started {run.run_name} on $(hostname), log {run.log_file}",
    ]
  )


def run_commands(spec: TpuSpec, run: RunSpec) -> list[Command]:
  return [ssh_cmd(spec, run_script(run))]


def exit_status_cmd(spec: TpuSpec, run: RunSpec) -> Command:
  """Prints worker 0's trainer exit code, or nothing while it is still running."""
  return ssh_cmd(spec, f"cat {run.exit_file} 2>/dev/null || true", worker="0")


def logs_cmd(spec: TpuSpec, run: RunSpec, worker: str = "0", lines: int = 100, follow: bool = False) -> Command:
  """Tails the per-worker log file(s)."""
  tail = f"tail -n {lines}" + (" -F" if follow else "")
  return ssh_cmd(spec, f"{tail} {run.log_file}", worker=worker)


def stop_cmd(spec: TpuSpec, run: RunSpec) -> Command:
  return ssh_cmd(spec, stop_script(run))


def workdir_check(workdir: str, allow_local: bool = False) -> None:
  """Every worker must see the same workdir: on a pod that means a bucket."""
  if not workdir.startswith("gs://") and not allow_local:
    raise ValueError(
      f"--workdir {workdir!r} is not a gs:// path: on a multi-host slice each worker has its own "
      "disk, so checkpoints and resume need a bucket (pass --allow_local_workdir to override)"
    )


def join_bucket(bucket: str, *parts: str) -> str:
  return "/".join([bucket.rstrip("/"), *parts])


def env_pairs(pairs: Sequence[str]) -> dict[str, str]:
  """Parses repeated KEY=VALUE flags."""
  env = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key:
      raise ValueError(f"--env expects KEY=VALUE, got {pair!r}")
    env[key] = value
  return env

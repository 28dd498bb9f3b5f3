"""Launchers: exact dry-run commands for every TPU VM subcommand, the restart loop's logic with a
scripted gcloud, and the local multi-process launcher (dry run and real child processes)."""

import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from launch import local, tpu_vm  # noqa: E402
from launch import tpu_commands as tc  # noqa: E402
from launch.common import LaunchError, Runner  # noqa: E402

TPU = ["--name", "emd-v4", "--zone", "us-central2-b"]
RUN = ["--config", "configs/imagenet64_emd.py", "--bucket", "gs://emd-bkt", "--run_name", "in64"]


def dry(capsys, *argv: str) -> list[list[str]]:
  """Runs tpu_vm.py with --dry_run; returns the printed commands as argv lists (no comments)."""
  assert tpu_vm.main([*argv, "--dry_run"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  return [shlex.split(line) for line in lines if not line.startswith("#")]


def dry_text(capsys, *argv: str) -> str:
  assert tpu_vm.main([*argv, "--dry_run"]) == 0
  return capsys.readouterr().out


def flag(cmd: list[str], name: str) -> str:
  """The value of `--name=value` in cmd."""
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def test_create(capsys):
  (cmd,) = dry(capsys, "create", *TPU, "--accelerator_type", "v4-64", "--spot", "--project", "p1")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "emd-v4"]
  assert flag(cmd, "--zone") == "us-central2-b"
  assert flag(cmd, "--accelerator-type") == "v4-64"
  assert flag(cmd, "--version") == "tpu-ubuntu2204-base"
  assert flag(cmd, "--project") == "p1"
  assert "--spot" in cmd and "--preemptible" not in cmd
  (cmd,) = dry(capsys, "create", *TPU, "--preemptible")
  assert "--preemptible" in cmd and "--spot" not in cmd


def test_queued_create_wait_list_describe_delete(capsys):
  cmds = dry(capsys, "queued", "create", *TPU, "--spot", "--valid_until_duration", "6h", "--wait")
  create, poll = cmds
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "emd-v4"]
  assert flag(create, "--node-id") == "emd-v4"
  assert flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
  assert flag(create, "--accelerator-type") == "v4-64"
  assert flag(create, "--valid-until-duration") == "6h"
  assert "--spot" in create
  assert poll[3:6] == ["queued-resources", "describe", "emd-v4"]
  assert flag(poll, "--format") == "value(state.state)"
  (lst,) = dry(capsys, "queued", "list", "--zone", "us-central2-b")
  assert lst[3:5] == ["queued-resources", "list"]
  (desc,) = dry(capsys, "queued", "describe", *TPU, "--queued_id", "qr1")
  assert desc[3:6] == ["queued-resources", "describe", "qr1"]
  (delete,) = dry(capsys, "queued", "delete", *TPU)
  assert delete[3:6] == ["queued-resources", "delete", "emd-v4"] and "--force" in delete
  assert tpu_vm.main(["queued", "create", *TPU, "--preemptible", "--dry_run"]) == 2


def test_setup_copy_from(capsys, tmp_path):
  pack, scp, ssh = dry(capsys, "setup", *TPU, "--copy_from", str(tmp_path))
  assert pack[:3] == ["tar", "-czf", "/tmp/emd_jax_src.tar.gz"] and str(tmp_path) in pack
  assert "--exclude=.git" in pack
  assert scp[3:6] == ["tpu-vm", "scp", "/tmp/emd_jax_src.tar.gz"]
  assert flag(scp, "--worker") == "all"
  assert ssh[3:6] == ["tpu-vm", "ssh", "emd-v4"] and flag(ssh, "--worker") == "all"
  script = flag(ssh, "--command")
  assert "tar -xzf $HOME/emd_jax_src.tar.gz" in script
  assert "pip install --quiet -e $HOME/emd_jax 'jax[tpu]'" in script


def test_setup_repo_url(capsys):
  (ssh,) = dry(capsys, "setup", *TPU, "--repo_url", "https://github.com/me/emd_jax.git", "--branch", "dev")
  script = flag(ssh, "--command")
  assert "git clone --depth=1 --branch dev https://github.com/me/emd_jax.git" in script
  assert flag(ssh, "--worker") == "all"
  assert tpu_vm.main(["setup", *TPU, "--dry_run"]) == 2  # no source given


def test_run(capsys):
  (ssh,) = dry(capsys, "run", *TPU, *RUN, "--config.training.batch_size=512", "--env", "A=b c")
  assert ssh[3:6] == ["tpu-vm", "ssh", "emd-v4"]
  assert flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == "us-central2-b"
  script = flag(ssh, "--command")
  assert "tmux new-session -d -s in64" in script
  # The detached trainer command, once unquoted, carries config, workdir, overrides and env.
  inner = shlex.split(script.split("bash -c ", 1)[1].split("; echo started", 1)[0])[0]
  assert (
    "python3 -m emd_jax.main --config configs/imagenet64_emd.py "
    "--workdir gs://emd-bkt/runs/in64 --config.training.batch_size=512"
  ) in inner
  assert "export JAX_COMPILATION_CACHE_DIR=gs://emd-bkt/jax_cache" in inner
  assert "export TF_CPP_MIN_LOG_LEVEL=2" in inner and "export A='b c'" in inner
  assert ">> $HOME/emd_logs/in64.$(hostname).log 2>&1" in inner  # one log per worker
  assert "echo $? > $HOME/emd_logs/in64.exit" in inner
  for text in (script, inner):
    subprocess.run(["bash", "-n", "-c", text], check=True)  # both parse as bash


def test_run_nohup_explicit_workdir(capsys):
  (ssh,) = dry(
    capsys,
    "run",
    *TPU,
    "--config",
    "configs/imagenet64_emd.py",
    "--workdir",
    "gs://b2/exp/1",
    "--detach",
    "nohup",
    "--no_compilation_cache",
  )
  script = flag(ssh, "--command")
  assert "setsid nohup bash -c" in script and "$HOME/emd_logs/emd.pid" in script
  assert "--workdir gs://b2/exp/1" in script and "JAX_COMPILATION_CACHE_DIR" not in script
  subprocess.run(["bash", "-n", "-c", script], check=True)
  (ssh,) = dry(capsys, "run", *TPU, "--config", "c.py", "--workdir", "gs://b2/exp/1")
  assert "JAX_COMPILATION_CACHE_DIR=gs://b2/jax_cache" in flag(ssh, "--command")


def test_run_restart_on_preemption_shows_loop(capsys, tmp_path):
  text = dry_text(
    capsys,
    "run",
    *TPU,
    *RUN,
    "--restart_on_preemption",
    "--queued",
    "--spot",
    "--copy_from",
    str(tmp_path),
    "--poll_seconds",
    "120",
  )
  first, loop = text.split("# restart loop", 1)
  assert "--worker=all" in first and "tmux new-session" in first
  assert "every 120s" in loop
  cmds = [shlex.split(x) for x in loop.splitlines()[1:] if not x.startswith("#")]
  verbs = [tuple(c[3:5]) if c[0] == "gcloud" else (c[0],) for c in cmds]
  assert verbs == [
    ("queued-resources", "describe"),  # poll state
    ("tpu-vm", "ssh"),  # worker 0's exit code
    ("queued-resources", "delete"),  # relaunch: delete, create, wait, setup, run
    ("queued-resources", "create"),
    ("queued-resources", "describe"),
    ("tar",),
    ("tpu-vm", "scp"),
    ("tpu-vm", "ssh"),
    ("tpu-vm", "ssh"),
  ]
  assert flag(cmds[1], "--worker") == "0" and "--spot" in cmds[3]
  assert "config configs/imagenet64_emd.py" in flag(cmds[-1], "--command")
  # Without a code source the recreated slice could not be set up.
  assert tpu_vm.main(["run", *TPU, *RUN, "--restart_on_preemption", "--dry_run"]) == 2


def test_stop_logs_delete(capsys):
  (stop,) = dry(capsys, "stop", *TPU, "--run_name", "in64")
  assert flag(stop, "--command") == "tmux kill-session -t in64 2>/dev/null || true"
  assert flag(stop, "--worker") == "all"
  (logs,) = dry(capsys, "logs", *TPU, "--run_name", "in64", "--worker", "all", "--follow")
  assert flag(logs, "--worker") == "all"
  assert flag(logs, "--command") == "tail -n 100 -F $HOME/emd_logs/in64.$(hostname).log"
  (delete,) = dry(capsys, "delete", *TPU)
  assert delete[3:6] == ["tpu-vm", "delete", "emd-v4"] and "--quiet" in delete
  (delete,) = dry(capsys, "delete", *TPU, "--queued")
  assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


def test_errors(capsys, monkeypatch, tmp_path):
  assert tpu_vm.main(["run", *TPU, "--config", "c.py", "--workdir", "/tmp/x", "--dry_run"]) == 2
  assert "gs://" in capsys.readouterr().err
  assert tpu_vm.main(["create", *TPU, "--config.x=1", "--dry_run"]) == 2
  assert tpu_vm.main(["run", *TPU, *RUN, "--bogus", "--dry_run"]) == 2
  monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud here
  assert tpu_vm.main(["create", *TPU]) == 2
  assert "Google Cloud SDK" in capsys.readouterr().err


class ScriptedRunner(Runner):
  """Stands in for gcloud: answers state / exit-code queries from a script, records commands."""

  def __init__(self, answers):
    super().__init__(dry_run=False, out=io.StringIO())
    self.answers = list(answers)
    self.ran = []

  def run(self, cmd, check=True):
    self.ran.append(cmd[3:5] if cmd[0] == "gcloud" else cmd[:1])
    return 0

  def output(self, cmd):
    self.ran.append(cmd[3:5])
    return self.answers.pop(0)


def test_watch_and_relaunch_recreates_after_preemption():
  spec = tc.TpuSpec(name="emd-v4", zone="z", spot=True)
  src = tc.SourceSpec(repo_url="https://x/emd_jax.git")
  run = tc.RunSpec(config="c.py", workdir="gs://b/w")
  runner = ScriptedRunner(
    [
      (0, "READY"),
      (0, ""),  # running
      (0, "PREEMPTED"),  # -> delete, create, setup, run
      (0, "CREATING"),  # pending
      (0, "READY"),
      (0, "0"),  # finished
    ]
  )
  sleeps = []
  assert tpu_vm.watch_and_relaunch(runner, spec, src, run, 5, 1, 3, sleeps.append) == 0
  assert runner.ran == [
    ["tpu-vm", "describe"],
    ["tpu-vm", "ssh"],
    ["tpu-vm", "describe"],
    ["tpu-vm", "delete"],
    ["tpu-vm", "create"],
    ["tpu-vm", "ssh"],
    ["tpu-vm", "ssh"],
    ["tpu-vm", "describe"],
    ["tpu-vm", "describe"],
    ["tpu-vm", "ssh"],
  ]
  assert sleeps == [5, 5]
  assert not runner.answers


def test_watch_and_relaunch_stops_on_crash_and_restart_limit():
  spec = tc.TpuSpec(name="n", zone="z", queued=True, spot=True)
  src = tc.SourceSpec(repo_url="u")
  run = tc.RunSpec(config="c.py", workdir="gs://b/w")
  runner = ScriptedRunner([(0, "ACTIVE"), (0, "1")])
  with pytest.raises(LaunchError, match="status 1"):
    tpu_vm.watch_and_relaunch(runner, spec, src, run, 0, 0, 3, lambda s: None)
  # A missing resource (describe fails) counts as preempted; max_restarts=0 gives up at once.
  runner = ScriptedRunner([(1, "")])
  with pytest.raises(LaunchError, match="gave up"):
    tpu_vm.watch_and_relaunch(runner, spec, src, run, 0, 0, 0, lambda s: None)


# --------------------------------------------------------------------------- local launcher


def test_local_dry_run():
  out = io.StringIO()
  argv = [
    "--num_processes",
    "3",
    "--devices_per_process",
    "4",
    "--config",
    "configs/gmm.py",
    "--workdir",
    "/tmp/w",
    "--config.total_steps=3",
    "--dry_run",
  ]
  assert local.main(argv, out=out) == 0
  lines = out.getvalue().strip().splitlines()
  assert len(lines) == 3
  coords, ids = set(), []
  for line in lines:
    argv = shlex.split(line)
    assert "JAX_PLATFORMS=cpu" in argv
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in argv
    i = argv.index("-m")
    assert argv[i + 1 : i + 6] == [
      "emd_jax.main",
      "--config",
      "configs/gmm.py",
      "--workdir",
      "/tmp/w",
    ]
    assert "--config.total_steps=3" in argv
    assert argv[argv.index("--num_processes") + 1] == "3"
    coords.add(argv[argv.index("--coordinator_address") + 1])
    ids.append(argv[argv.index("--process_id") + 1])
  assert ids == ["0", "1", "2"]
  (coord,) = coords
  assert coord.startswith("127.0.0.1:") and int(coord.split(":")[1]) > 0


def test_local_process_env_replaces_device_count():
  env = local.process_env(2, {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
  assert "XLA_FLAGS" not in local.process_env(None, {})


CHILD = textwrap.dedent("""
  import os, sys, time
  pid = int(sys.argv[sys.argv.index("--process_id") + 1])
  print("child", pid, "of", sys.argv[sys.argv.index("--num_processes") + 1],
        os.environ["JAX_PLATFORMS"], flush=True)
  if pid == int(os.environ.get("FAIL_ID", "-1")):
    deadline = time.time() + 10  # fail once the others are up and have said who they are
    while time.time() < deadline and not os.path.exists(os.path.join(os.environ["PID_DIR"], "0")):
      time.sleep(0.05)
    sys.exit(7)
  if os.environ.get("FAIL_ID"):
    with open(os.path.join(os.environ["PID_DIR"], str(pid) + ".tmp"), "w") as f:
      f.write(str(os.getpid()))
    os.rename(f.name, os.path.join(os.environ["PID_DIR"], str(pid)))
    time.sleep(60)  # would hang the test if the launcher did not end it
""")


@pytest.fixture()
def child(tmp_path):
  path = tmp_path / "child.py"
  path.write_text(CHILD)
  return f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}"


def test_local_runs_children_and_prefixes_output(child, monkeypatch):
  monkeypatch.delenv("FAIL_ID", raising=False)
  out = io.StringIO()
  assert local.main(["--num_processes", "2", "--command", child], out=out) == 0
  lines = out.getvalue().splitlines()
  assert "[0] child 0 of 2 cpu" in lines and "[1] child 1 of 2 cpu" in lines


def test_local_failure_propagates_and_ends_others(child, monkeypatch, tmp_path):
  monkeypatch.setenv("FAIL_ID", "1")
  monkeypatch.setenv("PID_DIR", str(tmp_path))
  out = io.StringIO()
  start = time.monotonic()
  code = local.main(
    [
      "--num_processes",
      "2",
      "--command",
      child,
      "--grace_seconds",
      "2",
      "--log_dir",
      str(tmp_path / "logs"),
    ],
    out=out,
  )
  assert code == 7
  assert time.monotonic() - start < 20
  assert "process 1 exited with 7" in out.getvalue()
  assert (tmp_path / "logs" / "process_0.log").read_text().startswith("child 0")
  survivor = int((tmp_path / "0").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(survivor, 0)  # ended and reaped by the launcher


FAKE_GCLOUD = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args or "--worker=0" in args:  # state / exit-code queries: scripted answers
  with open(os.environ["FAKE_ANSWERS"]) as f:
    answers = f.read().splitlines()
  if not answers:
    sys.exit("fake gcloud: no scripted answer left")
  with open(os.environ["FAKE_ANSWERS"], "w") as f:
    f.write("\\n".join(answers[1:]))
  print(answers[0])
"""


def test_run_restart_on_preemption_with_fake_gcloud(tmp_path, monkeypatch):
  """The real (non-dry) path: subprocess calls, state parsing, relaunch, clean finish."""
  gcloud = tmp_path / "bin" / "gcloud"
  gcloud.parent.mkdir()
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  (tmp_path / "answers").write_text("READY\n\nPREEMPTED\nREADY\n0")
  monkeypatch.setenv("PATH", f"{gcloud.parent}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log"))
  monkeypatch.setenv("FAKE_ANSWERS", str(tmp_path / "answers"))
  argv = [
    "run",
    *TPU,
    *RUN,
    "--restart_on_preemption",
    "--repo_url",
    "u",
    "--spot",
    "--poll_seconds",
    "0",
    "--retry_seconds",
    "0",
    "--max_restarts",
    "2",  # a regression must not loop for long
    "--max_relaunch_attempts",
    "2",
  ]
  assert tpu_vm.main(argv) == 0
  calls = [json.loads(x) for x in (tmp_path / "log").read_text().splitlines()]
  assert [c[2:4] for c in calls] == [
    ["tpu-vm", "ssh"],  # run
    ["tpu-vm", "describe"],
    ["tpu-vm", "ssh"],  # READY, still running
    ["tpu-vm", "describe"],  # PREEMPTED
    ["tpu-vm", "delete"],
    ["tpu-vm", "create"],
    ["tpu-vm", "ssh"],
    ["tpu-vm", "ssh"],
    ["tpu-vm", "describe"],
    ["tpu-vm", "ssh"],
  ]  # READY, exit code 0
  assert "--spot" in calls[5] and "--worker=all" in calls[6]


def test_watch_and_relaunch_reruns_after_trainer_preemption_exit_75():
  """Exit 75 means the trainer checkpointed on SIGTERM: rerun it in place, then finish."""
  spec = tc.TpuSpec(name="n", zone="z", spot=True)
  src = tc.SourceSpec(repo_url="u")
  run = tc.RunSpec(config="c.py", workdir="gs://b/w")
  runner = ScriptedRunner([(0, "READY"), (0, "75"), (0, "READY"), (0, "0")])
  assert tpu_vm.watch_and_relaunch(runner, spec, src, run, 0, 0, 3, lambda s: None) == 0
  assert "exited 75" in runner.out.getvalue()
  runner = ScriptedRunner([(0, "READY"), (0, "75")])
  with pytest.raises(LaunchError, match="gave up"):
    tpu_vm.watch_and_relaunch(runner, spec, src, run, 0, 0, 0, lambda s: None)


def test_documented_config_overrides_name_real_fields():
  """Every `--config.<field>=` in the launchers' docs and docstrings is a field the locked config accepts."""
  from emd_jax.config.defaults import distill_config

  fields = set()
  for rel in ("launch/README.md", "launch/tpu_vm.py", "launch/local.py"):
    text = (pathlib.Path(__file__).resolve().parents[1] / rel).read_text()
    fields |= {m for m in re.findall(r"--config\.([a-z_][a-z0-9_.]*)=", text)}
  assert fields, "no documented overrides found"
  config = distill_config()
  for field in sorted(fields):
    node = config
    for part in field.split("."):
      assert part in node, f"--config.{field}: no such field ({part!r} missing)"
      node = node[part]

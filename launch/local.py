"""Local multi-process launcher: N trainer processes on this machine, one JAX distributed job.

  python launch/local.py --num_processes 2 --devices_per_process 4 \\
      --config configs/gmm.py --workdir /tmp/emd_mp [--config.total_steps=10]

starts `python -m emd_jax.main --config ... --workdir ... --coordinator_address 127.0.0.1:PORT
--num_processes N --process_id i` for i = 0..N-1 on CPU (`JAX_PLATFORMS=cpu`, and
`XLA_FLAGS=--xla_force_host_platform_device_count=K` with --devices_per_process K), prefixes
each output line with `[i]`, waits, and exits non-zero as soon as one process fails (after
ending the others). `--dry_run` prints the N commands. `--command "python my_child.py"`
replaces `python -m <module>` (the distributed flags are still appended), for tests and tools.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

if __package__ in (None, ""):  # run as `python launch/local.py`: make `launch` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
  DEFAULT_MODULE,
  Command,
  LaunchError,
  free_port,
  main_command,
  shell_line,
  split_overrides,
)

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="local.py",
    description=__doc__,
    allow_abbrev=False,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=None, help="fake CPU devices per process (XLA_FLAGS)")
  p.add_argument("--config", default=None, help="e.g. configs/gmm.py")
  p.add_argument("--workdir", default=None, help="shared by all processes")
  p.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
  p.add_argument("--module", default=DEFAULT_MODULE, help="trainer module run with python -m")
  p.add_argument("--command", default=None, help='replaces `python -m <module>`, e.g. "python child.py"')
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--log_dir", default=None, help="also write process_<i>.log files here")
  p.add_argument("--grace_seconds", type=float, default=5.0, help="after SIGTERM, wait this long before SIGKILL")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  return p


def process_env(devices_per_process: int | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The variables each child gets on top of `base`: CPU platform, fake device count."""
  env = {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  if devices_per_process:
    xla = [f for f in (base or {}).get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(xla + [f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
  return env


def process_commands(args: argparse.Namespace, overrides: Sequence[str], port: int) -> list[Command]:
  """One argv per process: same coordinator and count, distinct process ids."""
  if args.num_processes < 1:
    raise LaunchError("--num_processes must be at least 1")
  if args.command:
    base = shlex.split(args.command)
    if args.config:
      base += ["--config", args.config]
    if args.workdir:
      base += ["--workdir", args.workdir]
    base += list(overrides)
  else:
    base = main_command(args.python, args.config, args.workdir, overrides, args.module)
  coord = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(args.num_processes)]
  return [base + coord + ["--process_id", str(i)] for i in range(args.num_processes)]


def _pump(index: int, stream: TextIO, out: TextIO, lock: threading.Lock, log: TextIO | None) -> None:
  """Copies a child's output line by line, prefixed with its process index."""
  for line in stream:
    with lock:
      out.write(f"[{index}] {line}" + ("" if line.endswith("\n") else "\n"))
      out.flush()
    if log is not None:
      log.write(line)
      log.flush()
  stream.close()


def _end(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
  """SIGTERM to each still-running child's process group, then SIGKILL after the grace period."""
  alive = [p for p in procs if p.poll() is None]
  for p in alive:
    try:
      os.killpg(p.pid, signal.SIGTERM)  # each child leads its own group (start_new_session)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + grace_seconds
  for p in alive:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def exit_code(returncode: int) -> int:
  """A shell-style exit code: 128 + signal number for a child killed by a signal."""
  return 128 - returncode if returncode < 0 else returncode


def run_processes(
  commands: Sequence[Command],
  env: Mapping[str, str],
  out: TextIO | None = None,
  log_dir: str | None = None,
  grace_seconds: float = 5.0,
  poll_seconds: float = 0.05,
) -> int:
  """Starts all commands, streams their output, and returns 0 or the first failure's code.

  When one process fails, the others are ended (a distributed job cannot finish without it);
  Ctrl-C ends all of them.
  """
  out = out if out is not None else sys.stdout
  lock = threading.Lock()
  procs: list[subprocess.Popen] = []
  threads: list[threading.Thread] = []
  logs: list[TextIO] = []
  full_env = {**os.environ, **env}
  try:
    for i, cmd in enumerate(commands):
      log = None
      if log_dir:
        pathlib.Path(log_dir).mkdir(parents=True, exist_ok=True)
        log = open(pathlib.Path(log_dir) / f"process_{i}.log", "w")
        logs.append(log)
      proc = subprocess.Popen(
        cmd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
      )
      procs.append(proc)
      thread = threading.Thread(target=_pump, args=(i, proc.stdout, out, lock, log), daemon=True)
      thread.start()
      threads.append(thread)
    code = 0
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, c = failed[0]
        with lock:
          print(f"[launcher] process {i} exited with {c}; ending the others", file=out)
        code = exit_code(c)
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(poll_seconds)
  except KeyboardInterrupt:
    code = 130
  except OSError as e:
    with lock:
      print(f"[launcher] could not start {commands[len(procs)][0]!r}: {e}", file=out)
    code = 127
  finally:
    _end(procs, grace_seconds)
    for thread in threads:
      thread.join(timeout=5.0)
    for log in logs:
      log.close()
  return code


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
  """Parses `argv` (unknown `--config.*` flags are passed through) and launches or prints."""
  out = out if out is not None else sys.stdout
  args, extra = build_parser().parse_known_args(argv)
  try:
    overrides = split_overrides(extra)
    port = args.port or free_port()
    commands = process_commands(args, overrides, port)
  except LaunchError as e:
    print(f"local.py: error: {e}", file=sys.stderr)
    return 2
  env = process_env(args.devices_per_process, os.environ)
  if args.dry_run:
    for cmd in commands:
      print(shell_line(cmd, env), file=out)
    return 0
  # A scheduler's SIGTERM ends the children too (they run in their own sessions).
  if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
    return run_processes(commands, env, out, args.log_dir, args.grace_seconds)
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    return run_processes(commands, env, out, args.log_dir, args.grace_seconds)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
  raise KeyboardInterrupt


if __name__ == "__main__":
  sys.exit(main())

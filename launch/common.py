"""Helpers shared by the launchers: running (or printing) shell commands, the main command line.

Every launcher builds its work as lists of argv lists and hands them to a `Runner`. With
`dry_run=True` the runner prints each command as one shell-quoted line (so the output can be
pasted into a terminal or saved as a script) and runs nothing; otherwise it runs them with
`subprocess` and `check=True`.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

Command = list[str]

# The training entry point every launcher starts.
DEFAULT_MODULE = "emd_jax.main"

GCLOUD_MISSING = (
  "`{exe}` was not found on PATH. Install the Google Cloud SDK "
  "(https://cloud.google.com/sdk/docs/install), run `gcloud auth login` and "
  "`gcloud config set project <PROJECT>`, or pass --dry_run to print the commands instead."
)


class LaunchError(RuntimeError):
  """A launcher failed for a reason worth a one-line message (no traceback)."""


def shell_line(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> str:
  """Quotes `cmd` as one shell line, prefixed by `KEY=VALUE` pairs for `env`."""
  prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
  return " ".join(prefix + [shlex.join(cmd)])


def comment(text: str) -> str:
  """A shell comment line, so a dry-run transcript stays a valid script."""
  return "# " + text


class Runner:
  """Runs commands, or prints them when `dry_run` is set.

  Attributes:
    dry_run: print instead of run.
    out: where dry-run lines and notes go.
  """

  def __init__(self, dry_run: bool = False, out: TextIO | None = None):
    self.dry_run = dry_run
    self.out = out if out is not None else sys.stdout

  def note(self, text: str) -> None:
    """Prints a comment line (in dry runs as part of the transcript; otherwise as progress)."""
    print(comment(text), file=self.out, flush=True)

  def _check_executable(self, cmd: Sequence[str]) -> None:
    exe = cmd[0]
    if shutil.which(exe) is None:
      message = GCLOUD_MISSING if exe == "gcloud" else "`{exe}` was not found on PATH."
      raise LaunchError(message.format(exe=exe))

  def run(self, cmd: Sequence[str], check: bool = True) -> int:
    """Runs `cmd` with inherited stdout/stderr; returns its exit code (raises if `check`)."""
    if self.dry_run:
      print(shell_line(cmd), file=self.out, flush=True)
      return 0
    self._check_executable(cmd)
    return subprocess.run(list(cmd), check=check).returncode

  def output(self, cmd: Sequence[str]) -> tuple[int, str]:
    """Runs `cmd` and returns (exit code, stripped stdout); never raises on a non-zero code.

    In a dry run it prints the command and returns (0, "").
    """
    if self.dry_run:
      print(shell_line(cmd), file=self.out, flush=True)
      return 0, ""
    self._check_executable(cmd)
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout.strip()


def main_command(
  python: str,
  config: str | None,
  workdir: str | None,
  overrides: Sequence[str] = (),
  module: str = DEFAULT_MODULE,
) -> Command:
  """`python -m emd_jax.main --config C --workdir W --config.a.b=v ...` as an argv list."""
  cmd = [python, "-m", module]
  if config:
    cmd += ["--config", config]
  if workdir:
    cmd += ["--workdir", workdir]
  return cmd + list(overrides)


def split_overrides(extra: Sequence[str]) -> list[str]:
  """Keeps `--config.a.b=value` pass-through flags; rejects anything else with a clear error."""
  bad = [arg for arg in extra if not arg.startswith("--config.")]
  if bad:
    raise LaunchError(
      f"unrecognised arguments: {' '.join(bad)} "
      "(only --config.<field>=<value> overrides are passed through to the trainer)"
    )
  return list(extra)


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that was free a moment ago (bind to port 0, read it back, release it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind((host, 0))
    return sock.getsockname()[1]

"""Shared command-line plumbing: flag parsing that fails with one clear line.

absl reports most bad flags itself; an unknown `--config.x.y` override,
however, surfaces as a KeyError/AttributeError deep inside ml_collections, and
a config file that fails to load as whatever it raised. `run_app` turns every
parsing problem and every user-facing error into `error: ...` on stderr and
exit status 2, without a traceback. A preemption (`preemption.Preempted`:
a checkpoint was saved and the run stopped) prints one line and exits with
`PREEMPTED_EXIT_CODE` (75): rerun the same command to resume.

`execute` is the same logic without `absl.app` (no `sys.exit`, any
`FlagValues`): tests drive the whole command line in-process through it;
`run_argv` is it for commands that parse their own arguments (argparse).

Every command takes `--debug` (or `EMD_JAX_DEBUG=1` in the environment): a user
error then re-raises, so its traceback shows. Bad files are meant to be
reported where they are read, as `errors.UserInputError` naming the file; the
few reader exceptions that could still escape (`pickle.UnpicklingError`,
`zipfile.BadZipFile`, `json.JSONDecodeError`) are reported the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Callable

from absl import app, flags, logging

from emd_jax.errors import UserError, one_line
from emd_jax.runtime.preemption import PREEMPTED_EXIT_CODE, Preempted

USAGE_EXIT_CODE = 2
DEBUG_FLAG = "--debug"
# Reader exceptions that mean "a bad file", should one escape the validated readers.
_BAD_FILE_ERRORS = (pickle.UnpicklingError, zipfile.BadZipFile, json.JSONDecodeError)
_debug = False

__all__ = ["UserError", "ArgumentParser", "execute", "run_app", "run_argv", "run_command", "run_in_process"]


def _strip_debug(argv: list[str]) -> list[str]:
  """`argv` without `--debug`; sets debug mode if it was there (or `EMD_JAX_DEBUG=1`)."""
  global _debug
  _debug = DEBUG_FLAG in argv[1:] or os.environ.get("EMD_JAX_DEBUG", "") not in ("", "0")
  return [argv[0], *[a for a in argv[1:] if a != DEBUG_FLAG]] if argv else argv


class _Exit(Exception):  # noqa: N818
  def __init__(self, code: int):
    super().__init__(code)
    self.code = code


def _die(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise _Exit(USAGE_EXIT_CODE)


_one_line = one_line


def _parse(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
  try:
    return flag_values(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:  # a config file that raised: keep its last line
      last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
      flag = text.split("=")[0].removeprefix("flag ").strip()
      _die(f"{flag}: the config file failed to load: {last}")
    _die(_one_line(e))
  except (KeyError, AttributeError) as e:
    key = str(e).strip("\"'").split("'")[0]
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    bad = [o for o in overrides if o.split(".")[-1] == key] or overrides
    if bad:
      _die(f"{', '.join(bad)}: no such config field ({key!r}); see the config file for the fields it has")
    _die(f"--config: the config file failed to load: {type(e).__name__}: {_one_line(e)}")
  except Exception as e:  # noqa: BLE001  (anything a config file's get_config raises)
    _die(f"--config: the config file failed to load: {type(e).__name__}: {_one_line(e)}")
  return []


def _call(main: Callable[[list[str]], None], argv: list[str], user_errors: tuple[type[BaseException], ...]) -> int:
  try:
    main(argv)
  except Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    return PREEMPTED_EXIT_CODE
  except app.UsageError as e:
    _die(_one_line(e))
  except (UserError, FileNotFoundError, *user_errors) as e:
    if _debug:
      raise
    _die(_one_line(e))
  except _BAD_FILE_ERRORS as e:
    if _debug:
      raise
    _die(f"{type(e).__name__}: {_one_line(e)}")
  return 0


def execute(
  main: Callable[[list[str]], None],
  argv: list[str],
  flag_values: flags.FlagValues,
  user_errors: tuple[type[BaseException], ...] = (),
) -> int:
  """Parses `argv` (argv[0] is the program name) into `flag_values`, runs `main`; returns the exit code."""
  try:
    rest = _parse(_strip_debug(argv), flag_values)
    return _call(main, rest, user_errors)
  except _Exit as e:
    return e.code


def run_app(main: Callable[[list[str]], None], user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """`absl.app.run(main)` with clean errors for bad flags and for `user_errors`."""

  def parse(argv):
    try:
      return _parse(_strip_debug(argv), flags.FLAGS)
    except _Exit as e:
      sys.exit(e.code)

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax, XLA) stays off unless asked for
    try:
      code = _call(main, argv, user_errors)
    except _Exit as e:
      code = e.code
    sys.exit(code)

  app.run(wrapped, flags_parser=parse)


# A flag-based command is `define_flags(flag_values, sys_argv) -> {name: holder}` and
# `main(argv, holders)`: the holders are passed in, never kept in a module-level global.


def run_command(define_flags: Callable, main: Callable, user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """The command's process entry point: its flags on absl's global `FLAGS`, then `run_app`."""
  holders = define_flags(flags.FLAGS, None)
  run_app(lambda argv: main(argv, holders), user_errors)


def run_in_process(
  prog: str,
  define_flags: Callable,
  main: Callable,
  argv: list[str],
  user_errors: tuple[type[BaseException], ...] = (),
) -> int:
  """The command line without a new process (tests): fresh flags, returns the exit code.

  `argv` excludes the program name, e.g. `["--config", "configs/gmm.py:tiny", "--workdir", d]`.
  """
  argv = [prog, *argv]
  fv = flags.FlagValues()
  holders = define_flags(fv, argv)
  return execute(lambda rest: main(rest, holders), argv, fv, user_errors)


class ArgumentParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose usage errors are `UserError`s (one line, exit status 2)."""

  def error(self, message: str):
    raise UserError(f"{self.prog}: {message} (see --help)")


def run_argv(
  main: Callable[[list[str]], None],
  argv: list[str] | None = None,
  user_errors: tuple[type[BaseException], ...] = (),
) -> int:
  """Runs `main(argv[1:])` (a command that parses its own arguments); returns the exit code.

  `argv` includes the program name (default: `sys.argv`). Use as `sys.exit(run_argv(main))`.
  """
  argv = _strip_debug(list(sys.argv if argv is None else argv))
  try:
    return _call(lambda rest: main(rest[1:]), argv, user_errors)
  except _Exit as e:
    return e.code

"""Shared command-line plumbing: flag parsing that fails with one clear line.

absl reports most bad flags itself; an unknown `--config.x.y` override,
however, surfaces as a KeyError/AttributeError deep inside ml_collections, and
a config file that fails to load as whatever it raised. `run_app` turns every
parsing problem and every user-facing error into `error: ...` on stderr and
exit status 2, without a traceback. A preemption (`preemption.Preempted`:
a checkpoint was saved and the run stopped) prints one line and exits with
`PREEMPTED_EXIT_CODE` (75): rerun the same command to resume.

`execute` is the same logic without `absl.app` (no `sys.exit`, any
`FlagValues`): tests drive the whole command line in-process through it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

from emd_jax.preemption import PREEMPTED_EXIT_CODE, Preempted

USAGE_EXIT_CODE = 2


class UserError(Exception):
  """An error to report as one line, without a traceback."""


class _Exit(Exception):  # noqa: N818
  def __init__(self, code: int):
    super().__init__(code)
    self.code = code


def _die(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise _Exit(USAGE_EXIT_CODE)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 500 else text[:500] + " ..."


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
    _die(_one_line(e))
  return 0


def execute(
  main: Callable[[list[str]], None],
  argv: list[str],
  flag_values: flags.FlagValues,
  user_errors: tuple[type[BaseException], ...] = (),
) -> int:
  """Parses `argv` (argv[0] is the program name) into `flag_values`, runs `main`; returns the exit code."""
  try:
    rest = _parse(argv, flag_values)
    return _call(main, rest, user_errors)
  except _Exit as e:
    return e.code


def run_app(main: Callable[[list[str]], None], user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """`absl.app.run(main)` with clean errors for bad flags and for `user_errors`."""

  def parse(argv):
    try:
      return _parse(argv, flags.FLAGS)
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

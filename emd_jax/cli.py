"""Shared command-line plumbing: flag parsing that fails with one clear line.

absl reports most bad flags itself; an unknown `--config.x.y` override,
however, surfaces as a KeyError/AttributeError deep inside ml_collections.
`run_app` turns every parsing problem and every user-facing error into
`error: ...` on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging


class UserError(Exception):
  """An error to report as one line, without a traceback."""


def _die(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _die(str(e))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    key = str(e).strip("\"'").split("'")[0]
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    bad = [o for o in overrides if o.split(".")[-1] == key] or overrides
    _die(f"{', '.join(bad)}: no such config field ({key!r}); see the config file for the fields it has")
  return []


def run_app(main: Callable[[list[str]], None], user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """`absl.app.run(main)` with clean errors for bad flags and for `user_errors`."""

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax, XLA) stays off unless asked for
    try:
      main(argv)
    except (UserError, FileNotFoundError, *user_errors) as e:
      _die(str(e))

  app.run(wrapped, flags_parser=_parse)

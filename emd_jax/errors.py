"""The errors a command reports as one line (`error: <message>`, exit status 2, no traceback).

Every command-line tool goes through `emd_jax.cli`, which prints a `UserError`'s
message and exits with status 2; anything else is a bug and keeps its
traceback. A message names the file, flag or config field first and then says
what is wrong with it, e.g. `x.npz: 'images' holds 3 non-finite values`.

- `UserError`: the base (bad flags, unknown names, impossible requests).
- `UserInputError`: a file, flag or field whose *content* is wrong (a
  malformed npz, JSON, msgpack, pickle, export or teacher directory). It is a
  `ValueError` too, so callers that caught `ValueError` keep working.
- `UnsafePickleError`: a pickle asked for a global outside the allowlist, or
  to allocate more than the size limit (`emd_jax.formats.torch_pickle`). It is a
  `pickle.UnpicklingError` too.
"""

from __future__ import annotations

import pickle


class UserError(Exception):
  """An error to report as one line, without a traceback."""


class UserInputError(UserError, ValueError):
  """A file, flag or field holds something unusable; the message names it first."""


class UnsafePickleError(UserInputError, pickle.UnpicklingError):
  """A pickle was refused: a global outside the allowlist, or an allocation over the limit."""


def one_line(e: BaseException, limit: int = 500) -> str:
  """`str(e)` on one line (whitespace collapsed), at most `limit` characters."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit] + " ..."

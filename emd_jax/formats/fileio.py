"""Reading files users hand us, and writing outputs so that a failure leaves nothing behind.

Readers check what a file claims before it is trusted and raise
`errors.UserInputError` naming the file and what is wrong with it:

- `read_json` / `parse_json_arg`: JSON objects (size limit, syntax, top-level type),
  `require_fields` their fields and types;
- `read_msgpack`: a Flax msgpack parameter file; `check_params` compares a parameter
  tree with the one a spec builds (missing and extra leaves, shapes, dtypes, finiteness);
- `read_images_npz`: an npz of images (allowed keys, dtype, rank, value range, finite).

Writers: `write_npz` writes a temporary file beside the target and renames it
(`os.replace`), `publish_dir` moves a finished temporary directory into place.
Commands validate all input before they create any output directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from emd_jax.errors import UserInputError, one_line

MAX_JSON_BYTES = 16 << 20  # a spec or settings file; anything larger is not one
MAX_NPZ_ARRAY_BYTES = 8 << 30  # one array of an input npz, uncompressed


def publish_dir(tmp: str, directory: str) -> str:
  """Moves the finished directory `tmp` to `directory`, replacing any old one.

  `tmp` must be on the same filesystem (create it in `directory`'s parent). A reader sees
  either the old directory or the new one, never a partial one; a crash between the two
  renames leaves the old one beside it as `<directory>.old-*`.
  """
  if os.path.exists(directory):
    old = f"{directory}.old-{os.path.basename(tmp)}"
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, directory)
  return directory


def write_npz(path: str, **arrays: np.ndarray) -> str:
  """Writes `arrays` to `path` atomically: a temporary file in the same directory, then `os.replace`."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise UserInputError(f"{path}: is a directory, not an output file")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def require_file(path: str, what: str) -> str:
  """`path` if it is a regular file, else a `UserInputError` saying `what` is missing."""
  if not os.path.isfile(path):
    reason = "is a directory" if os.path.isdir(path) else "does not exist"
    raise UserInputError(f"{path}: {what} {reason}")
  return path


# ----------------------------------------------------------------------------
# JSON.


def _loads(text: str, where: str) -> dict:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserInputError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
  except RecursionError as e:
    raise UserInputError(f"{where}: JSON nested too deeply") from e
  if not isinstance(value, dict):
    raise UserInputError(f"{where}: expected a JSON object {{...}}, got {type(value).__name__}")
  return value


def read_json(path: str, what: str = "JSON file") -> dict:
  """The JSON object in `path` (at most `MAX_JSON_BYTES`)."""
  require_file(path, what)
  size = os.path.getsize(path)
  if size > MAX_JSON_BYTES:
    raise UserInputError(f"{path}: {size:,} bytes is too large for a {what} (limit {MAX_JSON_BYTES:,})")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise UserInputError(f"{path}: not a text file ({one_line(e)})") from e
  return _loads(text, path)


def parse_json_arg(text_or_path: str, flag: str) -> dict:
  """A JSON object given on the command line as inline text or as a file path."""
  if os.path.exists(text_or_path):
    return read_json(text_or_path, f"{flag} file")
  if len(text_or_path) > MAX_JSON_BYTES:
    raise UserInputError(f"{flag}: inline JSON over {MAX_JSON_BYTES:,} characters")
  return _loads(text_or_path, f"{flag}")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "a bool"}


def require_fields(obj: Mapping, fields: Mapping[str, type | tuple[type, ...]], where: str) -> None:
  """Every name in `fields` is in `obj` with a value of that type (`float` accepts ints; `int` no bools)."""
  for name, types in fields.items():
    if name not in obj:
      raise UserInputError(f"{where}: missing field {name!r}")
    types = types if isinstance(types, tuple) else (types,)
    value = obj[name]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if not ok:
      want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
      raise UserInputError(f"{where}: field {name!r} must be {want}, got {type(value).__name__} {value!r:.60}")


def check_shape_list(value: Any, where: str, rank: int | None = None) -> tuple[int, ...]:
  """A list of positive ints (a data shape), optionally of length `rank`."""
  if not (isinstance(value, list) and value and all(isinstance(n, int) and not isinstance(n, bool) for n in value)):
    raise UserInputError(f"{where}: must be a list of positive integers, got {value!r:.60}")
  if any(n < 1 or n > 1 << 20 for n in value) or (rank is not None and len(value) != rank):
    raise UserInputError(f"{where}: bad shape {value}" + (f" (need {rank} dimensions)" if rank else ""))
  return tuple(value)


# ----------------------------------------------------------------------------
# Parameter files.


def read_msgpack(path: str, what: str = "parameter file") -> dict:
  """A Flax msgpack parameter tree (nested dicts of arrays)."""
  from flax import serialization

  require_file(path, what)
  try:
    with open(path, "rb") as f:
      tree = serialization.msgpack_restore(f.read())
  except Exception as e:  # noqa: BLE001  (msgpack raises many types on a damaged file)
    raise UserInputError(f"{path}: not a readable {what} ({type(e).__name__}: {one_line(e, 200)})") from e
  if not isinstance(tree, dict) or not tree:
    raise UserInputError(f"{path}: expected a tree of parameters, got {type(tree).__name__}")
  return tree


def _flat(tree: Any) -> dict[str, Any]:
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): v for k, v in leaves}


def check_params(expected: Any, params: Any, where: str, dtype: str | None = None, finite: bool = True) -> None:
  """`params` has exactly the leaves of `expected` (e.g. `jax.eval_shape` of an init), same shapes and dtypes.

  `dtype`: the dtype every leaf must have (default: each expected leaf's). Errors name up to
  four offending leaves, e.g. `DIR/params.msgpack: does not match its spec: ['dense']['kernel']:
  file (2, 16), spec (2, 8)`.
  """
  want, got = _flat(expected), _flat(params)
  problems = [f"{k}: missing" for k in sorted(set(want) - set(got))]
  problems += [f"{k}: not in the spec" for k in sorted(set(got) - set(want))]
  for k in sorted(set(want) & set(got)):
    w, g = want[k], got[k]
    if not isinstance(g, np.ndarray | np.generic) and not hasattr(g, "shape"):
      problems.append(f"{k}: not an array ({type(g).__name__})")
      continue
    if tuple(g.shape) != tuple(w.shape):
      problems.append(f"{k}: file {tuple(g.shape)}, spec {tuple(w.shape)}")
    elif str(g.dtype) != str(dtype or w.dtype):
      problems.append(f"{k}: dtype {g.dtype}, spec {dtype or w.dtype}")
    elif finite and np.issubdtype(g.dtype, np.inexact) and not np.isfinite(np.asarray(g, np.float32)).all():
      problems.append(f"{k}: holds non-finite values")
  if problems:
    more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
    raise UserInputError(f"{where}: does not match its spec: " + "; ".join(problems[:4]) + more)


# ----------------------------------------------------------------------------
# Images.


def open_npz(path: str, what: str, expected: str) -> np.lib.npyio.NpzFile:
  """Opens the npz at `path` (no pickles) or raises `UserInputError` naming it.

  `what` names the file in the missing-file message; `expected` says what it should hold (for the
  message when it is a single .npy array). Use it as a context manager.
  """
  require_file(path, what)
  try:
    f = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise UserInputError(f"{path}: not a readable npz file ({type(e).__name__}: {one_line(e, 200)})") from e
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise UserInputError(f"{path}: a single .npy array, not an npz {expected}")
  return f


def read_images_npz(path: str, flag: str = "--input") -> tuple[np.ndarray, bool]:
  """Clean images from an npz: `images` (uint8 `[N, H, W, C]` or `[N, H, W]`) or `samples` (float, [-1, 1]).

  Returns (float32 `[N, H, W, C]` in [-1, 1], whether the input was uint8 `images`).
  Rejects: a file that is not an npz (or is truncated), object arrays, neither key,
  a wrong dtype or rank, no images, non-finite values, values outside [-1.5, 1.5]
  (a [0, 255] or [0, 1] float array saved as `samples`, say).
  """
  with open_npz(path, f"{flag} npz", "with 'images' or 'samples'") as f:
    key = "images" if "images" in f.files else "samples" if "samples" in f.files else None
    if key is None:
      raise UserInputError(f"{path}: needs an 'images' (uint8) or 'samples' (float) array; has {sorted(f.files)}")
    info = f.zip.getinfo(f"{key}.npy")
    if info.file_size > MAX_NPZ_ARRAY_BYTES:
      raise UserInputError(f"{path}: {key!r} is {info.file_size:,} bytes, over the limit {MAX_NPZ_ARRAY_BYTES:,}")
    try:
      x = f[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise UserInputError(f"{path}: {key!r} cannot be read ({type(e).__name__}: {one_line(e, 200)})") from e
  where = f"{path}: {key!r}"
  if key == "images" and x.dtype != np.uint8:
    raise UserInputError(f"{where} must be uint8, got {x.dtype}")
  if key == "samples" and not np.issubdtype(x.dtype, np.floating):
    raise UserInputError(f"{where} must be a float array, got {x.dtype}")
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise UserInputError(f"{where} must be [N, H, W, C] (or [N, H, W]), got shape {x.shape}")
  if x.shape[0] == 0 or 0 in x.shape:
    raise UserInputError(f"{where} holds no images (shape {x.shape})")
  if key == "images":
    return x.astype(np.float32) / 127.5 - 1.0, True
  x = np.asarray(x, np.float32)
  bad = int(np.size(x) - np.isfinite(x).sum())
  if bad:
    raise UserInputError(f"{where} holds {bad} non-finite values (NaN or inf)")
  lo, hi = float(x.min()), float(x.max())
  if lo < -1.5 or hi > 1.5:
    raise UserInputError(f"{where} values span [{lo:.3g}, {hi:.3g}]; images must be in [-1, 1] (uint8: use 'images')")
  return x, False

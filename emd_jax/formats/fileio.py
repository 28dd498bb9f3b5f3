"""Reading files users hand us, and writing outputs so that a failure leaves nothing behind.

Readers check what a file claims before it is trusted and raise
`errors.UserInputError` naming the file and what is wrong with it:

- `read_json` / `parse_json_arg`: JSON objects (size limit, syntax, top-level type),
  `require_fields` their fields and types;
- `read_msgpack`: a Flax msgpack parameter file; `check_params` compares a parameter
  tree with the one a spec builds (missing and extra leaves, shapes, dtypes, finiteness);
- `read_images_npz`: an npz of images (allowed keys, dtype, rank, value range, finite).

Writers: `write_npz` writes a temporary file beside the target and renames it
(`os.replace`; on an object store the one object appears whole when written);
`publish` writes a directory (an export, a teacher) with its completion marker
`_COMPLETE` last, `require_complete` is what readers check first.
Commands validate all input before they create any output directory.

Every file operation goes through `emd_jax.formats.paths`, so each of these
takes local paths and URIs (`gs://...`) alike.

Publication (docs/reliability.md, "Workdirs on object stores"):

- local directory: the files and the marker are written into a temporary
  directory beside the target, which is then renamed into place
  (`publish_dir`): a reader sees the old directory or the new one, whole;
- URI (`gs://`, no atomic rename): an old directory's marker is deleted first,
  then the old files; the new files are written in place, the marker last.
  Until the marker exists, readers refuse the directory ("incomplete ...").

The marker (JSON) lists every file of the directory with its size and SHA-256
(`verify_complete` re-checks them). Readers require the marker and every file
it lists. A directory without a marker was written by an emd_jax before markers
existed: on a local path, where publication was already an atomic rename, it is
accepted with a warning; on a URI it is refused (a copy of such a directory,
once complete, is marked with `python -m emd_jax.formats.fileio mark DIR`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging

from emd_jax import __version__
from emd_jax.errors import UserInputError, one_line
from emd_jax.formats import paths

MAX_JSON_BYTES = 16 << 20  # a spec or settings file; anything larger is not one
MAX_NPZ_ARRAY_BYTES = 8 << 30  # one array of an input npz, uncompressed


MARKER_FILE = "_COMPLETE"  # written last into every published directory


class IncompleteError(UserInputError, FileNotFoundError):
  """A published directory without its marker, or missing a file its marker lists (a `FileNotFoundError` too)."""


MARKER_FORMAT = 1


def publish_dir(tmp: str, directory: str) -> str:
  """Moves the finished local directory `tmp` to `directory`, replacing any old one.

  `tmp` must be on the same filesystem (create it in `directory`'s parent). A reader sees
  either the old directory or the new one, never a partial one; a crash between the two
  renames leaves the old one beside it as `<directory>.old-*`. Local paths only
  (object stores have no directory rename: `publish` writes a marker there instead).
  """
  if os.path.exists(directory):
    old = f"{directory}.old-{os.path.basename(tmp)}"
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, directory)
  return directory


def _marker_text(kind: str, files: Mapping[str, dict]) -> str:
  info = {
    "format_version": MARKER_FORMAT,
    "kind": kind,
    "emd_jax_version": __version__,
    "files": dict(sorted(files.items())),
  }
  return json.dumps(info, indent=2)


def _file_entry(data: bytes) -> dict:
  return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class Publication:
  """The files of a directory being published (`publish`); each `write` is recorded for the marker."""

  def __init__(self, root: str):
    self.root = root
    self.files: dict[str, dict] = {}

  def path(self, name: str) -> str:
    return os.path.join(self.root, *name.split("/"))

  def write(self, name: str, data: bytes | str) -> str:
    """Writes `data` (text is UTF-8) to `name` ('/'-separated, relative); returns its path."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    path = self.path(name)
    if "/" in name:
      paths.makedirs(os.path.dirname(path))
    paths.write_bytes(path, data)
    self.files[name] = _file_entry(data)
    return path

  def copy(self, src: str, name: str) -> str:
    """Copies the file `src` (local or remote) to `name`."""
    return self.write(name, paths.read_bytes(src))

  def mark(self, subdir: str, kind: str) -> None:
    """Writes the marker of a directory nested in this one (e.g. a copied teacher), from the files under it."""
    prefix = subdir.rstrip("/") + "/"
    files = {n[len(prefix) :]: e for n, e in self.files.items() if n.startswith(prefix)}
    self.write(prefix + MARKER_FILE, _marker_text(kind, files))


@contextlib.contextmanager
def publish(directory: str, kind: str, tmp_prefix: str = ".publish-") -> Iterator[Publication]:
  """Publishes a directory: `with publish(d, "generator_export") as out: out.write("x.json", text)`.

  On leaving the block without an error, the marker `_COMPLETE` (the kind and every file
  written, with sizes and SHA-256) is written last, and the directory replaces any old one
  at `directory`: locally by renaming a temporary sibling (`tmp_prefix`...) into place; on a
  URI in place, after deleting the old marker, then the old files. An error removes what was
  written (the old directory is kept on a local path, gone on a URI).
  """
  directory = paths.abspath(directory)
  if paths.is_remote(directory):
    if paths.isfile(directory):
      raise UserInputError(f"{directory}: exists and is not a directory")
    if paths.exists(directory):
      marker = f"{directory}/{MARKER_FILE}"
      if paths.exists(marker):
        paths.remove(marker)  # first: from here on readers refuse the old directory
      paths.rmtree(directory)
    paths.makedirs(directory)
    out = Publication(directory)
    try:
      yield out
      paths.write_text(f"{directory}/{MARKER_FILE}", _marker_text(kind, out.files))
    except BaseException:
      paths.rmtree(directory, ignore_errors=True)
      raise
    return
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
  out = Publication(tmp)
  try:
    yield out
    paths.write_text(os.path.join(tmp, MARKER_FILE), _marker_text(kind, out.files))
    publish_dir(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


_UNMARKED_WARNED: set[str] = set()


def require_complete(directory: str, what: str) -> dict | None:
  """The marker of a published `directory` (see `publish`), after checking every file it lists exists.

  Raises `IncompleteError` "incomplete {what}: {directory}: ..." when a file it lists is
  missing, or when a URI has no marker. A local directory without a marker (written by an
  emd_jax before markers) is accepted with a warning; returns None then.
  """
  marker = os.path.join(directory, MARKER_FILE)
  if not paths.exists(marker):
    if paths.is_remote(directory):
      raise IncompleteError(
        f"incomplete {what}: {directory} has no {MARKER_FILE} marker (its write did not finish, or an emd_jax "
        f"without markers wrote it; if it is complete: python -m emd_jax.formats.fileio mark {directory})"
      )
    if directory not in _UNMARKED_WARNED:
      _UNMARKED_WARNED.add(directory)
      logging.warning(
        "%s: no %s marker (written before emd_jax wrote markers); accepted on a local path", directory, MARKER_FILE
      )
    return None
  info = read_json(marker, f"{what} completion marker")
  files = info.get("files")
  if not isinstance(files, dict) or not all(isinstance(n, str) and n for n in files):
    raise UserInputError(f"{marker}: field 'files' must be an object of file names")
  missing = sorted(n for n in files if not paths.exists(os.path.join(directory, *n.split("/"))))
  if missing:
    more = f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""
    names = ", ".join(missing[:4]) + more
    raise IncompleteError(f"incomplete {what}: {directory}: {names} listed in {MARKER_FILE} missing")
  return info


def verify_complete(directory: str) -> list[str]:
  """Problems found re-reading every file the marker of `directory` lists (sizes, SHA-256); [] if none."""
  info = read_json(os.path.join(directory, MARKER_FILE), "completion marker")
  problems = []
  for name, entry in sorted(info.get("files", {}).items()):
    path = os.path.join(directory, *name.split("/"))
    if not paths.exists(path):
      problems.append(f"{name}: missing")
      continue
    got = _file_entry(paths.read_bytes(path))
    if got != {k: entry.get(k) for k in got}:
      problems.append(f"{name}: {got['bytes']} bytes, sha256 {got['sha256'][:12]}; marker {entry}")
  return problems


def mark_complete(directory: str, kind: str = "unknown") -> str:
  """Writes the marker of an existing directory from the files it holds now (an old export, once copied whole)."""
  directory = paths.abspath(directory)
  if not paths.isdir(directory):
    raise UserInputError(f"{directory}: not a directory")
  names = [n for n in paths.walk_files(directory) if n.split("/")[-1] != MARKER_FILE]
  files = {n: _file_entry(paths.read_bytes(os.path.join(directory, *n.split("/")))) for n in names}
  path = os.path.join(directory, MARKER_FILE)
  paths.write_text(path, _marker_text(kind, files))
  return path


def write_npz(path: str, **arrays: np.ndarray) -> str:
  """Writes `arrays` to `path` atomically: a temporary file in the same directory, then `os.replace`.

  On a URI the npz is built in memory and written as one object.
  """
  path = paths.abspath(path)
  if paths.isdir(path):
    raise UserInputError(f"{path}: is a directory, not an output file")
  if paths.is_remote(path):
    paths.makedirs(os.path.dirname(path))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    paths.write_bytes(path, buf.getvalue())
    return path
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
  if not paths.isfile(path):
    reason = "is a directory" if paths.isdir(path) else "does not exist"
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
  size = paths.getsize(path)
  if size > MAX_JSON_BYTES:
    raise UserInputError(f"{path}: {size:,} bytes is too large for a {what} (limit {MAX_JSON_BYTES:,})")
  try:
    text = paths.read_text(path)
  except UnicodeDecodeError as e:
    raise UserInputError(f"{path}: not a text file ({one_line(e)})") from e
  return _loads(text, path)


def parse_json_arg(text_or_path: str, flag: str) -> dict:
  """A JSON object given on the command line as inline text or as a file path."""
  if paths.exists(text_or_path):
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
    tree = serialization.msgpack_restore(paths.read_bytes(path))
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
    f = np.load(io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path, allow_pickle=False)
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


def main(argv: list[str]) -> int:
  """`python -m emd_jax.formats.fileio mark DIR [KIND]` (write a marker) or `verify DIR` (re-check one)."""
  if len(argv) < 2 or argv[0] not in ("mark", "verify"):
    print("usage: python -m emd_jax.formats.fileio mark DIR [KIND] | verify DIR", file=sys.stderr)
    return 2
  try:
    if argv[0] == "mark":
      print(f"wrote {mark_complete(argv[1], argv[2] if len(argv) > 2 else 'unknown')}")
      return 0
    problems = verify_complete(argv[1])
  except UserInputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for p in problems:
    print(f"{argv[1]}: {p}")
  print(f"{argv[1]}: {'complete' if not problems else f'{len(problems)} problem(s)'}")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

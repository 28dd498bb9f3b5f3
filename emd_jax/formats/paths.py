"""Every file emd_jax reads or writes outside Orbax goes through these helpers.

A path is local (`runs/gmm`, `/data/x.npz`, `~/teacher`) or a URI
(`gs://bucket/run`, `s3://...`, `ram://test/run`): one that starts `scheme://`.
Local paths use `os`, `shutil` and `open`, exactly as before; URIs use
`tf.io.gfile` (TensorFlow is a dependency, imported only when a URI is used).

`tf.io.gfile` is the backend `etils.epath` itself uses for `gs://` when
TensorFlow is installed (what Orbax and CLU use). It is called directly here
because epath's URI table is fixed (`gs://`, `s3://`, `az://`, `hf://`):
epath refuses TensorFlow's in-memory `ram://` filesystem, which the tests use
as an object store (no real rename, no POSIX semantics), so the tests run the
same code a `gs://` workdir runs.

Object stores have no atomic directory rename, so nothing here renames a
remote directory: `move_tree` copies then deletes, and publication of
directories (`fileio.publish`) writes a completion marker last instead.
Errors: a missing file raises `FileNotFoundError` for both kinds of path.
"""

from __future__ import annotations

import builtins
import errno
import os
import re
import shutil
from typing import IO, Any

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# TensorFlow's ram:// (the tests' object store) differs from gs:// in two ways it needs help with:
# a file opened for writing again is appended to, not replaced (GCS replaces the object whole,
# atomically), and a file written into a directory never made leaves the directory unlistable
# (GCS directories are name prefixes). There an existing file is deleted first and the parent made.
# Its listings and existence checks also match by bare name prefix: `ram://d/export` lists `_ref`
# of a sibling `ram://d/export_ref` (such phantom entries are dropped here), and `ram://d/exp`
# "exists" (tests avoid sibling names that are prefixes of one another).
_RAM_QUIRKS = ("ram://",)

# Schemes Orbax can hold checkpoints in: TensorStore has drivers for these (and local files) only.
ORBAX_SCHEMES = ("gs://", "s3://")


def _str(path: Any) -> str:
  return os.fspath(path)


def is_remote(path: Any) -> bool:
  """True for a URI (`scheme://...`): an object store or another non-POSIX filesystem."""
  return _URI.match(_str(path)) is not None


def _gfile():
  import tensorflow as tf  # noqa: PLC0415  (heavy; only for URIs)

  return tf.io.gfile


def _not_found(path: str) -> FileNotFoundError:
  return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def abspath(path: Any) -> str:
  """`os.path.abspath` for local paths; a URI unchanged but for trailing slashes (never `normpath`: `gs:/`)."""
  path = _str(path)
  if not is_remote(path):
    return os.path.abspath(path)
  head, rest = path.split("://", 1)
  return f"{head}://{rest.rstrip('/')}"


def isabs(path: Any) -> bool:
  return is_remote(path) or os.path.isabs(_str(path))


def expanduser(path: Any) -> str:
  path = _str(path)
  return path if is_remote(path) else os.path.expanduser(path)


def exists(path: Any) -> bool:
  path = _str(path)
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: Any) -> bool:
  path = _str(path)
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: Any) -> bool:
  path = _str(path)
  if is_remote(path):
    g = _gfile()
    return g.exists(path) and not g.isdir(path)
  return os.path.isfile(path)


def getsize(path: Any) -> int:
  path = _str(path)
  if not is_remote(path):
    return os.path.getsize(path)
  if not isfile(path):
    raise _not_found(path)
  return int(_gfile().stat(path).length)


def listdir(path: Any) -> list[str]:
  """Names in a directory (no trailing slashes), unsorted like `os.listdir`."""
  path = _str(path)
  if not is_remote(path):
    return os.listdir(path)
  if not isdir(path):
    raise _not_found(path)
  names = [name.rstrip("/") for name in _gfile().listdir(path)]
  if path.startswith(_RAM_QUIRKS):
    names = [n for n in names if _gfile().exists(f"{path.rstrip('/')}/{n}")]
  return names


def makedirs(path: Any, exist_ok: bool = True) -> None:
  path = _str(path)
  if is_remote(path):
    if not exist_ok and exists(path):
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=exist_ok)


def open(path: Any, mode: str = "r") -> IO:  # noqa: A001  (the module's `open`)
  """A file object: `r`/`rb` to read (a missing file raises `FileNotFoundError`), `w`/`wb` to write.

  Local text mode is UTF-8. On an object store a written file appears whole when it is closed.
  """
  path = _str(path)
  if not is_remote(path):
    return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
  if mode.startswith("r") and not isfile(path):
    raise _not_found(path)
  if mode.startswith("w") and path.startswith(_RAM_QUIRKS):
    if isfile(path):
      _gfile().remove(path)
    _gfile().makedirs(os.path.dirname(path))
  return _gfile().GFile(path, mode)


def read_bytes(path: Any) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def write_bytes(path: Any, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def read_text(path: Any) -> str:
  """The file decoded as UTF-8 (`UnicodeDecodeError` if it is not text)."""
  return read_bytes(path).decode("utf-8")


def write_text(path: Any, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: Any) -> None:
  path = _str(path)
  if is_remote(path):
    if not exists(path):
      raise _not_found(path)
    _gfile().remove(path)
  else:
    os.remove(path)


def rmtree(path: Any, ignore_errors: bool = False) -> None:
  path = _str(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  try:
    if not exists(path):
      raise _not_found(path)
    _remote_rmtree(path)
  except Exception:
    if not ignore_errors:
      raise


def _remote_rmtree(path: str) -> None:
  """Deletes every file under `path`, then the directory entries that exist.

  Object stores hold files only; a "directory" is a name prefix (sometimes with a placeholder
  object), so deleting the files is what matters and a missing directory entry is no error.
  """
  g = _gfile()
  walked = list(_walk_remote(path.rstrip("/")))[::-1]  # deepest first
  for root, _rel, files in walked:
    for f in files:
      g.remove(f"{root}/{f}")
  for root, _rel, _files in walked:
    try:
      g.rmtree(root)
    except Exception:  # noqa: BLE001, S110  (an implicit directory has no entry to delete)
      pass


def walk_files(path: Any) -> list[str]:
  """Paths of every file under directory `path`, relative to it ('/'-separated), sorted."""
  path = _str(path)
  out = []
  if is_remote(path):
    for _root, rel, files in _walk_remote(path.rstrip("/")):
      out += [f"{rel}/{f}" if rel else f for f in files]
  else:
    for root, _dirs, files in os.walk(path):
      rel = os.path.relpath(root, path)
      out += [f if rel == "." else os.path.join(rel, f).replace(os.sep, "/") for f in files]
  return sorted(out)


def _walk_remote(path: str, rel: str = ""):
  """Yields `(directory, its path relative to `path`, its file names)`, top down (through `listdir`)."""
  root = f"{path}/{rel}" if rel else path
  names = listdir(root)
  subdirs = [n for n in names if isdir(f"{root}/{n}")]
  yield root, rel, [n for n in names if n not in subdirs]
  for d in subdirs:
    yield from _walk_remote(path, f"{rel}/{d}" if rel else d)


def copy_file(src: Any, dst: Any) -> None:
  """Copies one file (any mix of local and remote), replacing `dst`."""
  src, dst = _str(src), _str(dst)
  if not is_remote(src) and not is_remote(dst):
    shutil.copy2(src, dst)
    return
  if dst.startswith(_RAM_QUIRKS):
    if isfile(dst):
      _gfile().remove(dst)
    _gfile().makedirs(os.path.dirname(dst))
  _gfile().copy(src, dst, overwrite=True)


def move_tree(src: Any, dst: Any) -> None:
  """Moves directory `src` to `dst` (which must not exist).

  Local: one `os.rename` (atomic). Remote: every file copied, then `src` deleted; a crash
  in between leaves both (`src` intact until the copy is complete).
  """
  src, dst = _str(src), _str(dst)
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  if exists(dst):
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
  makedirs(dst)
  for rel in walk_files(src):
    parent = os.path.dirname(rel)
    if parent:
      makedirs(f"{dst}/{parent}")
    copy_file(f"{src}/{rel}", f"{dst}/{rel}")
  rmtree(src)

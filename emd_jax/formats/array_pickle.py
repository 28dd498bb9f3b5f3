"""Reading a plain pickle of numpy arrays (nested dicts, lists) without running anything from it.

Files such as jax-fid's `inception_v3_weights_fid.pickle` are `pickle.dump`s of
nested dicts of numpy arrays. `load_file` reads one with a restricted
unpickler in the manner of `torch_pickle` (whose stand-ins for `OrderedDict`
and `_codecs.encode` it reuses): numpy dtypes, scalars and arrays are built from
their raw bytes by local functions (both numpy's protocol-2/4 form of an array,
`_reconstruct` + state, and its protocol-5 form, `_frombuffer`), numeric dtypes
only (byte order kept), the byte count checked against the shape.
Every other global (`posix.system`, `builtins.eval`, object arrays, torch
tensors, ...) raises `errors.UnsafePickleError` naming it; a file over
`torch_pickle.MAX_FILE_BYTES` is refused unread.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from emd_jax.errors import UnsafePickleError, UserInputError, one_line
from emd_jax.formats import fileio, paths, torch_pickle


class _NdarrayClass:
  """What the global `numpy.ndarray` resolves to: a token only `_reconstruct` accepts (not callable)."""


class _PendingArray:
  """`numpy._core.multiarray._reconstruct`'s result; BUILD's `__setstate__` fills in the array from bytes."""

  array: np.ndarray | None = None

  def __setstate__(self, state) -> None:
    if not (isinstance(state, tuple) and len(state) in (4, 5)):  # (version, )shape, dtype, fortran, data
      raise pickle.UnpicklingError(f"bad numpy array state ({type(state).__name__})")
    shape, dtype, fortran, data = state[-4:]
    self.array = _array_from_bytes(data, dtype, shape, "F" if fortran else "C")


def _array_from_bytes(data, dtype, shape, order) -> np.ndarray:
  """A fresh numeric array `shape` of `dtype` (a `torch_pickle.NumpyDtype`) from raw bytes of exactly that length."""
  dtype = dtype.dtype if isinstance(dtype, torch_pickle.NumpyDtype) else None
  if dtype is None or dtype.kind not in "biufc":
    raise UnsafePickleError(f"refusing a numpy array of dtype {dtype!r} (only numeric dtypes are allowed)")
  if not isinstance(data, bytes | bytearray):
    raise UnsafePickleError(f"refusing a numpy array whose data is a {type(data).__name__}, not bytes")
  if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)) or order not in ("C", "F"):
    raise pickle.UnpicklingError(f"bad numpy array geometry shape={shape!r} order={order!r}")
  if int(np.prod(shape, dtype=object)) * dtype.itemsize != len(data):
    raise pickle.UnpicklingError(f"numpy array {shape} of {dtype} with {len(data)} bytes of data")
  return np.frombuffer(data, dtype).reshape(shape, order=order).copy(order="K")


def _reconstruct(subtype, shape, dtype_code) -> _PendingArray:
  del shape, dtype_code  # numpy's placeholder (0,) b'b'; the real geometry comes in the state
  if not isinstance(subtype, _NdarrayClass):
    raise UnsafePickleError(f"refusing numpy _reconstruct of {subtype!r} (only numpy.ndarray)")
  return _PendingArray()


def _frombuffer(data, dtype, shape, order) -> np.ndarray:
  """numpy's protocol-5 form of an array (`numpy._core.numeric._frombuffer`), the data in band."""
  return _array_from_bytes(bytes(data) if isinstance(data, memoryview) else data, dtype, shape, order)


def _empty_bytes(*args) -> bytes:
  """`bytes()`: how protocol 2 writes an empty byte string (the data of an empty array).

  Only without arguments: `bytes(n)` would allocate n bytes the file never held.
  """
  if args:
    raise UnsafePickleError(f"refusing bytes{args!r:.40} (only the empty bytes())")
  return b""


_NDARRAY = _NdarrayClass()
_ARRAY_PICKLE_GLOBALS = {
  # The stand-ins of the torch-pickle allowlist that a plain pickle of numpy arrays needs ...
  ("collections", "OrderedDict"): torch_pickle.ALLOWLIST[("collections", "OrderedDict")],
  ("_codecs", "encode"): torch_pickle.ALLOWLIST[("_codecs", "encode")],  # protocol 2 stores bytes as latin-1 text
  # ... and numeric numpy dtypes, scalars and arrays, built from their bytes by the functions above.
  ("numpy", "dtype"): torch_pickle.ALLOWLIST[("numpy", "dtype")],
  ("numpy.core.multiarray", "scalar"): torch_pickle.ALLOWLIST[("numpy.core.multiarray", "scalar")],
  ("numpy._core.multiarray", "scalar"): torch_pickle.ALLOWLIST[("numpy._core.multiarray", "scalar")],
  ("__builtin__", "bytes"): _empty_bytes,  # protocol 2 names builtins the Python 2 way
  ("builtins", "bytes"): _empty_bytes,
  ("numpy", "ndarray"): _NDARRAY,
  ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy < 2
  ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy >= 2
  ("numpy.core.numeric", "_frombuffer"): _frombuffer,
  ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class _ArrayUnpickler(pickle.Unpickler):
  """Resolves only `_ARRAY_PICKLE_GLOBALS`: dicts, numeric numpy arrays and scalars; nothing runs."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ARRAY_PICKLE_GLOBALS:
      return _ARRAY_PICKLE_GLOBALS[(module, name)]
    raise UnsafePickleError(f"refusing to load global {module}.{name} (a weights pickle holds only dicts and arrays)")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")


def load_file(path: str) -> Any:
  """The object in a pickle of dicts / lists of numeric numpy arrays, read safely.

  Every global outside `_ARRAY_PICKLE_GLOBALS` (`posix.system`, `builtins.eval`,
  object arrays, ...) raises `UnsafePickleError` naming it; a file over
  `torch_pickle.MAX_FILE_BYTES` is refused unread; a damaged file raises
  `UserInputError` naming it.
  """
  fileio.require_file(path, "pickle")
  size = paths.getsize(path)
  if size > torch_pickle.MAX_FILE_BYTES:
    raise UnsafePickleError(f"{path}: refusing to read {size:,} bytes (limit {torch_pickle.MAX_FILE_BYTES:,})")
  with paths.open(path, "rb") as f:
    try:
      obj = _ArrayUnpickler(f).load()
    except UnsafePickleError as e:
      raise UnsafePickleError(f"{path}: {e}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
      raise UserInputError(f"{path}: not a readable pickle of arrays ({type(e).__name__}: {one_line(e, 200)})") from e
  try:
    return _resolve_arrays(obj, path)
  except RecursionError as e:  # nested too deeply, or a container that holds itself
    raise UserInputError(f"{path}: a pickle nested too deeply (or holding itself)") from e


def _resolve_arrays(obj: Any, where: str) -> Any:
  """Replaces every `_PendingArray` in nested dicts / lists / tuples by its array."""
  if isinstance(obj, _PendingArray):
    if obj.array is None:
      raise UserInputError(f"{where}: a numpy array without its data")
    return obj.array
  if isinstance(obj, Mapping):
    return {k: _resolve_arrays(v, where) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return type(obj)(_resolve_arrays(v, where) for v in obj)
  return obj

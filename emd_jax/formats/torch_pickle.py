"""Reading EDM network pickles and PyTorch checkpoints without torch or EDM's code.

A restricted unpickler resolves only an allowlist of globals, each to a local,
inert stand-in, and executes nothing from the file:

- EDM's `torch_utils.persistence._reconstruct_persistent_obj(meta)` becomes a
  `PersistentObject` recording the class name and the instance state (EDM's
  persistence records constructor arguments in `_init_args`/`_init_kwargs`);
  the embedded module source is kept as text and never run.
- plain torch modules (`torch.nn.*`, e.g. `ModuleDict`) become `TorchModule`
  holders of their `__dict__`.
- tensors: `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` build numpy
  arrays from storages, which come either as `torch.storage._load_from_bytes`
  bytes (a nested `torch.save` in the legacy format; EDM's pickles) or as
  persistent ids of a zip-format `torch.save` archive (`.pt` state dicts).

Anything else (`os.system`, `builtins.eval`, ...) raises `UnsafePickleError`
(a `pickle.UnpicklingError` and an `errors.UserError`) naming the global. The
allowlist and why each entry is there: docs/convert.md.

Size limits: a file over `MAX_FILE_BYTES` is refused before it is read, and
the tensor data one load may allocate (storage bytes, decompressed zip
entries, tensor copies) is capped at `MAX_ALLOC_BYTES` in total, so a few
bytes claiming a huge storage, a zip bomb or a zero-stride tensor cannot
exhaust memory. Both are module constants (EDM's largest published network,
ImageNet-64 ADM, is a 1.2 GB pickle).
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from emd_jax.errors import UnsafePickleError
from emd_jax.formats import paths

MAX_FILE_BYTES = 4 << 30
MAX_ALLOC_BYTES = 8 << 30

# torch storage class name -> numpy dtype.
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": None,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# How `torch.save(..., _use_new_zipfile_serialization=False)` starts (magic, protocol 2).
_LEGACY_PREFIX = pickle.dumps(_LEGACY_MAGIC, protocol=2)


class PersistentObject:
  """An EDM `persistence`-decorated object: class name, state, recorded init kwargs."""

  def __init__(self, meta: dict):
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
      raise pickle.UnpicklingError("torch_utils.persistence object without a dict of metadata and a class name")
    self.class_name = meta.get("class_name")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"persistent {self.class_name} with a state of type {type(state).__name__}")
    self.state = dict(state)
    self.module_src = meta.get("module_src")  # text only; never executed

  @property
  def init_args(self) -> tuple:
    return tuple(self.state.get("_init_args") or ())

  @property
  def init_kwargs(self) -> dict:
    return dict(self.state.get("_init_kwargs") or {})

  def __repr__(self):
    return f"PersistentObject({self.class_name})"


class TorchModule:
  """A non-persistent `torch.nn` module (e.g. `ModuleDict`): its class and `__dict__`."""

  class_name = "torch.nn.Module"

  def __init__(self):
    self.state: dict = {}

  def __setstate__(self, state):
    self.state = dict(state) if isinstance(state, dict) else {"state": state}


def _module_class(qualname: str) -> type:
  """An inert `TorchModule` subclass standing in for a `torch.nn` class."""
  return type(qualname.rsplit(".", 1)[-1], (TorchModule,), {"class_name": qualname})


class _StorageType:
  """A torch storage class in a persistent id; knows its numpy dtype."""

  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise UnsafePickleError(f"refusing to load global torch.{name} (not a supported storage type)")
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


def _frombuffer(buf: bytes, storage_type: _StorageType) -> np.ndarray:
  if storage_type.name == "BFloat16Storage":
    u16 = np.frombuffer(buf, np.uint16).astype(np.uint32) << 16
    return u16.view(np.float32)
  return np.frombuffer(buf, storage_type.dtype)


class _Budget:
  """The bytes one load may still allocate for tensor data (`MAX_ALLOC_BYTES` in all)."""

  def __init__(self, limit: int):
    self.left = limit
    self.limit = limit

  def take(self, nbytes: int, what: str) -> None:
    if nbytes < 0 or nbytes > self.left:
      raise UnsafePickleError(
        f"refusing to allocate {nbytes:,} bytes for {what}: over the size limit of {self.limit:,} bytes "
        "(emd_jax.formats.torch_pickle.MAX_ALLOC_BYTES)"
      )
    self.left -= nbytes


def _rebuild_tensor(storage, offset, size, stride, *unused, budget: _Budget | None = None) -> np.ndarray:
  """numpy view of `storage` with torch's (element) strides, copied to a fresh array."""
  if storage is _PLACEHOLDER:
    return None
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}, not a storage")
  try:
    size, stride, offset = tuple(int(n) for n in size), tuple(int(s) for s in stride), int(offset)
  except (TypeError, ValueError) as e:
    raise pickle.UnpicklingError(f"bad tensor geometry size={size!r} stride={stride!r}") from e
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride}")
  span = sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  last = offset + span if all(size) else offset - 1
  if last >= storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size} overruns its storage ({storage.size})")
  if not size:
    return storage[offset].copy()
  if budget is not None:
    budget.take(int(np.prod(size, dtype=object)) * storage.itemsize, f"a tensor of size {size}")
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
  )
  return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
  """How protocol-2 pickles store bytes: `_codecs.encode(text, 'latin1')`."""
  if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
    raise pickle.UnpicklingError(f"unexpected encoding {encoding!r}")
  return text.encode(encoding)


class NumpyDtype:
  """`numpy.dtype(spec, align, copy)` for numeric dtypes; BUILD's state sets only the byte order."""

  def __init__(self, spec, align=False, copy=False):
    del align, copy
    try:
      self.dtype = np.dtype(spec if isinstance(spec, str) else str(spec))
    except TypeError as e:
      raise UnsafePickleError(f"refusing numpy dtype {spec!r:.40}") from e
    if self.dtype.kind not in "biufc":
      raise UnsafePickleError(f"refusing numpy dtype {self.dtype} (only numeric dtypes are allowed)")

  def __setstate__(self, state) -> None:
    # (version, byteorder, subarray, names, fields, elsize, alignment, flags); a numeric dtype has no
    # subarray, names or fields.
    if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "=", "|")):
      raise pickle.UnpicklingError(f"bad numpy dtype state {state!r:.60}")
    if any(x is not None for x in state[2:5]):
      raise UnsafePickleError("refusing a structured or sub-array numpy dtype (only numeric dtypes are allowed)")
    if state[1] in "<>":
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data: bytes = b""):
  """`numpy._core.multiarray.scalar`: a numeric numpy scalar from its bytes."""
  if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
    raise pickle.UnpicklingError(f"bad numpy scalar of {getattr(dtype, 'dtype', dtype)!r}")
  return np.frombuffer(data, dtype.dtype)[0]


# (module, name) -> the inert stand-in it resolves to. Why each is needed: docs/convert.md.
ALLOWLIST = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("builtins", "set"): set,
  ("_codecs", "encode"): _codecs_encode,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
  ("dnnlib.util", "EasyDict"): dict,
  ("numpy", "dtype"): NumpyDtype,
  ("numpy.core.multiarray", "scalar"): _numpy_scalar,
  ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}
# Besides these: `torch.storage._load_from_bytes`, `torch.<X>Storage` for the storage
# types of `_STORAGE_DTYPES`, and `torch.nn.modules.*` classes (inert `TorchModule`s).


class _Unpickler(pickle.Unpickler):
  """Resolves only allowlisted globals; storages come from `load_storage(pid)`."""

  def __init__(self, f, load_storage=None, budget: _Budget | None = None):
    super().__init__(f)
    self._load_storage = load_storage
    self._budget = budget or _Budget(MAX_ALLOC_BYTES)

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in ALLOWLIST:
      fn = ALLOWLIST[(module, name)]
      return functools.partial(fn, budget=self._budget) if fn is _rebuild_tensor else fn
    if module == "torch.storage" and name == "_load_from_bytes":
      return functools.partial(load_legacy_bytes, budget=self._budget)
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if module.startswith("torch.nn.modules.") or module == "torch.nn":
      return _module_class(f"{module}.{name}")
    raise UnsafePickleError(f"refusing to load global {module}.{name} (not an allowlisted type)")

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    return self._load_storage(pid)


def _restricted_load(f, load_storage=None, budget: _Budget | None = None):
  return _Unpickler(f, load_storage, budget).load()


def load_legacy_bytes(data: bytes, budget: _Budget | None = None):
  """Parses a legacy (non-zip) `torch.save` stream, as inside EDM pickles."""
  if not isinstance(data, bytes):
    raise pickle.UnpicklingError(f"torch.storage._load_from_bytes of a {type(data).__name__}, not bytes")
  budget = budget or _Budget(MAX_ALLOC_BYTES)
  if data[:2] == b"PK":
    return load_zip(io.BytesIO(data), budget)
  if not data.startswith(_LEGACY_PREFIX):
    raise pickle.UnpicklingError("not a torch legacy serialization (bad magic number)")
  f = io.BytesIO(data)
  _restricted_load(f, budget=budget)  # magic number
  _restricted_load(f, budget=budget)  # protocol version
  sys_info = _restricted_load(f, budget=budget)
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise pickle.UnpicklingError("big-endian torch files are not supported")
  types: dict[str, _StorageType] = {}

  def note_storage(pid):
    key, stype = _storage_pid(pid)
    types[key] = stype
    return _PLACEHOLDER

  start = f.tell()
  _restricted_load(f, note_storage, budget)  # first pass: find the storages and the data offset
  end = f.tell()
  arrays = {}
  keys = _restricted_load(f, budget=budget)
  if not isinstance(keys, list):
    raise pickle.UnpicklingError("torch legacy serialization: bad storage key list")
  for key in keys:
    if str(key) not in types:
      raise pickle.UnpicklingError(f"torch legacy serialization: storage {key!r} is not used by the pickle")
    stype = types[str(key)]
    head = f.read(8)
    if len(head) != 8:
      raise pickle.UnpicklingError("torch legacy serialization: truncated storage data")
    (numel,) = struct.unpack("<q", head)
    width = 2 if stype.name == "BFloat16Storage" else np.dtype(stype.dtype).itemsize
    budget.take(numel * width, f"storage {key} ({numel:,} elements)")
    buf = f.read(numel * width)
    if len(buf) != numel * width:
      raise pickle.UnpicklingError(
        f"torch legacy serialization: storage {key} truncated ({len(buf)} of {numel * width} bytes)"
      )
    arrays[str(key)] = _frombuffer(buf, stype)
  missing = sorted(set(types) - set(arrays))
  if missing:
    raise pickle.UnpicklingError(f"torch legacy serialization: no data for storages {missing}")
  # Second pass over the same pickle bytes, now with the storages' data.
  body = io.BytesIO(data[start:end])
  return _restricted_load(body, lambda pid: arrays[_storage_pid(pid)[0]], budget)


_PLACEHOLDER = object()  # stands for a storage whose bytes are not read yet


def _storage_pid(pid) -> tuple[str, _StorageType]:
  """`(key, storage type)` from a `('storage', type, key, location, numel[, view])` id."""
  if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
  if not isinstance(pid[1], _StorageType):
    raise pickle.UnpicklingError(f"bad storage type in persistent id {pid!r}")
  if len(pid) > 5 and pid[5] is not None:
    raise pickle.UnpicklingError("storage views are not supported")
  return str(pid[2]), pid[1]


def load_zip(f, budget: _Budget | None = None) -> Any:
  """Parses a zip-format `torch.save` archive (`.pt`), tensors as numpy arrays."""
  budget = budget or _Budget(MAX_ALLOC_BYTES)
  zf = zipfile.ZipFile(f)
  names = zf.namelist()
  pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
  if not pkl:
    raise pickle.UnpicklingError("zip archive has no data.pkl: not a torch.save file")
  prefix = pkl[0][: -len("data.pkl")]
  byteorder = prefix + "byteorder"
  if byteorder in names and zf.read(byteorder).strip() != b"little":
    raise pickle.UnpicklingError("big-endian torch files are not supported")

  def read(name: str) -> bytes:
    try:
      info = zf.getinfo(name)
    except KeyError as e:
      raise pickle.UnpicklingError(f"zip archive has no entry {name}") from e
    budget.take(info.file_size, f"zip entry {name}")
    return zf.read(name)

  def load_storage(pid):
    key, stype = _storage_pid(pid)
    return _frombuffer(read(f"{prefix}data/{key}"), stype)

  return _restricted_load(io.BytesIO(read(pkl[0])), load_storage, budget)


def load_file(path: str) -> Any:
  """Loads an EDM network pickle or a torch checkpoint (zip or legacy) safely.

  Raises `UnsafePickleError` for a refused global or an allocation over the limit, and
  `pickle.UnpicklingError`, `zipfile.BadZipFile`, `EOFError` (and others of the standard
  unpickler) for damaged files; `emd_jax.convert` reports them naming the file.
  """
  size = paths.getsize(path)
  if size > MAX_FILE_BYTES:
    raise UnsafePickleError(
      f"refusing to read {size:,} bytes: over the file size limit of {MAX_FILE_BYTES:,} "
      "(emd_jax.formats.torch_pickle.MAX_FILE_BYTES)"
    )
  data = paths.read_bytes(path)
  if data[:2] == b"PK":
    return load_zip(io.BytesIO(data))
  if data.startswith(_LEGACY_PREFIX):
    return load_legacy_bytes(data)
  return _restricted_load(io.BytesIO(data))  # a plain pickle, e.g. EDM's network-*.pkl

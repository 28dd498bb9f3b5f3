"""Convert EDM checkpoints into emd_jax teacher checkpoints.

    python -m emd_jax.convert --edm edm-cifar10-32x32-uncond-vp.pkl --out teachers/cifar10_vp
    python -m emd_jax.convert --state_dict net.pt --arch_json arch.json --out teachers/mine

`--edm` reads a network pickle as NVlabs/edm publishes it (a dict whose 'ema'
entry is the pickled network) with the restricted unpickler of
`emd_jax.formats.torch_pickle`: neither torch nor EDM's code is needed and nothing in
the file is executed. The architecture comes from the constructor arguments
EDM's persistence module recorded. `--state_dict` reads a torch state dict
(`.pt`, zip or legacy format, also without torch); its architecture is given
by `--arch_json` (a file or inline JSON): either an emd_jax spec (with "arch")
or EDM's own kwargs (with "class_name" like "EDMPrecond" and "model_type").

Naming: EDM key `model.enc.32x32_block0.conv0.weight` <-> Flax path
`('model', 'enc_32x32_block0', 'conv0', 'weight')`; linear weights are
transposed to `[in, out]`, convolution weights to HWIO. Every tensor of the
checkpoint must be used and every Flax parameter filled, else a `ValueError`
names the offenders.

Every bad input (a file that is not a pickle, a truncated one, a refused global,
an architecture JSON missing a field, tensors that do not fit it) is an
`errors.UserInputError` naming the file or flag; the command prints it as one
`error: ...` line, exits with status 2 and writes nothing to `--out`.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax import cli
from emd_jax.errors import UnsafePickleError, UserInputError, one_line
from emd_jax.formats import fileio, paths, torch_pickle

_PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
_ARCH_NAMES = {"SongUNet": "song_unet", "DhariwalUNet": "dhariwal_unet"}
# Precond kwargs EDM records that are runtime-only here.
_IGNORED_KWARGS = {"use_fp16", "class_name"}
# EDM buffers computed from constructor arguments: checked, not loaded.
_DERIVED_BUFFERS = ("resample_filter",)


# ----------------------------------------------------------------------------
# Architecture.


# Spec fields that must be positive integers / lists of them (checked before any network is built).
_INT_FIELDS = ("img_resolution", "in_channels", "out_channels", "label_dim", "model_channels", "num_blocks")
_LIST_FIELDS = ("channel_mult", "attn_resolutions")


def _checked_spec(spec: dict, where: str) -> dict:
  """`complete_spec(spec)` with its errors, and wrongly typed core fields, named after `where`."""
  from emd_jax.nets.edm_unet import complete_spec

  try:
    spec = complete_spec(spec)
  except (ValueError, TypeError) as e:
    raise UserInputError(f"{where}: {one_line(e, 300)}") from e
  for key in _INT_FIELDS:
    v = spec.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 1 << 16:
      raise UserInputError(f"{where}: field {key!r} must be a non-negative integer, got {v!r:.60}")
  if spec["img_resolution"] < 1 or spec["in_channels"] < 1:
    raise UserInputError(f"{where}: img_resolution and the channel count must be >= 1")
  for key in _LIST_FIELDS:
    v = spec.get(key, [])
    if not (isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)):
      raise UserInputError(f"{where}: field {key!r} must be a list of non-negative integers, got {v!r:.60}")
  return spec


def spec_from_edm_kwargs(class_name: str, kwargs: dict, where: str = "EDM network") -> dict:
  """An emd_jax spec from an EDM precond class name and its constructor kwargs.

  `where` (a file or flag) starts every error message.
  """
  if not isinstance(class_name, str) or not isinstance(kwargs, dict):
    raise UserInputError(f"{where}: class_name must be a string and the kwargs an object")
  short = class_name.rsplit(".", 1)[-1]
  if short not in _PRECOND_NAMES:
    raise UserInputError(f"{where}: unsupported EDM network class {class_name!r}; supported: {sorted(_PRECOND_NAMES)}")
  kw = dict(kwargs)
  model_type = kw.pop("model_type", "DhariwalUNet" if short == "EDMPrecond" else "SongUNet")
  if model_type not in _ARCH_NAMES:
    raise UserInputError(f"{where}: unsupported EDM model_type {model_type!r}; supported: {sorted(_ARCH_NAMES)}")
  for key in ("img_resolution", "img_channels"):
    if key not in kw:
      raise UserInputError(f"{where}: missing field {key!r} (EDM's {class_name} constructor argument)")
  spec = {"arch": _ARCH_NAMES[model_type], "precond": _PRECOND_NAMES[short]}
  channels = kw.pop("img_channels")
  spec.update(in_channels=channels, out_channels=channels)
  for key in _IGNORED_KWARGS:
    kw.pop(key, None)
  spec.update(kw)
  return _checked_spec(spec, where)


def _positional_kwargs(args: tuple, where: str = "EDM network") -> dict:
  names = ("img_resolution", "img_channels", "label_dim", "use_fp16")
  if len(args) > len(names):
    raise UserInputError(f"{where}: too many positional constructor arguments: {args!r:.100}")
  return dict(zip(names, args, strict=False))


# ----------------------------------------------------------------------------
# Names and layouts.


def flax_path_to_edm(path: tuple[str, ...]) -> str:
  """`('model', 'enc_32x32_conv', 'weight')` -> `'model.enc.32x32_conv.weight'`."""
  parts = []
  for p in path:
    if p.startswith(("enc_", "dec_")):
      parts += [p[:3], p[4:]]
    else:
      parts.append(p)
  return ".".join(parts)


def to_edm_layout(value: np.ndarray) -> np.ndarray:
  """Flax layout -> EDM layout (linear `[in,out]`->`[out,in]`, conv HWIO->OIHW)."""
  value = np.asarray(value)
  if value.ndim == 2:
    return value.T
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value


def to_flax_layout(value: np.ndarray) -> np.ndarray:
  """EDM layout -> Flax layout; inverse of `to_edm_layout`."""
  value = np.asarray(value)
  if value.ndim == 2:
    return value.T
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def flax_to_edm(params: Any) -> dict[str, np.ndarray]:
  """EDM-named state dict (float32 numpy, EDM layouts) from Flax params."""
  return {flax_path_to_edm(p): to_edm_layout(np.asarray(v)) for p, v in _flatten(params).items()}


def abstract_params(spec: dict) -> dict:
  """The Flax parameter tree of a spec, as shapes only (`jax.eval_shape`)."""
  from emd_jax.nets import build

  module = build(spec)
  res, ch = spec["img_resolution"], spec["in_channels"]
  x = jnp.zeros((1, res, res, ch))
  fn = lambda: module.init(jax.random.key(0), x, jnp.ones((1,)))["params"]
  return jax.eval_shape(fn)


def edm_to_flax(state_dict: dict[str, np.ndarray], spec: dict, where: str = "EDM checkpoint") -> dict:
  """Flax params for `spec` from an EDM state dict; errors name every mismatch.

  Keys may carry the precond's `model.` prefix or not. Derived buffers
  (`resample_filter`) are checked against the spec's filter and dropped.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items() if v is not None}
  if sd and not any(k.startswith("model.") for k in sd):
    sd = {f"model.{k}": v for k, v in sd.items()}
  _check_derived_buffers(sd, spec, where)
  try:
    expected = _flatten(abstract_params(spec))
  except Exception as e:  # noqa: BLE001  (field values the network code rejects)
    raise UserInputError(f"{where}: the architecture does not build ({type(e).__name__}: {one_line(e, 200)})") from e
  flat, missing, bad_shape = {}, [], []
  for path, leaf in expected.items():
    name = flax_path_to_edm(path)
    if name not in sd:
      missing.append(name)
      continue
    value = to_flax_layout(sd.pop(name))
    if value.shape != tuple(leaf.shape):
      bad_shape.append(
        f"{name}: checkpoint {tuple(to_edm_layout(value).shape)} vs network "
        f"{tuple(to_edm_layout(np.zeros(leaf.shape)).shape)}"
      )
      continue
    if not np.issubdtype(value.dtype, np.floating):
      bad_shape.append(f"{name}: dtype {value.dtype}, expected floating point")
      continue
    if not np.isfinite(value).all():
      bad_shape.append(f"{name}: holds non-finite values")
      continue
    flat[path] = value.astype(np.float32)
  problems = []
  if missing:
    problems.append(f"missing parameters: {missing}")
  if sd:
    problems.append(f"unknown parameters: {sorted(sd)}")
  if bad_shape:
    problems.append(f"shape mismatches: {bad_shape}")
  if problems:
    text = "; ".join(problems)
    text = text if len(text) <= 600 else text[:600] + " ..."
    raise UserInputError(f"{where}: does not fit the {spec['arch']} spec: {text}")
  return _unflatten(flat)


def _check_derived_buffers(sd: dict, spec: dict, where: str = "EDM checkpoint") -> None:
  """Pops `*.resample_filter` buffers after checking them against the spec's filter."""
  f = np.asarray(spec.get("resample_filter", [1, 1]), np.float32)
  expect = np.outer(f, f) / np.square(f.sum())
  for name in [k for k in sd if k.endswith(_DERIVED_BUFFERS)]:
    value = np.asarray(sd.pop(name), np.float32)
    if value.size != expect.size or not np.allclose(value.reshape(expect.shape), expect):
      raise UserInputError(f"{where}: buffer {name} does not match resample_filter {f.tolist()}")


# ----------------------------------------------------------------------------
# EDM pickles.


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Parameters and buffers of an unpickled module tree, named like `state_dict()`."""
  state = obj.state
  out = {}
  for group in ("_parameters", "_buffers"):
    for k, v in (state.get(group) or {}).items():
      if v is not None:
        out[prefix + k] = np.asarray(v)
  for k, child in (state.get("_modules") or {}).items():
    if child is not None:
      out.update(module_state_dict(child, f"{prefix}{k}."))
  return out


# What the standard unpickler and the torch readers raise on a damaged or malformed file.
_DAMAGED = (
  pickle.UnpicklingError,
  EOFError,
  zipfile.BadZipFile,
  zipfile.LargeZipFile,
  struct.error,
  ValueError,
  TypeError,
  AttributeError,
  KeyError,
  IndexError,
  OverflowError,
  UnicodeDecodeError,
  RecursionError,
  MemoryError,
)


def _load(path: str, flag: str) -> Any:
  """`torch_pickle.load_file(path)`, every failure a `UserInputError` naming the file."""
  fileio.require_file(path, f"{flag} file")
  try:
    return torch_pickle.load_file(path)
  except UnsafePickleError as e:
    raise UnsafePickleError(f"{path}: {e}") from e
  except _DAMAGED as e:
    what = "truncated" if isinstance(e, EOFError) else f"{type(e).__name__}: {one_line(e, 200)}"
    raise UserInputError(f"{path}: not a readable pickle or torch file ({what})") from e


def read_edm_pickle(path: str, key: str = "ema") -> tuple[dict, dict[str, np.ndarray]]:
  """`(spec, state_dict)` of the network stored under `key` in an EDM pickle."""
  data = _load(path, "--edm")
  net = data.get(key) if isinstance(data, dict) else data
  if net is None:
    raise UserInputError(f"{path}: no {key!r} entry; keys: {sorted(data, key=str) if isinstance(data, dict) else '-'}")
  if not isinstance(net, torch_pickle.PersistentObject):
    raise UserInputError(f"{path}: {key!r} is not an EDM persistent network ({type(net).__name__})")
  try:
    args, kwargs = net.init_args, net.init_kwargs
    state_dict = module_state_dict(net)
  except (AttributeError, TypeError, ValueError) as e:
    raise UserInputError(f"{path}: {key!r} is not a well-formed EDM network ({type(e).__name__}: {e})") from e
  kwargs = {**_positional_kwargs(args, path), **kwargs}
  spec = spec_from_edm_kwargs(net.class_name, kwargs, f"{path}: the network's constructor arguments")
  return spec, state_dict


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  obj = _load(path, "--state_dict")
  for key in ("state_dict", "model", "ema"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise UserInputError(f"{path}: expected a state dict, got {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise UserInputError(f"{path}: entries that are not named tensors: {bad[:8]}")
  return dict(obj)


def spec_from_json(text_or_path: str) -> dict:
  """A completed spec from an arch JSON (a file path or inline JSON)."""
  arch = fileio.parse_json_arg(text_or_path, "--arch_json")
  where = f"--arch_json {text_or_path}" if paths.exists(text_or_path) else "--arch_json"
  if "arch" in arch:
    return _checked_spec(arch, where)
  arch = dict(arch)
  return spec_from_edm_kwargs(arch.pop("class_name", "EDMPrecond"), arch, where)


def convert(
  out: str,
  edm: str | None = None,
  state_dict: str | None = None,
  arch_json: str | None = None,
  source: str | None = None,
) -> dict:
  """Converts one checkpoint and writes a teacher directory; returns its spec."""
  from emd_jax.teachers import network

  if (edm is None) == (state_dict is None):
    raise UserInputError("--edm/--state_dict: give exactly one of them")
  if paths.exists(out) and not paths.isdir(out):
    raise UserInputError(f"--out {out}: exists and is not a directory")
  if edm is not None:
    spec, sd = read_edm_pickle(edm)
  else:
    if arch_json is None:
      raise UserInputError("--arch_json: --state_dict needs it (an emd_jax spec or EDM constructor kwargs)")
    spec, sd = spec_from_json(arch_json), _read_state_dict(state_dict)
  params = edm_to_flax(sd, spec, edm or state_dict)  # everything is checked before anything is written
  src = source or os.path.basename(edm or state_dict)
  network.save(out, spec, params, {"source": src})
  return spec


def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog="emd_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--edm", help="EDM network pickle (.pkl)")
  parser.add_argument("--state_dict", help="torch state dict (.pt)")
  parser.add_argument("--arch_json", help="architecture for --state_dict: JSON file or string")
  parser.add_argument("--out", required=True, help="teacher checkpoint directory to write")
  parser.add_argument("--source", help="provenance string stored in teacher.json")
  args = parser.parse_args(argv)
  spec = convert(args.out, args.edm, args.state_dict, args.arch_json, args.source)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract_params(spec)))
  print(f"wrote {args.out}: {spec['arch']} ({spec['precond']} precond), {n:,} parameters")


def entry() -> None:
  """The command line: bad input is one `error: ...` line and exit status 2 (`--debug`: traceback)."""
  raise SystemExit(cli.run_argv(main))


if __name__ == "__main__":
  entry()

"""Convert EDM checkpoints into emd_jax teacher checkpoints.

    python -m emd_jax.convert --edm edm-cifar10-32x32-uncond-vp.pkl --out teachers/cifar10_vp
    python -m emd_jax.convert --state_dict net.pt --arch_json arch.json --out teachers/mine

`--edm` reads a network pickle as NVlabs/edm publishes it (a dict whose 'ema'
entry is the pickled network) with the restricted unpickler of
`emd_jax.torch_pickle`: neither torch nor EDM's code is needed and nothing in
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
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax import torch_pickle

_PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
_ARCH_NAMES = {"SongUNet": "song_unet", "DhariwalUNet": "dhariwal_unet"}
# Precond kwargs EDM records that are runtime-only here.
_IGNORED_KWARGS = {"use_fp16", "class_name"}
# EDM buffers computed from constructor arguments: checked, not loaded.
_DERIVED_BUFFERS = ("resample_filter",)


# ----------------------------------------------------------------------------
# Architecture.


def spec_from_edm_kwargs(class_name: str, kwargs: dict) -> dict:
  """An emd_jax spec from an EDM precond class name and its constructor kwargs."""
  short = class_name.rsplit(".", 1)[-1]
  if short not in _PRECOND_NAMES:
    raise ValueError(f"unsupported EDM network class {class_name!r}; supported: {sorted(_PRECOND_NAMES)}")
  kw = dict(kwargs)
  model_type = kw.pop("model_type", "DhariwalUNet" if short == "EDMPrecond" else "SongUNet")
  if model_type not in _ARCH_NAMES:
    raise ValueError(f"unsupported EDM model_type {model_type!r}; supported: {sorted(_ARCH_NAMES)}")
  spec = {"arch": _ARCH_NAMES[model_type], "precond": _PRECOND_NAMES[short]}
  channels = kw.pop("img_channels")
  spec.update(in_channels=channels, out_channels=channels)
  for key in _IGNORED_KWARGS:
    kw.pop(key, None)
  spec.update(kw)
  from emd_jax.nets.edm_unet import complete_spec

  return complete_spec(spec)


def _positional_kwargs(args: tuple) -> dict:
  names = ("img_resolution", "img_channels", "label_dim", "use_fp16")
  if len(args) > len(names):
    raise ValueError(f"too many positional constructor arguments: {args!r}")
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


def edm_to_flax(state_dict: dict[str, np.ndarray], spec: dict) -> dict:
  """Flax params for `spec` from an EDM state dict; errors name every mismatch.

  Keys may carry the precond's `model.` prefix or not. Derived buffers
  (`resample_filter`) are checked against the spec's filter and dropped.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items() if v is not None}
  if sd and not any(k.startswith("model.") for k in sd):
    sd = {f"model.{k}": v for k, v in sd.items()}
  _check_derived_buffers(sd, spec)
  expected = _flatten(abstract_params(spec))
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
    flat[path] = value.astype(np.float32)
  problems = []
  if missing:
    problems.append(f"missing parameters: {missing}")
  if sd:
    problems.append(f"unknown parameters: {sorted(sd)}")
  if bad_shape:
    problems.append(f"shape mismatches: {bad_shape}")
  if problems:
    raise ValueError(f"EDM checkpoint does not fit {spec['arch']} spec: " + "; ".join(problems))
  return _unflatten(flat)


def _check_derived_buffers(sd: dict, spec: dict) -> None:
  """Pops `*.resample_filter` buffers after checking them against the spec's filter."""
  f = np.asarray(spec.get("resample_filter", [1, 1]), np.float32)
  expect = np.outer(f, f) / np.square(f.sum())
  for name in [k for k in sd if k.endswith(_DERIVED_BUFFERS)]:
    value = np.asarray(sd.pop(name), np.float32)
    if value.size != expect.size or not np.allclose(value.reshape(expect.shape), expect):
      raise ValueError(f"buffer {name} does not match resample_filter {f.tolist()}")


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


def read_edm_pickle(path: str, key: str = "ema") -> tuple[dict, dict[str, np.ndarray]]:
  """`(spec, state_dict)` of the network stored under `key` in an EDM pickle."""
  data = torch_pickle.load_file(path)
  net = data.get(key) if isinstance(data, dict) else data
  if net is None:
    raise ValueError(f"{path}: no {key!r} entry; keys: {sorted(data) if isinstance(data, dict) else '-'}")
  if not isinstance(net, torch_pickle.PersistentObject):
    raise ValueError(f"{path}: {key!r} is not an EDM persistent network ({type(net).__name__})")
  kwargs = {**_positional_kwargs(net.init_args), **net.init_kwargs}
  spec = spec_from_edm_kwargs(net.class_name, kwargs)
  return spec, module_state_dict(net)


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  obj = torch_pickle.load_file(path)
  for key in ("state_dict", "model", "ema"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: entries that are not tensors: {bad}")
  return dict(obj)


def spec_from_json(text_or_path: str) -> dict:
  """A completed spec from an arch JSON (a file path or inline JSON)."""
  text = text_or_path
  if os.path.exists(text_or_path):
    with open(text_or_path) as f:
      text = f.read()
  arch = json.loads(text)
  from emd_jax.nets.edm_unet import complete_spec

  if "arch" in arch:
    return complete_spec(arch)
  arch = dict(arch)
  return spec_from_edm_kwargs(arch.pop("class_name", "EDMPrecond"), arch)


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
    raise ValueError("give exactly one of --edm or --state_dict")
  if edm is not None:
    spec, sd = read_edm_pickle(edm)
  else:
    if arch_json is None:
      raise ValueError("--state_dict needs --arch_json (emd_jax spec or EDM constructor kwargs)")
    spec, sd = spec_from_json(arch_json), _read_state_dict(state_dict)
  params = edm_to_flax(sd, spec)
  src = source or os.path.basename(edm or state_dict)
  network.save(out, spec, params, {"source": src})
  return spec


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--edm", help="EDM network pickle (.pkl)")
  parser.add_argument("--state_dict", help="torch state dict (.pt)")
  parser.add_argument("--arch_json", help="architecture for --state_dict: JSON file or string")
  parser.add_argument("--out", required=True, help="teacher checkpoint directory to write")
  parser.add_argument("--source", help="provenance string stored in teacher.json")
  args = parser.parse_args(argv)
  spec = convert(args.out, args.edm, args.state_dict, args.arch_json, args.source)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract_params(spec)))
  print(f"wrote {args.out}: {spec['arch']} ({spec['precond']} precond), {n:,} parameters")


if __name__ == "__main__":
  main()

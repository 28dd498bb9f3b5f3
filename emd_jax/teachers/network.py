"""Network teachers: a checkpoint directory holding a spec and its parameters.

Layout of a teacher directory:
  teacher.json    {"format_version": 1, "kind": "network", "net": <spec>,
                   "data_shape": [H, W, C], "num_classes": int,
                   "sigma_data": float, "source": str, ...}
  params.msgpack  `flax.serialization.msgpack_serialize` of the params pytree.
  _COMPLETE       the completion marker, written last (`fileio.publish`); readers
                  require it on object stores (`gs://`), warn without it locally.

Any spec `emd_jax.nets.build` understands can be saved (converted EDM
networks, teachers trained by emd_jax), so configs only name the directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from emd_jax.errors import UserInputError
from emd_jax.formats import fileio, paths
from emd_jax.teachers.base import Teacher

FORMAT_VERSION = 1
SPEC_FILE = "teacher.json"
PARAMS_FILE = "params.msgpack"
MARKER_KIND = "network_teacher"


def _data_shape(spec: dict) -> list[int]:
  if "data_shape" in spec:
    return list(spec["data_shape"])
  if "img_resolution" in spec:
    res = spec["img_resolution"]
    return [res, res, spec.get("in_channels", 3)]
  raise ValueError("cannot infer data_shape from spec; pass meta={'data_shape': ...}")


def save(path: str, spec: dict, params: Any, meta: dict | None = None) -> str:
  """Publishes a teacher directory (`fileio.publish`: whole, marker last); returns `path`.

  `meta` adds or overrides fields of teacher.json (e.g. "source", "data_shape").
  An existing directory at `path` is replaced.
  """
  meta = dict(meta or {})
  info = {
    "format_version": FORMAT_VERSION,
    "kind": "network",
    "net": spec,
    "data_shape": meta.pop("data_shape", None) or _data_shape(spec),
    "num_classes": int(meta.pop("num_classes", spec.get("label_dim", 0))),
    "sigma_data": float(meta.pop("sigma_data", spec.get("sigma_data", 0.5))),
    "source": str(meta.pop("source", "")),
  }
  info.update(meta)
  params = jax.tree.map(lambda v: np.asarray(v, np.float32), jax.device_get(params))
  path = paths.abspath(path)
  with fileio.publish(path, MARKER_KIND, tmp_prefix=".teacher-") as out:
    out.write(SPEC_FILE, json.dumps(info, indent=2, sort_keys=True))
    out.write(PARAMS_FILE, serialization.msgpack_serialize(params))
  return path


def read_info(path: str) -> dict:
  """The parsed, checked teacher.json of a teacher directory (`UserInputError` naming the file if unusable)."""
  from emd_jax import nets

  spec_file = os.path.join(path, SPEC_FILE)
  if paths.isdir(path):
    fileio.require_complete(path, "teacher checkpoint")
  if not paths.isfile(spec_file):
    raise FileNotFoundError(f"teacher checkpoint not found: {spec_file} is missing")
  info = fileio.read_json(spec_file, "teacher spec")
  if info.get("kind") != "network":
    raise UserInputError(f"{spec_file}: kind {info.get('kind')!r} is not 'network'")
  version = info.get("format_version", 0)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise UserInputError(
      f"{spec_file}: format_version {version!r} is newer than this emd_jax understands ({FORMAT_VERSION})"
    )
  fileio.require_fields(info, {"net": dict, "data_shape": list}, spec_file)
  fileio.check_shape_list(info["data_shape"], f"{spec_file}: data_shape")
  fileio.require_fields(info["net"], {"arch": str}, f"{spec_file}: net")
  if info["net"]["arch"] not in nets._BUILDERS:
    raise UserInputError(f"{spec_file}: unknown network arch {info['net']['arch']!r}; known: {sorted(nets._BUILDERS)}")
  optional = {"num_classes": int, "sigma_data": float}
  fileio.require_fields(info, {k: t for k, t in optional.items() if k in info}, spec_file)
  if info.get("num_classes", 0) < 0 or not info.get("sigma_data", 0.5) > 0:
    raise UserInputError(f"{spec_file}: num_classes must be >= 0 and sigma_data > 0")
  return info


def read_params(path: str, info: dict | None = None) -> tuple[dict, Any]:
  """`(info, params)` of a teacher directory, the params checked against the net teacher.json names.

  A directory whose params.msgpack belongs to another architecture, has missing or extra
  leaves, other shapes or dtypes, or non-finite values raises `UserInputError` naming it.
  """
  from emd_jax import nets

  info = read_info(path) if info is None else info
  params_file = os.path.join(path, PARAMS_FILE)
  if not paths.isfile(params_file):
    raise FileNotFoundError(f"teacher checkpoint not found: {params_file} is missing")
  params = fileio.read_msgpack(params_file, "teacher parameter file")
  try:
    expected = nets.abstract_params(info["net"], info["data_shape"], int(info.get("num_classes", 0)))
  except Exception as e:  # noqa: BLE001  (a spec the network code rejects: unknown or inconsistent fields)
    raise UserInputError(
      f"{os.path.join(path, SPEC_FILE)}: its net does not build for data shape {info['data_shape']} "
      f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    ) from e
  fileio.check_params(expected, params, f"{params_file} (net {info['net']['arch']!r} of {SPEC_FILE})", "float32")
  return info, params


def network_apply(net_spec: dict):
  """`apply(params, x, sigma, labels) -> D(x, sigma)` of the network `net_spec` describes."""
  from emd_jax.nets import build

  module = build(net_spec)

  def apply(p, x, sigma, labels=None):
    return module.apply({"params": p}, x, sigma, labels)

  return apply


def with_compute_dtype(teacher: Teacher, dtype: str | None) -> Teacher:
  """A network teacher that computes in `dtype` (its parameters, spec and guidance unchanged).

  The distillation job builds the generator and the fake denoiser with `config.compute_dtype`; the
  teacher computes in the same dtype so that at step 0, when the fake denoiser is a copy of the
  teacher, the score gap `D_fake - D_teacher` is exactly zero rather than bf16 round-off.
  Analytic teachers, teachers whose spec already has `dtype`, or `dtype=None`: returned as given.
  """
  if not dtype or teacher.spec.get("kind") != "network":
    return teacher
  net = teacher.spec["net"]
  if net.get("dtype", "float32") == dtype:
    return teacher  # the loader's apply already computes in `dtype`
  from emd_jax.teachers.guidance import guided_apply

  apply = network_apply({**net, "dtype": dtype})
  if teacher.spec.get("guidance_applied"):
    apply = guided_apply(apply, float(teacher.spec["guidance"]))
  return dataclasses.replace(teacher, apply=apply)


def load(path: str) -> Teacher:
  """Loads a teacher directory written by `save` (or `python -m emd_jax.convert`), checked first."""
  if not paths.isdir(path):
    raise FileNotFoundError(f"teacher checkpoint not found: {path} is not a directory")
  info, params = read_params(path)
  params = jax.tree.map(jnp.asarray, params)

  from emd_jax.teachers.guidance import with_guidance

  return with_guidance(  # applies a stored classifier-free guidance scale (conditional teachers)
    Teacher(
      apply=network_apply(info["net"]),
      params=params,
      data_shape=tuple(info["data_shape"]),
      num_classes=int(info.get("num_classes", 0)),
      sigma_data=float(info.get("sigma_data", 0.5)),
      spec=info,
    )
  )

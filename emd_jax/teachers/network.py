"""Network teachers: a checkpoint directory holding a spec and its parameters.

Layout of a teacher directory:
  teacher.json    {"format_version": 1, "kind": "network", "net": <spec>,
                   "data_shape": [H, W, C], "num_classes": int,
                   "sigma_data": float, "source": str, ...}
  params.msgpack  `flax.serialization.msgpack_serialize` of the params pytree.

Any spec `emd_jax.nets.build` understands can be saved (converted EDM
networks, teachers trained by emd_jax), so configs only name the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from emd_jax.fileio import publish_dir
from emd_jax.teachers.base import Teacher

FORMAT_VERSION = 1
SPEC_FILE = "teacher.json"
PARAMS_FILE = "params.msgpack"


def _data_shape(spec: dict) -> list[int]:
  if "data_shape" in spec:
    return list(spec["data_shape"])
  if "img_resolution" in spec:
    res = spec["img_resolution"]
    return [res, res, spec.get("in_channels", 3)]
  raise ValueError("cannot infer data_shape from spec; pass meta={'data_shape': ...}")


def save(path: str, spec: dict, params: Any, meta: dict | None = None) -> str:
  """Writes a teacher directory atomically (temp dir, then rename); returns `path`.

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
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".teacher-", dir=parent)
  try:
    with open(os.path.join(tmp, SPEC_FILE), "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, PARAMS_FILE), "wb") as f:
      f.write(serialization.msgpack_serialize(params))
    publish_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def read_info(path: str) -> dict:
  """The parsed teacher.json of a teacher directory (clear error if absent)."""
  spec_file = os.path.join(path, SPEC_FILE)
  if not os.path.isfile(spec_file):
    raise FileNotFoundError(f"teacher checkpoint not found: {spec_file} is missing")
  with open(spec_file) as f:
    info = json.load(f)
  if info.get("kind") != "network":
    raise ValueError(f"{spec_file}: kind {info.get('kind')!r} is not 'network'")
  if info.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(
      f"{spec_file}: format_version {info['format_version']} is newer than this emd_jax understands ({FORMAT_VERSION})"
    )
  return info


def load(path: str) -> Teacher:
  """Loads a teacher directory written by `save` (or `python -m emd_jax.convert`)."""
  from emd_jax.nets import build

  if not os.path.isdir(path):
    raise FileNotFoundError(f"teacher checkpoint not found: {path} is not a directory")
  info = read_info(path)
  params_file = os.path.join(path, PARAMS_FILE)
  if not os.path.isfile(params_file):
    raise FileNotFoundError(f"teacher checkpoint not found: {params_file} is missing")
  with open(params_file, "rb") as f:
    params = serialization.msgpack_restore(f.read())
  params = jax.tree.map(jnp.asarray, params)
  module = build(info["net"])

  def apply(p, x, sigma, labels=None):
    return module.apply({"params": p}, x, sigma, labels)

  from emd_jax.teachers.guidance import with_guidance

  return with_guidance(  # applies a stored classifier-free guidance scale (conditional teachers)
    Teacher(
      apply=apply,
      params=params,
      data_shape=tuple(info["data_shape"]),
      num_classes=int(info.get("num_classes", 0)),
      sigma_data=float(info.get("sigma_data", 0.5)),
      spec=info,
    )
  )

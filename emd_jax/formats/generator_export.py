"""Self-describing generator exports and the sampler that loads them.

`DIR/` holds `generator.json` (architecture spec, data shape, sigma_init,
dtype, number of classes, the training config, format and package versions)
and `params.msgpack` (Flax-serialised parameters). Loading needs only the
network code: no training module is imported.

    from emd_jax.formats.generator_export import load_sampler
    sampler = load_sampler("runs/gmm/export")
    x = sampler.sample(jax.random.key(0), 1000)          # [1000, *data_shape]
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from emd_jax import __version__, nets
from emd_jax.errors import UserInputError, one_line
from emd_jax.formats import fileio
from emd_jax.formats.fileio import publish_dir

FORMAT_VERSION = 1
SPEC_FILE = "generator.json"
PARAMS_FILE = "params.msgpack"


def write_export(
  directory: str,
  *,
  net_spec: dict,
  params,
  data_shape: tuple[int, ...],
  sigma_init: float,
  num_classes: int = 0,
  config: dict | None = None,
  dtype: str = "float32",
  extra: dict | None = None,
) -> str:
  """Writes the export atomically (temp dir, then rename over the old one)."""
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  meta = {
    "format_version": FORMAT_VERSION,
    "emd_jax_version": __version__,
    "kind": "one_step_generator",
    "net": net_spec,
    "data_shape": list(data_shape),
    "sigma_init": float(sigma_init),
    "num_classes": int(num_classes),
    "dtype": dtype,
    "config": config or {},
    **(extra or {}),
  }
  host_params = jax.tree.map(lambda x: np.asarray(x, dtype=dtype), jax.device_get(params))
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  with open(os.path.join(tmp, PARAMS_FILE), "wb") as f:
    f.write(serialization.msgpack_serialize(host_params))
  with open(os.path.join(tmp, SPEC_FILE), "w") as f:
    json.dump(meta, f, indent=2, default=str)
  publish_dir(tmp, directory)
  return directory


class Sampler:
  """A jitted one-step sampler: `x = g(z) = D_theta(z, sigma_init)`, `z ~ N(0, sigma_init^2 I)`."""

  def __init__(self, meta: dict, params):
    self.meta = meta
    self.params = params
    self.data_shape = tuple(meta["data_shape"])
    self.sigma_init = float(meta["sigma_init"])
    self.num_classes = int(meta.get("num_classes", 0))
    self.module = nets.build(meta["net"])

    def generate(params, z, labels):
      sigma = jnp.full((z.shape[0],), self.sigma_init)
      return self.module.apply({"params": params}, z, sigma, labels)

    self._generate = jax.jit(generate)

  def sample(self, rng, num: int, labels=None, batch_size: int = 4096) -> jax.Array:
    """`num` samples `[num, *data_shape]` (float32, data space).

    `labels`: int class ids `[num]` or one-hot `[num, C]` for class-conditional
    generators; default uniform random classes.
    """
    if isinstance(rng, int):
      rng = jax.random.key(rng)
    k_z, k_lab = jax.random.split(rng)
    z = self.sigma_init * jax.random.normal(k_z, (num, *self.data_shape))
    onehot = None
    if self.num_classes:
      if labels is None:
        labels = jax.random.randint(k_lab, (num,), 0, self.num_classes)
      labels = jnp.asarray(labels)
      onehot = labels if labels.ndim == 2 else jax.nn.one_hot(labels, self.num_classes)
    out = []
    for i in range(0, num, batch_size):
      lab = None if onehot is None else onehot[i : i + batch_size]
      out.append(self._generate(self.params, z[i : i + batch_size], lab))
    return jnp.concatenate(out, axis=0).astype(jnp.float32)


def read_export(directory: str) -> tuple[dict, dict]:
  """`(meta, params)` of an export directory, checked: the spec's fields and the params against its net.

  Raises `UserInputError` naming the file: bad JSON, a missing or mistyped field, an unknown
  architecture, params of another architecture (missing or extra leaves, shapes, dtypes), NaNs.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"not a generator export: {directory} is not a directory")
  spec_path = os.path.join(directory, SPEC_FILE)
  params_path = os.path.join(directory, PARAMS_FILE)
  for p in (spec_path, params_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"not a generator export (missing {os.path.basename(p)}): {directory}")
  meta = fileio.read_json(spec_path, "generator spec")
  version = meta.get("format_version", 0)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise UserInputError(f"{spec_path}: export format {version!r} is newer than this emd_jax ({FORMAT_VERSION})")
  if meta.get("kind", "one_step_generator") != "one_step_generator":
    raise UserInputError(f"{spec_path}: kind {meta.get('kind')!r} is not 'one_step_generator'")
  fileio.require_fields(meta, {"net": dict, "data_shape": list, "sigma_init": float}, spec_path)
  fileio.require_fields(meta["net"], {"arch": str}, f"{spec_path}: net")
  fileio.require_fields(meta, {k: t for k, t in (("num_classes", int), ("dtype", str)) if k in meta}, spec_path)
  data_shape = fileio.check_shape_list(meta["data_shape"], f"{spec_path}: data_shape")
  if not (np.isfinite(meta["sigma_init"]) and meta["sigma_init"] > 0):
    raise UserInputError(f"{spec_path}: sigma_init must be a finite number > 0, got {meta['sigma_init']}")
  dtype = meta.get("dtype", "float32")
  if dtype not in ("float32", "bfloat16", "float16"):
    raise UserInputError(f"{spec_path}: dtype must be float32, bfloat16 or float16, got {dtype!r}")
  num_classes = meta.get("num_classes", 0)
  if num_classes < 0:
    raise UserInputError(f"{spec_path}: num_classes must be >= 0, got {num_classes}")
  if meta["net"]["arch"] not in nets._BUILDERS:
    raise UserInputError(f"{spec_path}: unknown network arch {meta['net']['arch']!r}; known: {sorted(nets._BUILDERS)}")
  params = fileio.read_msgpack(params_path, "generator parameter file")
  try:
    expected = nets.abstract_params(meta["net"], data_shape, num_classes)
  except Exception as e:  # noqa: BLE001  (a spec the network code rejects)
    raise UserInputError(
      f"{spec_path}: its net does not build for data shape {list(data_shape)} ({type(e).__name__}: {one_line(e, 200)})"
    ) from e
  fileio.check_params(expected, params, f"{params_path} (net {meta['net']['arch']!r} of {SPEC_FILE})", dtype)
  return meta, params


def load_sampler(directory: str) -> Sampler:
  """Loads an export directory into a `Sampler` (one call, no training code), checked first (`read_export`)."""
  meta, params = read_export(directory)
  params = jax.tree.map(jnp.asarray, params)
  return Sampler(meta, params)

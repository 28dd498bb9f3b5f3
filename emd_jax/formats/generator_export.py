"""Self-describing generator exports and the sampler that loads them.

`DIR/` holds `generator.json` (architecture spec, data shape, sigma_init,
dtype, number of classes, the training config, format and package versions;
for a few-step student also `num_steps` and its grid `sigmas`; for a generator with a centred input,
`generator.latent_mean`, its centre `latent_mean`, flattened) and
`params.msgpack` (Flax-serialised parameters). Loading needs only the
network code: no training module is imported.

A one-step export is format 1 (`kind: one_step_generator`), readable by every
emd_jax. A few-step student is format 2 (`kind: few_step_generator`), so that
an emd_jax that cannot run its steps refuses it rather than sampling one step. An export with
`latent_mean` (`x = g(mu + z)`) is format 3, so that an emd_jax that would ignore the centre refuses it.

    from emd_jax.formats.generator_export import load_sampler
    sampler = load_sampler("runs/gmm/export")
    x = sampler.sample(jax.random.key(0), 1000)          # [1000, *data_shape]
    x2 = sampler.sample(jax.random.key(0), 1000, num_steps=2)  # a subset of a few-step grid
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from emd_jax import __version__, nets
from emd_jax.diffusion import student_sample, sub_grid
from emd_jax.errors import UserInputError, one_line
from emd_jax.formats import fileio, paths

FORMAT_VERSION = 3
KINDS = {"one_step_generator": 1, "few_step_generator": 2}  # kind -> its format version
LATENT_MEAN_FORMAT = 3  # any kind with a `latent_mean`
SPEC_FILE = "generator.json"
PARAMS_FILE = "params.msgpack"


def write_export(
  directory: str,
  *,
  net_spec: dict,
  params,
  data_shape: tuple[int, ...],
  sigma_init: float,
  sigmas: tuple[float, ...] | None = None,
  num_classes: int = 0,
  latent_mean=None,
  config: dict | None = None,
  dtype: str = "float32",
  extra: dict | None = None,
) -> str:
  """Publishes the export (`fileio.publish`: complete, with its `_COMPLETE` marker, or not at all).

  `sigmas`: a few-step student's grid `(sigma_init, ..., 0.0)` (N + 1 levels); None or a
  two-level grid is the one-step generator. `latent_mean`: the centre `mu` of the first input
  (`data_shape`; the sampler draws `mu + sigma_init * N(0, I)`), None for 0.
  """
  few = sigmas is not None and len(sigmas) > 2
  kind = "few_step_generator" if few else "one_step_generator"
  meta = {
    "format_version": KINDS[kind] if latent_mean is None else LATENT_MEAN_FORMAT,
    "emd_jax_version": __version__,
    "kind": kind,
    "net": net_spec,
    "data_shape": list(data_shape),
    "sigma_init": float(sigma_init),
    **({"num_steps": len(sigmas) - 1, "sigmas": [float(s) for s in sigmas]} if few else {}),
    "num_classes": int(num_classes),
    **({} if latent_mean is None else {"latent_mean": [float(v) for v in np.asarray(latent_mean).ravel()]}),
    "dtype": dtype,
    "config": config or {},
    **(extra or {}),
  }
  host_params = jax.tree.map(lambda x: np.asarray(x, dtype=dtype), jax.device_get(params))
  with fileio.publish(directory, "generator_export", tmp_prefix=".export-") as out:
    out.write(PARAMS_FILE, serialization.msgpack_serialize(host_params))
    out.write(SPEC_FILE, json.dumps(meta, indent=2, default=str))
  return paths.abspath(directory)


class Sampler:
  """A jitted student sampler, first input `mu + z`, `z ~ N(0, sigma_init^2 I)` (`mu`: the export's
  `latent_mean`, else 0).

  One step: `x = g(z) = D_theta(mu + z, sigma_init)`. A few-step student (`num_steps` N > 1):
  N passes over its grid `sigmas`, each predicting the clean image and re-noising it to the
  next level with fresh noise (`diffusion.student_sample`); its NFE is the number of steps.
  """

  def __init__(self, meta: dict, params):
    self.meta = meta
    self.params = params
    self.data_shape = tuple(meta["data_shape"])
    self.sigma_init = float(meta["sigma_init"])
    self.sigmas = tuple(float(s) for s in meta.get("sigmas", (self.sigma_init, 0.0)))
    self.num_steps = len(self.sigmas) - 1
    self.num_classes = int(meta.get("num_classes", 0))
    self.latent_mean = None
    if "latent_mean" in meta:
      self.latent_mean = jnp.asarray(np.asarray(meta["latent_mean"], np.float32).reshape(self.data_shape))
    self.module = nets.build(meta["net"])

    def generate(params, z, noise, labels, grid):
      denoise = lambda x, s, lab: self.module.apply({"params": params}, x, s, lab)  # noqa: E731
      return student_sample(denoise, z, grid, noise, labels)

    self._generate = jax.jit(generate, static_argnames="grid")

  def grid(self, num_steps: int | None = None) -> tuple[float, ...]:
    """The levels `num_steps` steps run (all trained steps if None; a subset: `diffusion.sub_grid`)."""
    return self.sigmas if num_steps is None else sub_grid(self.sigmas, num_steps)

  def nfe(self, num_steps: int | None = None) -> int:
    """Network evaluations per sample: one per step."""
    return len(self.grid(num_steps)) - 1

  def sample(self, rng, num: int, labels=None, batch_size: int = 4096, num_steps: int | None = None) -> jax.Array:
    """`num` samples `[num, *data_shape]` (float32, data space).

    `labels`: int class ids `[num]` or one-hot `[num, C]` for class-conditional
    generators; default uniform random classes. `num_steps`: how many of a few-step
    student's steps to run (default all; `sub_grid` picks them); 1 for a one-step one.
    """
    grid = self.grid(num_steps)
    if isinstance(rng, int):
      rng = jax.random.key(rng)
    k_z, k_lab = jax.random.split(rng)
    z = self.sigma_init * jax.random.normal(k_z, (num, *self.data_shape))
    if self.latent_mean is not None:
      z = z + self.latent_mean
    onehot = None
    if self.num_classes:
      if labels is None:
        labels = jax.random.randint(k_lab, (num,), 0, self.num_classes)
      labels = jnp.asarray(labels)
      onehot = labels if labels.ndim == 2 else jax.nn.one_hot(labels, self.num_classes)
    out = []
    for i in range(0, num, batch_size):
      lab = None if onehot is None else onehot[i : i + batch_size]
      zi = z[i : i + batch_size]
      noise = None
      if len(grid) > 2:
        noise = jax.random.normal(jax.random.fold_in(k_z, i + 1), (len(grid) - 2, *zi.shape))
      out.append(self._generate(self.params, zi, noise, lab, grid))
    return jnp.concatenate(out, axis=0).astype(jnp.float32)


def read_export(directory: str) -> tuple[dict, dict]:
  """`(meta, params)` of an export directory, checked: the spec's fields and the params against its net.

  Raises `UserInputError` naming the file: an incomplete export (no `_COMPLETE` marker on a
  URI, or a file it lists missing: `fileio.require_complete`), bad JSON, a missing or mistyped field, an unknown
  architecture, params of another architecture (missing or extra leaves, shapes, dtypes), NaNs.
  """
  if not paths.isdir(directory):
    raise FileNotFoundError(f"not a generator export: {directory} is not a directory")
  fileio.require_complete(directory, "generator export")
  spec_path = os.path.join(directory, SPEC_FILE)
  params_path = os.path.join(directory, PARAMS_FILE)
  for p in (spec_path, params_path):
    if not paths.exists(p):
      raise FileNotFoundError(f"not a generator export (missing {os.path.basename(p)}): {directory}")
  meta = fileio.read_json(spec_path, "generator spec")
  version = meta.get("format_version", 0)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise UserInputError(f"{spec_path}: export format {version!r} is newer than this emd_jax ({FORMAT_VERSION})")
  kind = meta.get("kind", "one_step_generator")
  if kind not in KINDS:
    raise UserInputError(f"{spec_path}: kind {kind!r} is not one of {sorted(KINDS)}")
  fileio.require_fields(meta, {"net": dict, "data_shape": list, "sigma_init": float}, spec_path)
  fileio.require_fields(meta["net"], {"arch": str}, f"{spec_path}: net")
  fileio.require_fields(meta, {k: t for k, t in (("num_classes", int), ("dtype", str)) if k in meta}, spec_path)
  data_shape = fileio.check_shape_list(meta["data_shape"], f"{spec_path}: data_shape")
  if not (np.isfinite(meta["sigma_init"]) and meta["sigma_init"] > 0):
    raise UserInputError(f"{spec_path}: sigma_init must be a finite number > 0, got {meta['sigma_init']}")
  if kind == "few_step_generator":
    _check_grid(meta, spec_path)
  if "latent_mean" in meta:
    _check_latent_mean(meta, data_shape, spec_path)
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


def _check_latent_mean(meta: dict, data_shape, spec_path: str) -> None:
  """`latent_mean`: prod(data_shape) finite numbers (the flattened centre of the first input)."""
  mu = meta["latent_mean"]
  size = int(np.prod(data_shape))
  ok = isinstance(mu, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mu)
  if not ok or len(mu) != size or not np.all(np.isfinite(np.asarray(mu, np.float64))):
    what = f"{len(mu)} values" if isinstance(mu, list) else type(mu).__name__
    raise UserInputError(
      f"{spec_path}: latent_mean must be {size} finite numbers (data shape {list(data_shape)}), got {what}"
    )


def _check_grid(meta: dict, spec_path: str) -> None:
  """A few-step export's `num_steps` and `sigmas`: N + 1 finite levels, descending from sigma_init to 0."""
  fileio.require_fields(meta, {"num_steps": int, "sigmas": list}, spec_path)
  n, sigmas = meta["num_steps"], meta["sigmas"]
  if n < 2 or len(sigmas) != n + 1:
    raise UserInputError(f"{spec_path}: num_steps {n} needs num_steps + 1 levels in sigmas (N >= 2), got {len(sigmas)}")
  if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and np.isfinite(s) for s in sigmas):
    raise UserInputError(f"{spec_path}: sigmas must be finite numbers, got {sigmas}")
  descending = all(a > b for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
  if sigmas[0] != meta["sigma_init"] or sigmas[-1] != 0 or not descending:
    raise UserInputError(f"{spec_path}: sigmas must descend strictly from sigma_init to 0, got {sigmas}")


def load_sampler(directory: str) -> Sampler:
  """Loads an export directory into a `Sampler` (one call, no training code), checked first (`read_export`)."""
  meta, params = read_export(directory)
  params = jax.tree.map(jnp.asarray, params)
  return Sampler(meta, params)

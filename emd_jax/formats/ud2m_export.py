"""Restoration tasks, and the self-describing export of a trained UD2M sampler.

A task names a measurement operator with its settings and the measurement
noise; `TASKS` holds the defaults (configs and the restore CLI override them).

`DIR/export/` (written by `write_sampler`, read by `load_sampler`):
  sampler.json     format, task (operator name, settings, sigma_y, image shape),
                   sampler (N, K, DDPM time grid, eta, block options), the
                   learned per-block lam / t_delta (also as logs), LoRA
                   (rank, scale, targets), the teacher reference, training step
                   and config
  lora.msgpack     the LoRA factors (Flax msgpack; the tree of `nets.lora.init_lora`)
  teacher/         a copy of the base teacher directory (`teacher.json` +
                   `params.msgpack` + its own `_COMPLETE`), unless the export
                   references the teacher by path (`export.copy_teacher = False`,
                   large teachers)
  _COMPLETE        the completion marker, written last (`fileio.publish`)

Loading needs only the network, LoRA and sampler code:

    from emd_jax.formats.ud2m_export import load_sampler
    s = load_sampler("runs/ud2m_deblur/export")
    y = s.observe(jax.random.key(0), x)            # x [B, H, W, C] in [-1, 1]
    x_hat = s.restore(y, jax.random.key(1))        # [B, H, W, C], N * K NFE
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from emd_jax import __version__, teachers
from emd_jax.errors import UserInputError
from emd_jax.formats import fileio, paths
from emd_jax.nets import lora as lora_lib
from emd_jax.posterior import operators as ops
from emd_jax.posterior.unfolded import unfolded_sample
from emd_jax.teachers.base import Teacher

FORMAT_VERSION = 1
SPEC_FILE = "sampler.json"
LORA_FILE = "lora.msgpack"
TEACHER_DIR = "teacher"

# task -> (operator name, default operator settings, default sigma_y in [-1, 1] units)
TASKS: dict[str, tuple[str, dict, float]] = {
  "deblur": ("gaussian_blur", {"kernel_size": 61, "std": 3.0}, 0.05),
  "motion_deblur": ("motion_blur", {"kernel_size": 61, "intensity": 0.5, "seed": 0}, 0.05),
  "inpaint": ("inpaint_random", {"missing": 0.7, "seed": 0}, 0.05),
  "inpaint_box": ("inpaint_box", {}, 0.05),
  "sr": ("downsample", {"factor": 4}, 0.05),
}


def operator_kwargs(name: str, settings: Any) -> dict:
  """The entries of `settings` (a dict or ConfigDict) that operator `name`'s builder accepts."""
  builder = ops._REGISTRY[name]
  params = list(inspect.signature(builder).parameters)[1:]  # after image_shape
  get = settings.get if hasattr(settings, "get") else (lambda k, d=None: getattr(settings, k, d))
  out = {}
  for p in params:
    v = get(p, None)
    if v is not None:
      out[p] = tuple(v) if isinstance(v, list) else v
  return out


def task_operator(task: str, image_shape, overrides: dict | None = None) -> tuple[str, dict, float]:
  """(operator name, settings, sigma_y) of a task with `overrides` ({'sigma_y': .., settings..})."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
  name, settings, sigma_y = TASKS[task]
  settings = dict(settings)
  overrides = dict(overrides or {})
  sigma_y = float(overrides.pop("sigma_y", sigma_y))
  settings.update(operator_kwargs(name, overrides))
  ops.make_operator(name, image_shape, **settings)  # validates sizes early
  return name, settings, sigma_y


def _json_params(unfolded: dict) -> dict:
  host = {k: np.asarray(v, np.float64) for k, v in jax.device_get(unfolded).items()}
  return {
    "log_lam": host["log_lam"].tolist(),
    "log_t_delta": host["log_t_delta"].tolist(),
    "lam": np.exp(host["log_lam"]).tolist(),
    "t_delta": np.exp(host["log_t_delta"]).tolist(),
  }


def write_sampler(
  directory: str,
  *,
  teacher_path: str,
  teacher_info: dict,
  copy_teacher: bool,
  lora_params: Any,
  lora_meta: dict,
  unfolded: dict,
  task: dict,
  sampler: dict,
  extra: dict | None = None,
) -> str:
  """Publishes the export (`fileio.publish`: whole, marker last); returns its path."""
  directory = paths.abspath(directory)
  with fileio.publish(directory, "ud2m_sampler", tmp_prefix=".ud2m-export-") as out:
    if copy_teacher:
      from emd_jax.teachers import network

      src = teachers.resolve_path(teacher_path)
      for name in (network.SPEC_FILE, network.PARAMS_FILE):
        out.copy(os.path.join(src, name), f"{TEACHER_DIR}/{name}")
      out.mark(TEACHER_DIR, network.MARKER_KIND)
      ref = TEACHER_DIR
    else:
      ref = teacher_path if teacher_path.startswith(teachers.BUILTIN_PREFIX) else paths.abspath(teacher_path)
    host_lora = jax.tree.map(lambda v: np.asarray(v, np.float32), jax.device_get(lora_params))
    out.write(LORA_FILE, serialization.msgpack_serialize(host_lora))
    meta = {
      "format_version": FORMAT_VERSION,
      "emd_jax_version": __version__,
      "kind": "ud2m_sampler",
      "teacher": {"path": ref, "source": teacher_path, "copied": bool(copy_teacher), "info": teacher_info},
      "lora": {**lora_meta, "file": LORA_FILE},
      "unfolded": _json_params(unfolded),
      "task": task,
      "sampler": sampler,
      **(extra or {}),
    }
    out.write(SPEC_FILE, json.dumps(meta, indent=2, default=str))
  return directory


class PosteriorSampler:
  """A trained UD2M sampler: the teacher + LoRA denoiser, the operator and the block parameters."""

  def __init__(self, meta: dict, teacher: Teacher, lora_params: Any):
    self.meta = meta
    self.teacher = teacher
    self.lora_params = lora_params
    t = meta["task"]
    self.task = t["task"]
    self.image_shape = tuple(t["image_shape"])
    self.sigma_y = float(t["sigma_y"])
    self.operator = ops.make_operator(t["operator"], self.image_shape, **t["settings"])
    s = meta["sampler"]
    self.num_outer, self.num_inner = int(s["num_outer"]), int(s["num_inner"])
    self.unfolded = {k: jnp.asarray(meta["unfolded"][k], jnp.float32) for k in ("log_lam", "log_t_delta")}
    scale = float(meta["lora"].get("scale", 1.0))

    def restore(base, lora_p, unfolded, y, rng, sigma_y):
      params = lora_lib.merge(base, lora_p, scale)
      denoise = lambda x, sigma, labels=None: teacher.apply(params, x, sigma, labels)
      return unfolded_sample(
        denoise,
        self.operator,
        y,
        rng,
        unfolded,
        self.num_outer,
        self.num_inner,
        sigma_y,
        tuple(s["timesteps"]),
        float(s["eta"]),
        xt_likelihood=bool(s["xt_likelihood"]),
        init=s["init"],
      )

    self._restore = jax.jit(restore)

  @property
  def nfe(self) -> int:
    return self.num_outer * self.num_inner

  def observe(self, rng: jax.Array, x: jax.Array) -> jax.Array:
    """A noisy measurement of clean images `x` `[B, H, W, C]` with the task's operator and noise."""
    return self.operator.observe(rng, jnp.asarray(x, jnp.float32), self.sigma_y)

  def restore(self, y: jax.Array, rng: jax.Array, batch_size: int = 256, sigma_y: float | None = None) -> jax.Array:
    """Restored images `[B, H, W, C]` (float32, [-1, 1] scale), `batch_size` at a time.

    `sigma_y` (default: the task's) is the noise level the data step assumes.
    """
    sigma_y = jnp.float32(self.sigma_y if sigma_y is None else sigma_y)
    out = []
    for i in range(0, y.shape[0], batch_size):
      batch = y[i : i + batch_size]
      out.append(self._restore(self.teacher.params, self.lora_params, self.unfolded, batch, rng, sigma_y))
      rng = jax.random.fold_in(rng, i + 1)
    return jnp.concatenate(out).astype(jnp.float32)


def _check_meta(meta: dict, spec: str) -> None:
  """The fields `PosteriorSampler` reads, with their types (`UserInputError` naming the file and field)."""
  req = fileio.require_fields
  req(meta, {"teacher": dict, "lora": dict, "unfolded": dict, "task": dict, "sampler": dict}, spec)
  req(meta["teacher"], {"path": str}, f"{spec}: teacher")
  req(meta["lora"], {"file": str, "rank": int, "targets": list}, f"{spec}: lora")
  req(meta["lora"], {"scale": float} if "scale" in meta["lora"] else {}, f"{spec}: lora")
  req(
    meta["task"],
    {"task": str, "operator": str, "settings": dict, "sigma_y": float, "image_shape": list},
    f"{spec}: task",
  )
  fileio.check_shape_list(meta["task"]["image_shape"], f"{spec}: task.image_shape", rank=3)
  s = meta["sampler"]
  req(
    s,
    {"num_outer": int, "num_inner": int, "timesteps": list, "eta": float, "xt_likelihood": bool, "init": str},
    f"{spec}: sampler",
  )
  if not (1 <= s["num_outer"] <= 1000 and 1 <= s["num_inner"] <= 1000 and len(s["timesteps"]) == s["num_outer"]):
    raise UserInputError(f"{spec}: sampler: num_outer, num_inner and timesteps do not fit together")
  n = s["num_outer"] * s["num_inner"]
  for k in ("log_lam", "log_t_delta"):
    v = meta["unfolded"].get(k)
    ok = isinstance(v, list) and len(v) == n and all(isinstance(x, int | float) for x in v)
    if not ok or not np.isfinite(np.asarray(v, np.float64)).all():
      raise UserInputError(f"{spec}: unfolded.{k} must be {n} finite numbers")
  if os.path.basename(meta["lora"]["file"]) != meta["lora"]["file"]:
    raise UserInputError(f"{spec}: lora.file must be a file name inside the export, got {meta['lora']['file']!r}")


def load_sampler(directory: str) -> PosteriorSampler:
  """Loads an export written by `write_sampler`, checked first (spec fields, teacher, LoRA factors, operator)."""
  spec = os.path.join(directory, SPEC_FILE)
  if paths.isdir(directory):
    fileio.require_complete(directory, "UD2M sampler export")
  if not paths.isfile(spec):
    raise FileNotFoundError(f"not a UD2M sampler export (missing {SPEC_FILE}): {directory}")
  meta = fileio.read_json(spec, "sampler spec")
  if meta.get("kind") != "ud2m_sampler":
    raise UserInputError(f"{spec}: kind {meta.get('kind')!r} is not 'ud2m_sampler'")
  version = meta.get("format_version", 0)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise UserInputError(f"{spec}: format {version!r} is newer than this emd_jax ({FORMAT_VERSION})")
  _check_meta(meta, spec)
  ref = meta["teacher"]["path"]
  if ref.startswith(teachers.BUILTIN_PREFIX) or paths.isabs(ref):
    teacher = teachers.load(ref)
  else:
    from emd_jax.teachers import network

    if ref != TEACHER_DIR:
      raise UserInputError(f"{spec}: teacher.path {ref!r}: a relative teacher must be the export's {TEACHER_DIR!r}")
    teacher = network.load(os.path.join(directory, ref))
  if tuple(teacher.data_shape) != tuple(meta["task"]["image_shape"]):
    raise UserInputError(
      f"{spec}: task.image_shape {meta['task']['image_shape']} is not the teacher's "
      f"data shape {list(teacher.data_shape)}"
    )
  lora_file = os.path.join(directory, meta["lora"]["file"])
  lora_params = fileio.read_msgpack(lora_file, "LoRA parameter file")
  try:
    expected = jax.eval_shape(
      lambda: lora_lib.init_lora(
        jax.random.PRNGKey(0), teacher.params, meta["lora"]["rank"], tuple(meta["lora"]["targets"])
      )
    )
  except Exception as e:  # noqa: BLE001  (bad target patterns, a rule selecting nothing)
    raise UserInputError(f"{spec}: lora rank/targets do not fit the teacher ({type(e).__name__}: {e})") from e
  fileio.check_params(expected, lora_params, f"{lora_file} (lora rank/targets of {SPEC_FILE})")
  lora_params = jax.tree.map(jnp.asarray, lora_params)
  try:
    return PosteriorSampler(meta, teacher, lora_params)
  except (ValueError, TypeError, KeyError) as e:  # the operator rejects its name or settings
    raise UserInputError(f"{spec}: task: {type(e).__name__}: {e}") from e

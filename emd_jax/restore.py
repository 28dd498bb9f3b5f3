"""Restore degraded images with a trained UD2M sampler or a zero-shot baseline.

  python -m emd_jax.restore --sampler runs/ud2m_deblur/export --task deblur \
      --input clean.npz --seed 0 --out restored.npz
  python -m emd_jax.restore --baseline diffpir_50 --teacher builtin:digits_uncond --task deblur \
      --settings '{"kernel_size": 15, "std": 1.5}' --input clean.npz --out diffpir.npz

The input npz holds clean images as `images` (uint8 `[N, H, W, C]`) or
`samples` (float in [-1, 1]). They are degraded with the task's operator and
noise (`y = A x + sigma_y n`, seeded by `--seed`), restored, and written as
`clean`, `observed` (the measurement mapped back to image space,
`operator.backproject(y)`) and `restored`, in the input's layout (uint8 or
float32); `psnr` and `ssim` per image (float32 `[N]`) are added and their means
printed. With `--sampler`, the task and its settings come from the export
(`--task` must match it). Baselines (`--baseline`): `unfolded_zero_shot`
(UD2M's 3 x 3 structure, hand-set blocks, plain teacher: 9 NFE),
`diffpir[_NFE]` (default 50), `ddrm[_NFE]` (default 20); they use `--teacher`,
or the sampler export's base teacher and task when `--sampler` is also given.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from emd_jax.cli import UserError
from emd_jax.formats import fileio, paths

Array = jax.Array


def define_flags(fv: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None) -> dict:
  """Defines the restorer's flags on `fv`; returns their holders by name."""
  d = lambda fn, name, default, help_: fn(name, default, help_, flag_values=fv)
  s, i, f = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float
  return {
    "sampler": d(s, "sampler", None, "A UD2M sampler export directory (DIR/export)."),
    "task": d(s, "task", None, "Restoration task: deblur, motion_deblur, inpaint, inpaint_box, sr."),
    "input": d(s, "input", None, "npz with clean `images` (uint8 NHWC) or `samples` (float, [-1, 1])."),
    "out": d(s, "out", "restored.npz", "Output npz."),
    "seed": d(i, "seed", 0, "Seed of the measurement noise and of the sampler."),
    "baseline": d(s, "baseline", None, "Run a zero-shot baseline instead (see the module docstring)."),
    "teacher": d(s, "teacher", "builtin:digits_uncond", "Teacher for --baseline without --sampler."),
    "sigma_y": d(f, "sigma_y", None, "Measurement noise std ([-1, 1] units); default: the task's."),
    "settings": d(s, "settings", "", "Operator settings as JSON, e.g. '{\"std\": 1.5}' (no --sampler)."),
    "num": d(i, "num", 0, "Restore only the first NUM images (0: all)."),
    "batch_size": d(i, "batch_size", 256, "Images per batch."),
  }


_BASELINE_RE = re.compile(r"^(unfolded_zero_shot|diffpir|ddrm)(?:_(\d+))?$")


def load_clean(path: str) -> tuple[np.ndarray, bool]:
  """(float32 `[N, H, W, C]` in [-1, 1], whether the input was uint8 `images`); checked by `fileio.read_images_npz`."""
  return fileio.read_images_npz(path, "--input")


def to_layout(x: np.ndarray, as_uint8: bool) -> np.ndarray:
  """Float [-1, 1] images in the input's layout (uint8 0..255, or float32)."""
  if as_uint8:
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return np.asarray(x, np.float32)


def baseline_restorer(name: str, teacher, operator, operator_name: str, sigma_y: float) -> tuple[Callable, int]:
  """`(restore(y, rng) -> x0, nfe)` for a baseline name (jitted; the teacher's params are an argument)."""
  from emd_jax.posterior import baselines

  m = _BASELINE_RE.match(name)
  if not m:
    raise UserError(f"--baseline: unknown {name!r}; use unfolded_zero_shot, diffpir[_NFE] or ddrm[_NFE]")
  kind, nfe = m.group(1), m.group(2)
  if kind == "unfolded_zero_shot":
    if nfe not in (None, "9"):
      raise UserError("--baseline: unfolded_zero_shot has 3 x 3 = 9 NFE")
    fn, nfe = baselines.unfolded_zero_shot, 9
  elif kind == "diffpir":
    cfg = baselines.DIFFPIR_DEFAULTS.get(operator_name, baselines.DiffPIRConfig())
    cfg = dataclasses.replace(cfg, nfe=int(nfe or 50))
    fn, nfe = functools.partial(baselines.diffpir_sample, config=cfg), cfg.nfe
  else:
    cfg = dataclasses.replace(baselines.DDRMConfig(), nfe=int(nfe or 20))
    fn, nfe = functools.partial(baselines.ddrm_sample, config=cfg), cfg.nfe

  def run(params, y, rng):
    denoise = lambda x, sigma, labels=None: teacher.apply(params, x, sigma, labels)
    return fn(denoise, operator, y, rng, sigma_y=sigma_y)

  jitted = jax.jit(run)
  return (lambda y, rng: jitted(teacher.params, y, rng)), nfe


def restore_batched(restore: Callable, y: Array, rng: Array, batch_size: int) -> Array:
  out = [restore(y[i : i + batch_size], jax.random.fold_in(rng, i)) for i in range(0, y.shape[0], batch_size)]
  return jnp.concatenate(out).astype(jnp.float32)


def run(
  input_path: str,
  out_path: str,
  task: str,
  seed: int = 0,
  sampler_dir: str | None = None,
  baseline: str | None = None,
  teacher_path: str = "builtin:digits_uncond",
  sigma_y: float | None = None,
  settings: dict | None = None,
  num: int = 0,
  batch_size: int = 256,
) -> dict:
  """The CLI as a function: writes `out_path`; returns `{"psnr", "ssim", "nfe", "seconds_per_image"}`."""
  from emd_jax import teachers
  from emd_jax.evaluators.restoration import psnr, ssim
  from emd_jax.formats import ud2m_export as export_lib
  from emd_jax.posterior import operators as ops

  if not sampler_dir and not baseline:
    raise UserError("give --sampler DIR (a UD2M export) or --baseline NAME")
  if num < 0 or batch_size < 1:
    raise UserError(f"--num must be >= 0 and --batch_size >= 1, got {num} and {batch_size}")
  if sigma_y is not None and not (np.isfinite(sigma_y) and sigma_y >= 0):
    raise UserError(f"--sigma_y: must be a finite number >= 0, got {sigma_y}")
  if not out_path or paths.isdir(out_path):
    raise UserError(f"--out {out_path!r}: must name a file, not a directory")
  if baseline and not _BASELINE_RE.match(baseline):
    raise UserError(f"--baseline: unknown {baseline!r}; use unfolded_zero_shot, diffpir[_NFE] or ddrm[_NFE]")
  x, as_uint8 = load_clean(input_path)
  if num:
    x = x[:num]
  rng_obs, rng_restore = jax.random.split(jax.random.PRNGKey(seed))
  if sampler_dir:
    sampler = export_lib.load_sampler(sampler_dir)
    if task and task != sampler.task:
      raise UserError(f"--task {task!r}: the sampler in {sampler_dir} was trained for {sampler.task!r}")
    if settings:
      raise UserError("--settings: a sampler export fixes its operator; drop --settings")
    operator, op_name, teacher = sampler.operator, sampler.meta["task"]["operator"], sampler.teacher
    image_shape = sampler.image_shape
    sigma_y = sampler.sigma_y if sigma_y is None else sigma_y
  else:
    teacher = teachers.load(teacher_path)
    image_shape = tuple(teacher.data_shape)
    overrides = dict(settings or {})
    if sigma_y is not None:
      overrides["sigma_y"] = sigma_y
    try:
      op_name, op_settings, sigma_y = export_lib.task_operator(task, image_shape, overrides)
    except (ValueError, TypeError) as e:
      raise UserError(f"--task/--settings: {e}") from e
    operator = ops.make_operator(op_name, image_shape, **op_settings)
  if tuple(x.shape[1:]) != image_shape:
    raise UserError(f"{input_path}: images of shape {tuple(x.shape[1:])}, the model restores {image_shape}")
  clean = jnp.asarray(x)
  y = operator.observe(rng_obs, clean, sigma_y)
  if baseline:
    restore, nfe = baseline_restorer(baseline, teacher, operator, op_name, sigma_y)
  else:
    restore, nfe = (lambda yy, r: sampler.restore(yy, r, batch_size, sigma_y)), sampler.nfe
  restore_batched(restore, y[:batch_size], rng_restore, batch_size).block_until_ready()  # compile, untimed
  t0 = time.perf_counter()
  restored = restore_batched(restore, y, rng_restore, batch_size).block_until_ready()
  seconds = (time.perf_counter() - t0) / x.shape[0]
  observed = operator.backproject(y)
  p, s = np.asarray(psnr(restored, clean)), np.asarray(ssim(restored, clean))
  fileio.write_npz(
    out_path,
    clean=to_layout(clean, as_uint8),
    observed=to_layout(observed, as_uint8),
    restored=to_layout(restored, as_uint8),
    psnr=p.astype(np.float32),
    ssim=s.astype(np.float32),
  )
  return {"psnr": float(p.mean()), "ssim": float(s.mean()), "nfe": nfe, "seconds_per_image": seconds}


def main(argv: list[str], holders: dict) -> None:
  v = {k: h.value for k, h in holders.items()}
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not v["input"]:
    raise UserError("--input is required")
  if not v["task"] and not v["sampler"]:
    raise UserError("--task is required without --sampler")
  settings = fileio.parse_json_arg(v["settings"], "--settings") if v["settings"] else None
  result = run(
    v["input"],
    v["out"],
    v["task"],
    v["seed"],
    v["sampler"],
    v["baseline"],
    v["teacher"],
    v["sigma_y"],
    settings,
    v["num"],
    v["batch_size"],
  )
  what = v["baseline"] or f"UD2M sampler {v['sampler']}"
  print(
    f"{what}: PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}, {result['nfe']} NFE, "
    f"{1000 * result['seconds_per_image']:.2f} ms/image -> {v['out']}",
    flush=True,
  )


def run_in_process(argv: list[str]) -> int:
  """The command line without a new process (tests): fresh flags, returns the exit code."""
  from emd_jax import cli

  return cli.run_in_process("emd_jax.restore", define_flags, main, argv, (ValueError,))


def entry() -> None:
  from emd_jax import cli

  cli.run_command(define_flags, main, (ValueError,))


if __name__ == "__main__":
  entry()

"""Sampling from the command line.

Generator export (all its trained steps; a few-step student's NFE is its number of steps):
  python -m emd_jax.sample --generator runs/gmm/export --num 10000 --seed 0 --out samples.npz
A checkpoint's generator by name (`raw`, `ema` or a `generator.ema_tracks` track; newest step unless
--step), exported first to `W/exports/<name>_step<S>` (`evaluate.export_track`), then sampled:
  python -m emd_jax.sample --workdir runs/gmm --ema ema9999 --num 10000 --out samples.npz
A few-step student with a subset of its steps (`diffusion.sub_grid`: evenly spaced, first and last kept):
  python -m emd_jax.sample --generator runs/gmm4/export --num_steps 2 --out samples.npz
The config's teacher with the EDM Heun sampler (2 * num_steps - 1 NFE):
  python -m emd_jax.sample --config configs/gmm.py --teacher --num_steps 18 --num 10000 --out teacher.npz

The npz holds `samples` (float32, `[N, *data_shape]`, data space); for images
also `images` (uint8 `[N, H, W, C]`), and `labels` for class-conditional models.
`--grid F.png` writes a grid of the first samples (images only).

The export (or the config's teacher) is checked before anything is computed
(`export.read_export`: spec fields, architecture, parameter shapes, dtypes,
finite values); a bad one is one `error: ...` line, exit status 2, and nothing
is written to `--out`, which is written atomically.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from emd_jax.errors import UserError, UserInputError
from emd_jax.formats import fileio, paths


def define_flags(fv: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None) -> dict:
  """Defines the sampler's flags on `fv`; returns their holders by name."""
  return {
    "generator": flags.DEFINE_string("generator", None, "Export directory of a trained generator.", flag_values=fv),
    "workdir": flags.DEFINE_string(
      "workdir", None, "A distillation run's directory: sample its checkpoint's --ema generator.", flag_values=fv
    ),
    "ema": flags.DEFINE_string(
      "ema", None, "--workdir: which generator (raw, ema or a generator.ema_tracks name; default ema).", flag_values=fv
    ),
    "step": flags.DEFINE_integer("step", None, "--workdir: the checkpoint step (default the newest).", flag_values=fv),
    "config": config_flags.DEFINE_config_file(
      "config", None, "Config whose teacher to sample (with --teacher).", flag_values=fv, sys_argv=sys_argv
    ),
    "teacher": flags.DEFINE_bool(
      "teacher", False, "Sample the config's teacher with the Heun sampler.", flag_values=fv
    ),
    "num_steps": flags.DEFINE_integer(
      "num_steps",
      None,
      "--teacher: Heun steps (default 18, NFE = 2 * num_steps - 1). --generator: how many of a few-step"
      " student's trained steps to run (default all, NFE = num_steps).",
      flag_values=fv,
    ),
    "num": flags.DEFINE_integer("num", 1000, "Number of samples.", flag_values=fv),
    "seed": flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv),
    "out": flags.DEFINE_string("out", "samples.npz", "Output .npz file.", flag_values=fv),
    "batch_size": flags.DEFINE_integer("batch_size", 1024, "Samples per device batch.", flag_values=fv),
    "labels": flags.DEFINE_string(
      "labels", None, "Class labels: one int for all, or comma-separated per sample.", flag_values=fv
    ),
    "grid": flags.DEFINE_string(
      "grid", None, "Write a PNG grid of the first 64 samples (images only).", flag_values=fv
    ),
  }


def parse_labels(text: str | None, num: int, num_classes: int):
  if not num_classes:
    if text:
      raise UserInputError("--labels: given, but the model is unconditional")
    return None
  if not text:
    return None
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError as e:
    raise UserInputError(f"--labels: not a comma-separated list of integers: {text!r:.60}") from e
  if any(v < 0 or v >= num_classes for v in values):
    raise UserInputError(f"--labels: must be in [0, {num_classes}), got {text:.60}")
  if len(values) == 1:
    values = values * num
  if len(values) != num:
    raise UserInputError(f"--labels: has {len(values)} entries for --num {num}")
  return np.asarray(values, np.int32)


def sample_teacher(teacher, rng, num: int, num_steps: int = 18, labels=None, batch_size: int = 1024):
  """Heun samples of a teacher, `[num, *data_shape]` float32."""
  from emd_jax.diffusion import heun_sample

  k_noise, k_lab = jax.random.split(rng)
  noise = jax.random.normal(k_noise, (num, *teacher.data_shape))
  onehot = None
  if teacher.num_classes:
    if labels is None:
      labels = jax.random.randint(k_lab, (num,), 0, teacher.num_classes)
    onehot = jax.nn.one_hot(jnp.asarray(labels), teacher.num_classes)

  @jax.jit
  def run(params, n, lab):
    return heun_sample(lambda x, s, lb: teacher.apply(params, x, s, lb), n, lab, num_steps=num_steps)

  out = []
  for i in range(0, num, batch_size):
    lab = None if onehot is None else onehot[i : i + batch_size]
    out.append(run(teacher.params, noise[i : i + batch_size], lab))
  return np.asarray(jnp.concatenate(out), np.float32), None if onehot is None else np.asarray(jnp.argmax(onehot, -1))


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] to uint8 0..255."""
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_npz(path: str, samples: np.ndarray, labels=None) -> dict:
  out = {"samples": np.asarray(samples, np.float32)}
  if samples.ndim == 4:
    out["images"] = to_uint8(samples)
  if labels is not None:
    out["labels"] = np.asarray(labels)
  fileio.write_npz(path, **out)
  return out


def main(argv: list[str], holders: dict) -> None:
  v = {k: h.value for k, h in holders.items() if k != "config"}
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("num", "batch_size", "num_steps"):
    if v[name] is not None and v[name] < 1:
      raise UserError(f"--{name}: must be >= 1, got {v[name]}")
  out_path = v["out"]
  if not out_path or paths.isdir(out_path):
    raise UserError(f"--out {out_path!r}: must name a file, not a directory")
  rng = jax.random.key(v["seed"])
  if v["workdir"] and v["generator"]:
    raise UserError("give --generator DIR or --workdir W (with --ema NAME), not both")
  if (v["ema"] is not None or v["step"] is not None) and not v["workdir"]:
    raise UserError("--ema/--step: choose a checkpoint's generator, they need --workdir")
  if v["workdir"]:
    from emd_jax.evaluate import export_track

    v["generator"] = export_track(v["workdir"], v["ema"] or "ema", v["step"])
    print(f"exported {v['ema'] or 'ema'} to {v['generator']}")
  # Everything is read and checked before any compute; nothing is written before the samples exist.
  if v["generator"]:
    from emd_jax.formats.generator_export import load_sampler

    sampler = load_sampler(v["generator"])
    data_shape, num_classes = sampler.data_shape, sampler.num_classes
    if v["num_steps"] is not None and v["num_steps"] > sampler.num_steps:
      raise UserError(f"--num_steps: this generator was trained with {sampler.num_steps} step(s), got {v['num_steps']}")
  elif v["teacher"]:
    config = holders["config"].value
    if config is None:
      raise UserError("--teacher: needs --config")
    from emd_jax import teachers

    teacher = teachers.from_config(config.teacher)
    data_shape, num_classes = teacher.data_shape, teacher.num_classes
  else:
    raise UserError("give --generator DIR, --workdir W [--ema NAME], or --config FILE --teacher")
  labels = parse_labels(v["labels"], v["num"], num_classes)
  if v["grid"] and len(data_shape) != 3:
    raise UserError(f"--grid: needs image samples; this model's data shape is {tuple(data_shape)}")
  if v["generator"]:
    k_lab, k_s = jax.random.split(rng)
    if num_classes and labels is None:
      labels = np.asarray(jax.random.randint(k_lab, (v["num"],), 0, num_classes))
    samples = np.asarray(
      sampler.sample(k_s, v["num"], labels=labels, batch_size=v["batch_size"], num_steps=v["num_steps"])
    )
    nfe = sampler.nfe(v["num_steps"])
  else:
    num_steps = v["num_steps"] or 18
    samples, labels = sample_teacher(teacher, rng, v["num"], num_steps, labels, v["batch_size"])
    nfe = 2 * num_steps - 1
  out = write_npz(out_path, samples, labels)
  if v["grid"]:
    from emd_jax.evaluators.grids import image_grid, save_png

    save_png(v["grid"], image_grid(out["images"][:64]), scale=4)
  print(f"wrote {samples.shape[0]} samples of shape {samples.shape[1:]} to {out_path} ({nfe} NFE per sample)")


def run_in_process(argv: list[str]) -> int:
  """The command line without a new process (tests): fresh flags, returns the exit code."""
  from emd_jax import cli

  return cli.run_in_process("emd_jax.sample", define_flags, main, argv, (ValueError,))


def entry():
  from emd_jax import cli

  cli.run_command(define_flags, main, (ValueError,))


if __name__ == "__main__":
  entry()

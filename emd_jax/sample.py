"""Sampling from the command line.

One-step generator export:
  python -m emd_jax.sample --generator runs/gmm/export --num 10000 --seed 0 --out samples.npz
The config's teacher with the EDM Heun sampler (2 * num_steps - 1 NFE):
  python -m emd_jax.sample --config configs/gmm.py --teacher --num_steps 18 --num 10000 --out teacher.npz

The npz holds `samples` (float32, `[N, *data_shape]`, data space); for images
also `images` (uint8 `[N, H, W, C]`), and `labels` for class-conditional models.
`--grid F.png` writes a grid of the first samples (images only).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

_GENERATOR = flags.DEFINE_string("generator", None, "Export directory of a trained generator.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose teacher to sample (with --teacher).")
_TEACHER = flags.DEFINE_bool("teacher", False, "Sample the config's teacher with the Heun sampler.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 18, "Heun steps for --teacher (NFE = 2 * num_steps - 1).")
_NUM = flags.DEFINE_integer("num", 1000, "Number of samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUT = flags.DEFINE_string("out", "samples.npz", "Output .npz file.")
_BATCH = flags.DEFINE_integer("batch_size", 1024, "Samples per device batch.")
_LABELS = flags.DEFINE_string("labels", None, "Class labels: one int for all, or comma-separated per sample.")
_GRID = flags.DEFINE_string("grid", None, "Write a PNG grid of the first 64 samples (images only).")


def parse_labels(text: str | None, num: int, num_classes: int):
  if not num_classes:
    if text:
      raise ValueError("--labels given but the model is unconditional")
    return None
  if not text:
    return None
  values = [int(v) for v in text.split(",")]
  if any(v < 0 or v >= num_classes for v in values):
    raise ValueError(f"--labels must be in [0, {num_classes}), got {text}")
  if len(values) == 1:
    values = values * num
  if len(values) != num:
    raise ValueError(f"--labels has {len(values)} entries for --num {num}")
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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **out)
  os.replace(tmp, path)
  return out


def main(argv):
  del argv
  rng = jax.random.key(_SEED.value)
  if _GENERATOR.value:
    from emd_jax.export import load_sampler

    sampler = load_sampler(_GENERATOR.value)
    labels = parse_labels(_LABELS.value, _NUM.value, sampler.num_classes)
    k_lab, k_s = jax.random.split(rng)
    if sampler.num_classes and labels is None:
      labels = np.asarray(jax.random.randint(k_lab, (_NUM.value,), 0, sampler.num_classes))
    samples = np.asarray(sampler.sample(k_s, _NUM.value, labels=labels, batch_size=_BATCH.value))
  elif _TEACHER.value:
    if _CONFIG.value is None:
      raise app.UsageError("--teacher needs --config")
    from emd_jax import teachers

    teacher = teachers.from_config(_CONFIG.value.teacher)
    labels = parse_labels(_LABELS.value, _NUM.value, teacher.num_classes)
    samples, labels = sample_teacher(teacher, rng, _NUM.value, _NUM_STEPS.value, labels, _BATCH.value)
  else:
    raise app.UsageError("give --generator DIR, or --config FILE --teacher")
  out = write_npz(_OUT.value, samples, labels)
  if _GRID.value:
    if "images" not in out:
      raise app.UsageError("--grid needs image samples")
    from emd_jax.evaluators.grids import image_grid, save_png

    save_png(_GRID.value, image_grid(out["images"][:64]), scale=4)
  print(f"wrote {samples.shape[0]} samples of shape {samples.shape[1:]} to {_OUT.value}")


def entry():
  from emd_jax.cli import run_app

  run_app(main, (ValueError,))


if __name__ == "__main__":
  entry()

"""A teacher's first-moment (Tweedie) error, measured on its own samples, and the teacher with it removed.

For the exact denoiser of a distribution p, Tweedie's formula gives, at every noise level,

    E_{x0 ~ p, eps ~ N(0, I)} [D(x0 + sigma eps, sigma)] = E_p[x0].

A trained network only approximately satisfies this; its error `b(sigma) = E[D(x_t, sigma)] - E[x0]` is
an image per level. Score distillation moves the generator's mean by the average of `D_teacher -
D_fake` at its samples; the hypothesis behind this option is that a student matching the teacher's
denoisers carries the weighted average of `b` in its mean (on digits the student's mean offset points
along the teacher's own error at sigma ~ 1-2, cosine 0.54-0.78). Measured, it does not hold: with the
correction the digits offset stays and the pixel-space distances worsen (docs/digits.md "Removing the
teacher's error does not remove the offset"), so the option is off by default. `b` is measured
data-free, on the teacher's own Heun samples (so the corrected teacher is consistent with the
distribution its sampler draws), at a grid of levels, and
`D'(x, sigma) = D(x, sigma) - b(sigma)` (log-sigma interpolation, held constant outside the grid)
replaces the teacher in the distillation step. Unconditional teachers only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.teachers.base import Teacher

Array = jax.Array

MODES = ("none", "teacher_samples")


def levels_problem(sigmas) -> str | None:
  """Why `sigmas` cannot be a table's levels (None when they can: at least two, finite, positive, increasing)."""
  s = np.asarray(sigmas, np.float64)
  if s.ndim != 1 or len(s) < 2 or not np.all(np.isfinite(s)) or s[0] <= 0 or np.any(np.diff(s) <= 0):
    return f"must be at least two increasing positive levels, got {s.tolist()}"
  return None


def first_moment_error(
  teacher: Teacher, x0: np.ndarray, sigmas: np.ndarray, rng: Array, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
  """`b(sigma) = mean_i D(x0_i + sigma eps_i, sigma) - mean_i x0_i` for each level: `[S, *data_shape]`,
  and the norm a zero-mean error would show from the finite sample alone, `[S]` (the estimate's noise)."""
  den = jax.jit(lambda x, s: teacher.apply(teacher.params, x, s, None))
  errs, floors = [], []
  for j, sigma in enumerate(np.asarray(sigmas, np.float64)):
    k = jax.random.fold_in(rng, j)
    total, total_sq = 0.0, 0.0
    for i in range(0, len(x0), batch_size):
      xb = jnp.asarray(x0[i : i + batch_size], jnp.float32)
      eps = jax.random.normal(jax.random.fold_in(k, i), xb.shape)
      s = jnp.full((xb.shape[0],), sigma, jnp.float32)
      r = np.asarray(den(xb + float(sigma) * eps, s), np.float64) - np.asarray(xb, np.float64)
      total = total + r.sum(axis=0)
      total_sq = total_sq + (r**2).sum(axis=0)
    n = len(x0)
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    errs.append(mean)
    floors.append(np.sqrt(var.sum() / n))
  return np.stack(errs).astype(np.float32), np.asarray(floors)


def interpolate(sigmas: np.ndarray, table: np.ndarray, sigma: Array) -> Array:
  """`table` `[S, ...]` given at increasing `sigmas` `[S]`, linear in log sigma, at each `sigma` `[B]`:
  `[B, ...]`; below the first level the first entry, above the last the last."""
  log_grid = jnp.log(jnp.asarray(sigmas, jnp.float32))
  t = jnp.asarray(table)
  ls = jnp.clip(jnp.log(jnp.asarray(sigma, jnp.float32)), log_grid[0], log_grid[-1])
  hi = jnp.clip(jnp.searchsorted(log_grid, ls, side="right"), 1, len(sigmas) - 1)
  lo = hi - 1
  w = (ls - log_grid[lo]) / (log_grid[hi] - log_grid[lo])
  w = w.reshape(w.shape + (1,) * (t.ndim - 1))
  return (1.0 - w) * t[lo] + w * t[hi]


def with_mean_correction(teacher: Teacher, sigmas: np.ndarray, table: np.ndarray) -> Teacher:
  """The teacher whose denoiser is `D(x, sigma) - b(sigma)` (`b` from `table` at `sigmas`)."""
  if teacher.num_classes:
    raise ValueError("the mean correction is measured unconditionally: not for a class-conditional teacher")
  sigmas = np.asarray(sigmas, np.float64)
  if levels_problem(sigmas):
    raise ValueError(f"sigmas {levels_problem(sigmas)}")
  if table.shape != (len(sigmas), *teacher.data_shape):
    raise ValueError(f"table has shape {table.shape}, expected {(len(sigmas), *teacher.data_shape)}")
  base = teacher.apply

  def apply(params, x: Array, sigma: Array, labels=None) -> Array:
    sigma_b = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    return base(params, x, sigma, labels) - interpolate(sigmas, table, sigma_b).astype(x.dtype)

  return dataclasses.replace(teacher, apply=apply, spec=marked_spec(teacher.spec))


def marked_spec(spec: dict) -> dict:
  """The teacher spec recording that the correction is on: part of a run's checkpoint fingerprint,
  so a corrected run never resumes from an uncorrected one's checkpoints (the table itself is kept
  in the run's workdir, `mean_correction.npz`)."""
  return {**spec, "mean_correction": {"mode": "teacher_samples"}}


def measure(
  teacher: Teacher, rng: Array, num_samples: int, heun_steps: int, sigmas, batch_size: int = 500
) -> dict[str, np.ndarray]:
  """The (unconditional) teacher's first-moment error on `num_samples` of its own Heun samples
  (`heun_steps`), as the arrays `save_table` writes: `sigmas` `[S]`, `table` `[S, *data_shape]`, `noise_floor` `[S]`."""
  from emd_jax.sample import sample_teacher

  k_sample, k_err = jax.random.split(rng)
  x0, _ = sample_teacher(teacher, k_sample, num_samples, num_steps=heun_steps, batch_size=batch_size)
  sigmas = np.asarray(sigmas, np.float64)
  table, floors = first_moment_error(teacher, x0, sigmas, k_err, batch_size)
  return {
    "sigmas": sigmas,
    "table": table,
    "noise_floor": floors,
    "num_samples": np.asarray(num_samples),
    "heun_steps": np.asarray(heun_steps),
  }


def summary(tab: dict[str, np.ndarray]) -> str:
  """One line per run log: the error's norm and the estimate's noise floor at each level."""
  norms = np.sqrt((np.asarray(tab["table"], np.float64) ** 2).reshape(len(tab["sigmas"]), -1).sum(axis=1))
  cells = zip(tab["sigmas"], norms, tab["noise_floor"], strict=True)
  return ", ".join(f"{s:g}: {n:.3f} (noise {f:.3f})" for s, n, f in cells)


def save_table(path: str, tab: dict[str, np.ndarray]) -> None:
  """Writes the measured table as an .npz (plain arrays, no pickles) at `path` (local or remote)."""
  import io

  from emd_jax.formats import paths

  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in tab.items()})
  paths.write_bytes(path, buf.getvalue())


def load_table(path: str, data_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Reads a table `save_table` wrote; a file that is not one, or is for another data shape, is a
  `UserInputError` naming it (pickled objects are refused)."""
  import io
  import zipfile

  from emd_jax.errors import UserInputError
  from emd_jax.formats import paths

  try:
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
      tab = {k: np.asarray(f[k]) for k in ("sigmas", "table", "noise_floor")}
  except FileNotFoundError:
    raise UserInputError(f"mean_correction table {path}: no such file") from None
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    raise UserInputError(f"mean_correction table {path}: not a table written by emd_jax ({e})") from None
  s, t = tab["sigmas"], tab["table"]
  if levels_problem(s):
    raise UserInputError(f"mean_correction table {path}: sigmas {levels_problem(s)}")
  if t.shape != (len(s), *data_shape) or not np.all(np.isfinite(t)):
    raise UserInputError(
      f"mean_correction table {path}: table of shape {t.shape} (finite: {bool(np.all(np.isfinite(t)))}), "
      f"expected finite values of shape {(len(s), *data_shape)} for this teacher"
    )
  return tab

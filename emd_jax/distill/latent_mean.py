"""Where the generator's first input is centred: `g(z) = D_theta(mu + z, sigma_init)`, `z ~ N(0, sigma_init^2 I)`.

The one-step generator starts as the teacher's denoiser at `sigma_init`. Its input is meant to look
like a noisy example `x0 + sigma_init * eps`, whose mean is the data mean `E[x0]`, but the latent is
drawn around 0. For data that are not centred (the digits' black canvas: mean -0.85 per pixel, an
offset of norm 14.8 against a noise of norm 40) the starting generator then denoises inputs the
teacher never saw, and its samples' mean image starts far from the teacher's (docs/digits.md
"Centring the generator's input").

`generator.latent_mean = "tweedie"` moves the input to `mu + z` with the data-free fixed point

    mu = E_{z ~ N(0, sigma^2 I)}[ D_T(mu + z, sigma) ],

the first-moment condition Tweedie's formula gives for the exact noisy marginal
(`E[D(x_sigma, sigma)] = E[x_sigma] = E[x0]`), imposed on its Gaussian approximation
`N(mu, sigma^2 I)`. For a Gaussian teacher `N(m, s^2 I)`, `D(x) = m + s^2 / (s^2 + sigma^2) (x - m)`,
so the iteration `mu <- E[D(mu + z)]` contracts to `mu = m` by the factor `s^2 / (s^2 + sigma^2)`
per step. The latent's prior (and with it the E-step over `z`) stays `N(0, sigma^2 I)`: only the
generator function moves. "zero" (the default) is the usual `g(z) = D_theta(z, sigma_init)`.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.errors import UserInputError
from emd_jax.formats import paths

MODES = ("zero", "tweedie")
FILE = "latent_mean.npy"


def tweedie_fixed_point(
  denoise, data_shape, sigma: float, key, num_samples: int, iters: int, batch_size: int, num_classes: int = 0
) -> tuple[np.ndarray, list[float]]:
  """`mu` with `mu = mean_b D(mu + sigma * eps_b, sigma)` over `num_samples` fixed draws, by `iters` iterations
  from 0. `denoise(x, sigma [B], labels)`; a class-conditional teacher sees balanced labels (one `mu` for all
  classes). Returns `mu` (float32, `data_shape`) and the norm of each iteration's change."""
  eps = jax.random.normal(key, (num_samples, *data_shape), jnp.float32)
  labels = None
  if num_classes:
    labels = jax.nn.one_hot(jnp.arange(num_samples) % num_classes, num_classes)
  den = jax.jit(lambda x, lab: denoise(x, jnp.full((x.shape[0],), sigma, jnp.float32), lab))
  mu = jnp.zeros(data_shape, jnp.float32)
  changes = []
  for _ in range(iters):
    total = jnp.zeros(data_shape, jnp.float32)
    for i in range(0, num_samples, batch_size):
      lab = None if labels is None else labels[i : i + batch_size]
      total = total + den(mu + sigma * eps[i : i + batch_size], lab).astype(jnp.float32).sum(axis=0)
    new = total / num_samples
    changes.append(float(jnp.linalg.norm(new - mu)))
    mu = new
  return np.asarray(mu, np.float32), changes


def save(path: str, mu: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(mu, np.float32), allow_pickle=False)
  paths.write_bytes(path, buf.getvalue())


def load(path: str, data_shape) -> np.ndarray:
  """A saved `mu`; a file that is not one, or is for another data shape, is a `UserInputError` naming it."""
  try:
    mu = np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
  except FileNotFoundError:
    raise UserInputError(f"latent mean {path}: no such file") from None
  except (OSError, ValueError, EOFError) as e:
    raise UserInputError(f"latent mean {path}: not an array written by emd_jax ({e})") from None
  return check(mu, data_shape, f"latent mean {path}")


def check(mu, data_shape, where: str) -> np.ndarray:
  """`mu` as a float32 array of `data_shape` with finite values, or a `UserInputError` saying which rule fails."""
  mu = np.asarray(mu, np.float32)
  if mu.size != int(np.prod(data_shape)) or not np.all(np.isfinite(mu)):
    raise UserInputError(
      f"{where}: {mu.size} values (finite: {bool(np.all(np.isfinite(mu)))}), expected {int(np.prod(data_shape))} "
      f"finite values for data shape {tuple(data_shape)}"
    )
  return mu.reshape(tuple(data_shape))


def as_tuple(mu: np.ndarray | None) -> tuple[float, ...]:
  """The hashable form the step config holds (flattened; () for no shift)."""
  return () if mu is None else tuple(float(v) for v in np.asarray(mu, np.float32).ravel())


def shift_array(flat: tuple[float, ...], data_shape) -> jax.Array | None:
  """The step config's flattened shift as an array of `data_shape` (None for no shift)."""
  return None if not flat else jnp.asarray(np.asarray(flat, np.float32).reshape(tuple(data_shape)))

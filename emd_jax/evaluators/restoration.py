"""Restoration metrics on NHWC batches: PSNR and SSIM (Gaussian window), in jnp.

`data_range` is the width of the value range: 2.0 for images in [-1, 1]
(the project's convention, the default), 1.0 for [0, 1], 255 for uint8 scale.
Both functions return one value per image, `[B]`. SSIM's luminance term is not
shift invariant, so `ssim` first shifts images to `[0, data_range]`
(`data_min`, default -1 when `data_range == 2`, else 0): SSIM of [-1, 1] images
equals SSIM of the same images mapped to [0, 1], as usually reported.

`RestorationEvaluator` is the registered `restoration` evaluator (`registry`):
`evaluator(restored, clean, observed=None)` -> the set means.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.evaluators import registry

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("data_range",))
def psnr(x: Array, ref: Array, data_range: float = 2.0) -> Array:
  """`10 log10(data_range^2 / mse)` per image `[B]`; identical images give `inf`."""
  err = jnp.mean(jnp.reshape((x.astype(jnp.float32) - ref.astype(jnp.float32)) ** 2, (x.shape[0], -1)), -1)
  return 10.0 * jnp.log10(data_range**2 / err)


def _gaussian_window(size: int, std: float) -> np.ndarray:
  r = np.arange(size) - (size - 1) / 2.0
  g = np.exp(-0.5 * (r / std) ** 2)
  return (g / g.sum()).astype(np.float32)


def _filter(x: Array, g: Array) -> Array:
  """Separable valid Gaussian filtering per channel: `[B, H, W, C] -> [B, H-k+1, W-k+1, C]`."""
  c = x.shape[-1]
  k = g.shape[0]
  dn = ("NHWC", "HWIO", "NHWC")
  wy = jnp.tile(g.reshape(k, 1, 1, 1), (1, 1, 1, c))
  wx = jnp.tile(g.reshape(1, k, 1, 1), (1, 1, 1, c))
  x = jax.lax.conv_general_dilated(x, wy, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
  return jax.lax.conv_general_dilated(x, wx, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)


@functools.partial(jax.jit, static_argnames=("data_range", "data_min", "window_size", "window_std", "k1", "k2"))
def ssim(
  x: Array,
  ref: Array,
  data_range: float = 2.0,
  data_min: float | None = None,
  window_size: int = 11,
  window_std: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> Array:
  """Structural similarity (Wang et al. 2004) per image `[B]`.

  Gaussian window (11 x 11, std 1.5; clipped to the largest odd size that fits),
  'valid' filtering (no padding), statistics per channel, the SSIM map averaged
  over positions and channels. `C1 = (k1 L)^2`, `C2 = (k2 L)^2`, `L = data_range`.
  """
  if data_min is None:
    data_min = -1.0 if data_range == 2.0 else 0.0
  x = x.astype(jnp.float32) - data_min
  ref = ref.astype(jnp.float32) - data_min
  size = min(window_size, x.shape[1], x.shape[2])
  size = size if size % 2 == 1 else size - 1
  g = jnp.asarray(_gaussian_window(size, window_std))
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mu_x, mu_y = _filter(x, g), _filter(ref, g)
  var_x = _filter(x * x, g) - mu_x**2
  var_y = _filter(ref * ref, g) - mu_y**2
  cov = _filter(x * ref, g) - mu_x * mu_y
  num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
  den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


@registry.register("restoration", kind="restoration")
class RestorationEvaluator:
  """The `restoration` evaluator: mean PSNR and SSIM of restored vs clean images.

  `evaluator(restored [N, H, W, C], clean [N, H, W, C], observed=None)` returns
  `{'psnr', 'ssim'}`, plus `psnr_observed` (PSNR of `observed`, the observation in
  image space, e.g. `A^T y`: the baseline a restoration must beat) when given.
  `data_range`: as `psnr` / `ssim` (2.0 for images in [-1, 1]).
  """

  name = "restoration"
  kind = "restoration"

  def __init__(self, data_range: float = 2.0):
    if not data_range > 0:
      raise ValueError(f"data_range must be > 0, got {data_range}")
    self.data_range = float(data_range)

  def __call__(self, restored: Array, clean: Array, observed: Array | None = None) -> dict[str, float]:
    r = self.data_range
    out = {
      "psnr": float(jnp.mean(psnr(restored, clean, data_range=r))),
      "ssim": float(jnp.mean(ssim(restored, clean, data_range=r))),
    }
    if observed is not None:
      out["psnr_observed"] = float(jnp.mean(psnr(observed, clean, data_range=r)))
    return out

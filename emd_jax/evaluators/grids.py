"""Sample grids: images -> one uint8 picture -> PNG."""

from __future__ import annotations

import io
import math
import os

import numpy as np

from emd_jax.formats import paths


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in `[-1, 1]` (float) or already uint8 -> uint8 `[..., H, W, C]` in 0..255."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  x = (images.astype(np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, padding: int = 1) -> np.ndarray:
  """`[N, H, W, C]` (uint8 or `[-1, 1]`) -> uint8 `[rows*(H+p)+p, ncols*(W+p)+p, C]`.

  Images fill rows left to right; empty cells and the `padding`-pixel
  borders are black. `ncols` defaults to ceil(sqrt(N)).
  """
  images = to_uint8(images)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  ncols = ncols or max(1, math.ceil(math.sqrt(n)))
  nrows = max(1, math.ceil(n / ncols))
  p = padding
  grid = np.zeros((nrows * (h + p) + p, ncols * (w + p) + p, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    top, left = p + r * (h + p), p + col * (w + p)
    grid[top : top + h, left : left + w] = images[i]
  return grid


def save_png(path: str, grid: np.ndarray, scale: int = 1) -> None:
  """Writes a uint8 `[H, W, C]` (C = 1 or 3) picture, upscaled `scale`x (nearest)."""
  from PIL import Image

  grid = to_uint8(grid)
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  if grid.ndim == 3 and grid.shape[-1] == 1:
    grid = grid[..., 0]
  path = paths.abspath(path)
  paths.makedirs(os.path.dirname(path))
  if not paths.is_remote(path):
    Image.fromarray(grid).save(path)
    return
  buf = io.BytesIO()  # an object store: encode in memory, write one object
  fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
  Image.fromarray(grid).save(buf, format=fmt)
  paths.write_bytes(path, buf.getvalue())

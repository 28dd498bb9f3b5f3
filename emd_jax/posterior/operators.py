"""Linear measurement operators `y = A x + n` on NHWC image batches (ALGORITHMS.md section 7).

Every operator is a `flax.struct` dataclass (a pytree: its arrays are leaves, its
sizes static), so it can be closed over or passed through `jax.jit`. Interface:

  forward(x)                 A x            x [B, H, W, C] -> y
  adjoint(y)                 A^T y          y -> [B, H, W, C]
  prox(v, y, lam, sigma_y)   argmin_x ||y - A x||^2 / (2 sigma_y^2) + ||x - v||^2 / (2 lam)
  observe(rng, x, sigma_y)   A x + sigma_y * n,  n ~ N(0, I)
  backproject(y)             a cheap image-space starting point (not the prox)

and, for SVD-based restorers (DDRM), `A = U S V^T` in a fast orthonormal basis:

  spectral(x)                V^T x          (blur: orthonormal rFFT; inpainting: identity;
                                             downsampling: orthonormal DCT inside each block)
  inverse_spectral(xb)       V xb
  singular_values()          S, broadcastable against `spectral(x)`; 0 on the null space
                             (and below `SPECTRAL_EPS`)
  spectral_y(y)              S^+ U^T y      (0 where S = 0)

`lam` and `sigma_y` are scalars or per-example `[B]`. Every prox solves the
normal equations in the form `(lam A^T A + sigma_y^2 I) x = lam A^T y + sigma_y^2 v`,
which stays well defined for `sigma_y = 0` (then the prox projects `v` onto
`{A x = y}`), and is closed form wherever A is diagonal in some basis:
circular blur in Fourier space, inpainting per pixel. Downsampling uses
conjugate gradients with a fixed iteration count (`A A^T = I / f^2`, so CG is
exact after two iterations in exact arithmetic; the default runs a few more).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from emd_jax.diffusion import expand_to

Array = jax.Array

# Singular values below this count as zero (a blur's near-zero frequencies would
# otherwise turn round-off into huge `spectral_y` values).
SPECTRAL_EPS = 1e-6


def _safe_div(num: Array, den: Array, fallback: Array) -> Array:
  """`num / den` where `den > 0`, else `fallback` (the `sigma_y = 0`, unobserved case)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)


class LinearOperator:
  """Shared behaviour; subclasses define `forward`, `adjoint` and usually `prox`."""

  def forward(self, x: Array) -> Array:
    raise NotImplementedError

  def adjoint(self, y: Array) -> Array:
    raise NotImplementedError

  def gram(self, x: Array) -> Array:
    """`A^T A x`."""
    return self.adjoint(self.forward(x))

  def observe(self, rng: Array, x: Array, sigma_y: float | Array) -> Array:
    """A noisy measurement `A x + sigma_y n`."""
    y = self.forward(x)
    return y + expand_to(sigma_y, y) * jax.random.normal(rng, y.shape, y.dtype)

  def backproject(self, y: Array) -> Array:
    """Image-space starting point for iterative restorers (default `A^T y`)."""
    return self.adjoint(y)

  def prox(self, v: Array, y: Array, lam: float | Array, sigma_y: float | Array) -> Array:
    """Proximal data step by conjugate gradients (generic fallback)."""
    return prox_cg(self, v, y, lam, sigma_y, num_iters=getattr(self, "cg_iters", 20))

  def spectral(self, x: Array) -> Array:
    raise NotImplementedError(f"{type(self).__name__} has no fast SVD")

  def inverse_spectral(self, xb: Array) -> Array:
    raise NotImplementedError(f"{type(self).__name__} has no fast SVD")

  def singular_values(self) -> Array:
    raise NotImplementedError(f"{type(self).__name__} has no fast SVD")

  def spectral_y(self, y: Array) -> Array:
    raise NotImplementedError(f"{type(self).__name__} has no fast SVD")


def prox_cg(
  op: LinearOperator,
  v: Array,
  y: Array,
  lam: float | Array,
  sigma_y: float | Array,
  num_iters: int = 20,
) -> Array:
  """Solves `(lam A^T A + sigma_y^2 I) x = lam A^T y + sigma_y^2 v` by CG from `x = v`.

  Per-example CG (inner products over H, W, C), a fixed `num_iters` in a
  `lax.fori_loop`; exhausted directions (zero residual) stay put.
  """
  lam_b = expand_to(jnp.asarray(lam, v.dtype), v)
  s2 = expand_to(jnp.asarray(sigma_y, v.dtype) ** 2, v)
  matvec = lambda x: lam_b * op.gram(x) + s2 * x
  dot = lambda a, b: jnp.sum(a * b, axis=tuple(range(1, a.ndim)), keepdims=True)  # [B, 1, 1, 1]

  x = v
  r = lam_b * op.adjoint(y) + s2 * v - matvec(x)
  p = r
  rr = dot(r, r)

  def body(_, carry):
    x, r, p, rr = carry
    ap = matvec(p)
    pap = dot(p, ap)
    alpha = _safe_div(rr, pap, jnp.zeros_like(rr))
    x = x + alpha * p
    r = r - alpha * ap
    rr_new = dot(r, r)
    beta = _safe_div(rr_new, rr, jnp.zeros_like(rr))
    return x, r, r + beta * p, rr_new

  x, *_ = jax.lax.fori_loop(0, num_iters, body, (x, r, p, rr))
  return x


# ----------------------------------------------------------------------------
# Kernels.


def gaussian_kernel(size: int, std: float) -> np.ndarray:
  """A normalised isotropic Gaussian kernel `[size, size]` (size odd)."""
  r = np.arange(size) - (size - 1) / 2.0
  g = np.exp(-0.5 * (r / std) ** 2)
  k = np.outer(g, g)
  return (k / k.sum()).astype(np.float32)


def motion_kernel(size: int, seed: int, intensity: float = 0.5, num_points: int = 256) -> np.ndarray:
  """A random camera-shake kernel `[size, size]`, reproducible from `seed`.

  A trajectory of `num_points` positions follows a velocity whose direction
  turns by random increments (more turning for larger `intensity`) and whose
  length covers about `0.4 + 0.5 * intensity` of the kernel width; the path is
  splatted bilinearly onto the grid, centred on its mean, and normalised.
  """
  rs = np.random.RandomState(seed)
  angle = rs.uniform(0, 2 * np.pi)
  turn = rs.normal(0.0, 0.15 + 0.6 * intensity, num_points).cumsum() / np.sqrt(num_points) * 4.0
  steps = np.stack([np.cos(angle + turn), np.sin(angle + turn)], axis=-1)  # [P, 2]
  path = np.cumsum(steps, axis=0)
  path -= path.mean(axis=0)
  extent = max(np.abs(path).max(), 1e-6)
  half = (size - 1) / 2.0
  path *= (0.4 + 0.5 * intensity) * half / extent
  k = np.zeros((size, size), np.float64)
  for py, px in path + half:
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    wy, wx = py - y0, px - x0
    for dy, dx, w in (
      (0, 0, (1 - wy) * (1 - wx)),
      (1, 0, wy * (1 - wx)),
      (0, 1, (1 - wy) * wx),
      (1, 1, wy * wx),
    ):
      if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
        k[y0 + dy, x0 + dx] += w
  return (k / k.sum()).astype(np.float32)


def _dct_matrix(n: int) -> np.ndarray:
  """Orthonormal DCT-II matrix `[n, n]`; row 0 is the constant `1/sqrt(n)`."""
  i = np.arange(n)
  d = np.cos(np.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * np.sqrt(2.0 / n)
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


def _kernel_fft(kernel: np.ndarray, height: int, width: int) -> np.ndarray:
  """rFFT of a kernel zero-padded to `[H, W]` with its centre at pixel (0, 0): `[H, W//2+1, 1]`."""
  kh, kw = kernel.shape
  if kh > height or kw > width:
    raise ValueError(f"kernel {kernel.shape} larger than image {(height, width)}")
  pad = np.zeros((height, width), np.float32)
  pad[:kh, :kw] = kernel
  pad = np.roll(pad, (-(kh // 2), -(kw // 2)), axis=(0, 1))
  return np.fft.rfft2(pad)[..., None].astype(np.complex64)


# ----------------------------------------------------------------------------
# Operators.


@struct.dataclass
class CircularBlur(LinearOperator):
  """Circular convolution of every channel with one kernel; prox in Fourier space.

  `kernel_fft` `[H, W//2+1, 1]` is the rFFT of the centred, zero-padded kernel.
  """

  kernel_fft: Array
  kernel: Array  # [kh, kw], kept for inspection and export
  image_shape: tuple[int, int, int] = struct.field(pytree_node=False)

  def _apply(self, x: Array, kf: Array) -> Array:
    h, w = self.image_shape[:2]
    xf = jnp.fft.rfft2(x, axes=(1, 2))
    return jnp.fft.irfft2(xf * kf, s=(h, w), axes=(1, 2)).astype(x.dtype)

  def forward(self, x: Array) -> Array:
    return self._apply(x, self.kernel_fft)

  def adjoint(self, y: Array) -> Array:
    return self._apply(y, jnp.conj(self.kernel_fft))

  def backproject(self, y: Array) -> Array:
    return y

  def prox(self, v: Array, y: Array, lam: float | Array, sigma_y: float | Array) -> Array:
    h, w = self.image_shape[:2]
    lam_b = expand_to(jnp.asarray(lam, v.dtype), v)
    s2 = expand_to(jnp.asarray(sigma_y, v.dtype) ** 2, v)
    vf = jnp.fft.rfft2(v, axes=(1, 2))
    yf = jnp.fft.rfft2(y, axes=(1, 2))
    k = self.kernel_fft
    num = lam_b * jnp.conj(k) * yf + s2 * vf
    den = lam_b * jnp.abs(k) ** 2 + s2
    xf = _safe_div(num, den, vf)
    return jnp.fft.irfft2(xf, s=(h, w), axes=(1, 2)).astype(v.dtype)

  # SVD: A = F^* diag(K) F with F the unitary DFT. The half spectrum of a real
  # image stands for the full one: every per-frequency update with coefficients
  # symmetric in frequency (functions of |K|) acts on both halves alike.
  def spectral(self, x: Array) -> Array:
    return jnp.fft.rfft2(x, axes=(1, 2), norm="ortho")

  def inverse_spectral(self, xb: Array) -> Array:
    h, w = self.image_shape[:2]
    return jnp.fft.irfft2(xb, s=(h, w), axes=(1, 2), norm="ortho").real

  def singular_values(self) -> Array:
    s = jnp.abs(self.kernel_fft)  # [H, W//2+1, 1]
    return jnp.where(s > SPECTRAL_EPS, s, 0.0)

  def spectral_y(self, y: Array) -> Array:
    k = self.kernel_fft
    yb = jnp.fft.rfft2(y, axes=(1, 2), norm="ortho")
    den = jnp.where(self.singular_values() > 0, jnp.abs(k) ** 2, 0.0)
    return _safe_div(yb * jnp.conj(k), den * jnp.ones(yb.shape), jnp.zeros_like(yb))


@struct.dataclass
class Inpainting(LinearOperator):
  """Keeps the pixels where `mask == 1` and zeroes the rest (`y` has the image's shape).

  `A = A^T = diag(mask)`, so the prox is element-wise:
  `x = (lam m y + sigma_y^2 v) / (lam m + sigma_y^2)`.
  """

  mask: Array  # [H, W, 1] or [H, W, C], values in {0, 1}

  def forward(self, x: Array) -> Array:
    return x * self.mask

  def adjoint(self, y: Array) -> Array:
    return y * self.mask

  def prox(self, v: Array, y: Array, lam: float | Array, sigma_y: float | Array) -> Array:
    lam_b = expand_to(jnp.asarray(lam, v.dtype), v)
    s2 = expand_to(jnp.asarray(sigma_y, v.dtype) ** 2, v)
    num = lam_b * self.mask * y + s2 * v
    den = lam_b * self.mask + s2
    return _safe_div(num, den * jnp.ones_like(v), v)

  def spectral(self, x: Array) -> Array:
    return x

  def inverse_spectral(self, xb: Array) -> Array:
    return xb

  def singular_values(self) -> Array:
    return self.mask

  def spectral_y(self, y: Array) -> Array:
    return y * self.mask


@struct.dataclass
class Downsample(LinearOperator):
  """Average pooling by an integer factor `f`: `[B, H, W, C] -> [B, H/f, W/f, C]`.

  Adjoint: nearest-neighbour upsampling divided by `f^2`. Prox: CG (`cg_iters`).
  """

  factor: int = struct.field(pytree_node=False)
  image_shape: tuple[int, int, int] = struct.field(pytree_node=False)
  cg_iters: int = struct.field(pytree_node=False, default=10)

  def forward(self, x: Array) -> Array:
    b, h, w, c = x.shape
    f = self.factor
    return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))

  def adjoint(self, y: Array) -> Array:
    f = self.factor
    up = jnp.repeat(jnp.repeat(y, f, axis=1), f, axis=2)
    return up / (f * f)

  def backproject(self, y: Array) -> Array:
    """Nearest-neighbour upsampling, the pseudo-inverse `A^T (A A^T)^{-1} y = f^2 A^T y`."""
    return self.adjoint(y) * (self.factor**2)

  def prox(self, v: Array, y: Array, lam: float | Array, sigma_y: float | Array) -> Array:
    return prox_cg(self, v, y, lam, sigma_y, num_iters=self.cg_iters)

  # SVD: inside each f x f block, the orthonormal 2-D DCT; its DC coefficient is
  # f * mean(block), the only direction A sees (singular value 1/f).
  def _blocks(self, x: Array) -> Array:
    b, h, w, c = x.shape
    f = self.factor
    return x.reshape(b, h // f, f, w // f, f, c)

  def spectral(self, x: Array) -> Array:
    d = jnp.asarray(_dct_matrix(self.factor), x.dtype)
    xb = jnp.einsum("ij,bhjwkc,lk->bhiwlc", d, self._blocks(x), d)
    return xb.reshape(x.shape)

  def inverse_spectral(self, xb: Array) -> Array:
    d = jnp.asarray(_dct_matrix(self.factor), xb.dtype)
    x = jnp.einsum("ji,bhjwkc,kl->bhiwlc", d, self._blocks(xb), d)
    return x.reshape(xb.shape)

  def singular_values(self) -> Array:
    f = self.factor
    dc = np.zeros((f, f), np.float32)
    dc[0, 0] = 1.0 / f
    return jnp.asarray(np.tile(dc, (self.image_shape[0] // f, self.image_shape[1] // f))[..., None])

  def spectral_y(self, y: Array) -> Array:
    b, hl, wl, c = y.shape
    f = self.factor
    out = jnp.zeros((b, hl, f, wl, f, c), y.dtype).at[:, :, 0, :, 0, :].set(f * y)
    return out.reshape(b, hl * f, wl * f, c)


# ----------------------------------------------------------------------------
# Registry.


def _odd_at_most(size: int, limit: int) -> int:
  size = min(size, limit)
  return size if size % 2 == 1 else size - 1


def gaussian_blur(image_shape: Sequence[int], kernel_size: int = 61, std: float = 3.0) -> CircularBlur:
  """Gaussian blur (DPS/DiffPIR default: 61 x 61, std 3; the size is clipped to the image)."""
  h, w = image_shape[:2]
  k = gaussian_kernel(_odd_at_most(kernel_size, min(h, w)), std)
  return CircularBlur(jnp.asarray(_kernel_fft(k, h, w)), jnp.asarray(k), tuple(image_shape))


def motion_blur(
  image_shape: Sequence[int], kernel_size: int = 61, intensity: float = 0.5, seed: int = 0
) -> CircularBlur:
  """Random motion blur from `motion_kernel(size, seed, intensity)`."""
  h, w = image_shape[:2]
  k = motion_kernel(_odd_at_most(kernel_size, min(h, w)), seed, intensity)
  return CircularBlur(jnp.asarray(_kernel_fft(k, h, w)), jnp.asarray(k), tuple(image_shape))


def inpaint_random(image_shape: Sequence[int], missing: float = 0.7, seed: int = 0) -> Inpainting:
  """Drops a random fraction `missing` of the pixels (all channels of a pixel together)."""
  h, w = image_shape[:2]
  rs = np.random.RandomState(seed)
  mask = (rs.uniform(size=(h, w, 1)) >= missing).astype(np.float32)
  return Inpainting(jnp.asarray(mask))


def inpaint_box(
  image_shape: Sequence[int], box_size: int | None = None, top_left: tuple[int, int] | None = None
) -> Inpainting:
  """Drops a square box (default: half the image side, centred)."""
  h, w = image_shape[:2]
  s = box_size if box_size is not None else min(h, w) // 2
  y0, x0 = top_left if top_left is not None else ((h - s) // 2, (w - s) // 2)
  mask = np.ones((h, w, 1), np.float32)
  mask[y0 : y0 + s, x0 : x0 + s] = 0.0
  return Inpainting(jnp.asarray(mask))


def downsample(image_shape: Sequence[int], factor: int = 4, cg_iters: int = 10) -> Downsample:
  """Average-pooling super-resolution operator."""
  h, w = image_shape[:2]
  if h % factor or w % factor:
    raise ValueError(f"image {tuple(image_shape)} not divisible by factor {factor}")
  return Downsample(factor=factor, image_shape=tuple(image_shape), cg_iters=cg_iters)


_REGISTRY: dict[str, Callable[..., LinearOperator]] = {
  "gaussian_blur": gaussian_blur,
  "motion_blur": motion_blur,
  "inpaint_random": inpaint_random,
  "inpaint_box": inpaint_box,
  "downsample": downsample,
}


def make_operator(name: str, image_shape: Sequence[int], **kwargs) -> LinearOperator:
  """Builds a measurement operator by name for images of shape `(H, W, C)`."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown operator {name!r}; known: {sorted(_REGISTRY)}")
  return _REGISTRY[name](tuple(image_shape), **kwargs)


def measurement_shape(op: LinearOperator, image_shape: Sequence[int]) -> tuple[int, ...]:
  """Shape of one measurement `y` for one image of `image_shape`."""
  out = jax.eval_shape(op.forward, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return tuple(out.shape[1:])


__all__ = [
  "CircularBlur",
  "Downsample",
  "Inpainting",
  "LinearOperator",
  "gaussian_kernel",
  "make_operator",
  "measurement_shape",
  "motion_kernel",
  "prox_cg",
]

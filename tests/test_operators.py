"""Measurement operators: adjoints, proximal maps against dense solves, kernels, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emd_jax.posterior import operators as ops
from emd_jax.posterior.gaussian import dense_matrix

SHAPE = (8, 8, 2)
CASES = [
  ("gaussian_blur", dict(kernel_size=5, std=1.2)),
  ("motion_blur", dict(kernel_size=7, seed=3)),
  ("inpaint_random", dict(missing=0.6, seed=1)),
  ("inpaint_box", dict(box_size=4)),
  ("downsample", dict(factor=2)),
  ("downsample", dict(factor=4, cg_iters=4)),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


def _data(op, batch=3, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k[0], (batch, *SHAPE))
  y_shape = (batch, *ops.measurement_shape(op, SHAPE))
  y = jax.random.normal(k[1], y_shape)
  v = jax.random.normal(k[2], (batch, *SHAPE))
  return x, y, v


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_adjoint_identity(name, kw):
  op = ops.make_operator(name, SHAPE, **kw)
  x, y, _ = _data(op)
  lhs = jnp.vdot(op.forward(x), y)
  rhs = jnp.vdot(x, op.adjoint(y))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-4)
  # The dense matrix of the adjoint is the transpose of the forward's.
  a = dense_matrix(op.forward, SHAPE)
  at = dense_matrix(op.adjoint, ops.measurement_shape(op, SHAPE))
  np.testing.assert_allclose(at, a.T, atol=1e-6)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_prox_matches_dense_normal_equations(name, kw):
  op = ops.make_operator(name, SHAPE, **kw)
  _, y, v = _data(op)
  lam = jnp.array([0.05, 1.0, 7.0])  # per example
  sigma_y = jnp.array([0.1, 0.5, 0.1])  # per example too
  u = jax.jit(op.prox)(v, y, lam, sigma_y)
  a = np.asarray(dense_matrix(op.forward, SHAPE), np.float64)
  d = a.shape[1]
  for i in range(3):
    s2 = float(sigma_y[i]) ** 2
    # argmin ||y - A x||^2/(2 s^2) + ||x - v||^2/(2 lam) solves
    # (A^T A / s^2 + I / lam) x = A^T y / s^2 + v / lam.
    lhs = a.T @ a / s2 + np.eye(d) / float(lam[i])
    rhs = a.T @ np.asarray(y[i], np.float64).ravel() / s2 + np.asarray(v[i]).ravel() / float(lam[i])
    ref = np.linalg.solve(lhs, rhs)
    np.testing.assert_allclose(np.asarray(u[i]).ravel(), ref, atol=2e-5 * max(1.0, np.abs(ref).max()))
  # Scalar lam broadcasts like a constant vector.
  np.testing.assert_allclose(op.prox(v, y, 1.0, 0.2), op.prox(v, y, jnp.ones(3), 0.2), atol=1e-5)


def test_downsample_cg_is_exact_in_one_iteration():
  """From `x = v` the CG residual `lam A^T (y - A v)` lies in range(A^T), one eigenspace of
  `A^T A` (`A A^T = I / f^2`), so a single CG step reaches the Woodbury closed form."""
  op = ops.make_operator("downsample", SHAPE, factor=2, cg_iters=1)
  _, y, v = _data(op)
  # Woodbury: x = v + lam A^T (y - A v) / (s^2 + lam / f^2)
  woodbury = v + 0.3 * op.adjoint(y - op.forward(v)) / (0.05**2 + 0.3 / 4)
  np.testing.assert_allclose(op.prox(v, y, 0.3, 0.05), woodbury, atol=1e-5)
  np.testing.assert_allclose(ops.prox_cg(op, v, y, 0.3, 0.05, num_iters=50), woodbury, atol=1e-5)
  assert float(jnp.abs(ops.prox_cg(op, v, y, 0.3, 0.05, num_iters=0) - woodbury).max()) > 1e-2


def test_prox_noiseless_limits():
  """sigma_y = 0: inpainting keeps y where observed, v elsewhere; blur/downsample fit y."""
  op = ops.make_operator("inpaint_random", SHAPE, missing=0.5, seed=0)
  x, _, v = _data(op)
  y = op.forward(x)
  u = op.prox(v, y, 1.0, 0.0)
  m = op.mask
  np.testing.assert_allclose(u, m * x + (1 - m) * v, atol=1e-6)
  assert bool(jnp.all(jnp.isfinite(u)))
  for name, kw in [("gaussian_blur", dict(kernel_size=3, std=0.7)), ("downsample", dict(factor=2))]:
    op = ops.make_operator(name, SHAPE, **kw)
    y = op.forward(x)
    u = op.prox(v, y, 1.0, 0.0)
    np.testing.assert_allclose(op.forward(u), y, atol=2e-3)


def test_kernels_and_constants():
  k = ops.motion_kernel(9, seed=4, intensity=0.7)
  assert k.shape == (9, 9) and np.all(k >= 0) and np.isclose(k.sum(), 1.0)
  np.testing.assert_array_equal(k, ops.motion_kernel(9, seed=4, intensity=0.7))
  assert np.abs(k - ops.motion_kernel(9, seed=5, intensity=0.7)).max() > 1e-3
  g = ops.gaussian_kernel(7, 1.0)
  assert np.isclose(g.sum(), 1.0) and np.allclose(g, g.T) and np.allclose(g, g[::-1, ::-1])
  # Blur and average pooling keep constant images constant.
  const = jnp.full((1, *SHAPE), 0.3)
  for name, kw in [("gaussian_blur", {}), ("motion_blur", {}), ("downsample", dict(factor=4))]:
    op = ops.make_operator(name, SHAPE, **kw)
    np.testing.assert_allclose(op.forward(const), 0.3, atol=1e-6)
  box = ops.make_operator("inpaint_box", SHAPE)
  assert float(box.mask.sum()) == 8 * 8 - 4 * 4
  with pytest.raises(ValueError):
    ops.make_operator("nope", SHAPE)


def test_observe_noise_and_jit_through_pytree():
  op = ops.make_operator("gaussian_blur", SHAPE, kernel_size=5)
  x = jnp.zeros((64, *SHAPE))
  y = op.observe(jax.random.PRNGKey(0), x, 0.2)
  np.testing.assert_allclose(jnp.std(y), 0.2, rtol=0.03)
  # The operator is a pytree: it can be a jit argument (no recompilation for a new kernel).
  f = jax.jit(lambda o, v, y: o.prox(v, y, 0.5, 0.1))
  _, yy, v = _data(op)
  op2 = ops.make_operator("motion_blur", SHAPE, kernel_size=5, seed=1)
  np.testing.assert_allclose(f(op, v, yy), op.prox(v, yy, 0.5, 0.1), atol=1e-6)
  np.testing.assert_allclose(f(op2, v, yy), op2.prox(v, yy, 0.5, 0.1), atol=1e-6)
  assert f._cache_size() == 1


@pytest.mark.parametrize(
  "name,kw",
  [
    ("gaussian_blur", dict(kernel_size=5, std=1.2)),
    ("motion_blur", dict(kernel_size=5, seed=2)),
    ("inpaint_random", {}),
    ("downsample", dict(factor=4)),
  ],
)
def test_spectral_decomposition(name, kw):
  """`A = U S V^T`: V orthonormal, `S^+ U^T A x = V^T x` where S > 0 (else 0), S = svd(A)."""
  op = ops.make_operator(name, SHAPE, **kw)
  x, _, _ = _data(op)
  xb = op.spectral(x)
  np.testing.assert_allclose(op.inverse_spectral(xb), x, atol=1e-5)
  s = jnp.broadcast_to(op.singular_values(), xb.shape[1:])
  if jnp.iscomplexobj(xb):
    # The rFFT half spectrum: columns other than 0 and W/2 stand for two frequencies.
    w = np.full(xb.shape[2], 2.0)
    w[0] = w[-1] = 1.0
    weights = jnp.asarray(w)[None, None, :, None]
    s_full = np.concatenate([np.asarray(s), np.asarray(s)[:, 1:-1]], axis=1)
  else:
    weights = 1.0
    s_full = np.asarray(s)
  np.testing.assert_allclose(jnp.sum(weights * jnp.abs(xb) ** 2), jnp.sum(x**2), rtol=1e-5)
  yb = op.spectral_y(op.forward(x))
  observed = s > 1e-6
  # S ybar = U^T y = S V^T x (checked after multiplying by S: ybar divides by tiny S).
  np.testing.assert_allclose(s * yb, s * xb, atol=1e-5)
  np.testing.assert_allclose(jnp.where(observed, 0, yb), 0.0)
  a = np.asarray(dense_matrix(op.forward, SHAPE), np.float64)
  sv = np.linalg.svd(a, compute_uv=False)
  ours = np.sort(s_full.ravel())[::-1]
  np.testing.assert_allclose(ours[: len(sv)], sv, atol=1e-5)
  np.testing.assert_allclose(ours[len(sv) :], 0.0, atol=1e-6)

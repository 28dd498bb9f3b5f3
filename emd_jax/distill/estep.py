"""EMD E-step: reparametrised Langevin on `(eps, z)` with noise cancellation.

ALGORITHMS.md section 3. With `x_t = alpha g(z) + sigma eps` and
`d = eps_hat_psi(x_t) - eps_hat_T(x_t)`:

  grad_eps L = d - eps
  grad_z   L = (alpha / sigma) J_g(z)^T d - z / sigma_z^2

Each Langevin step costs one teacher forward, one fake-denoiser forward and,
when `gamma_z > 0`, one VJP through the generator. The chain is a `lax.scan`.
Noise cancellation tracks the pure-noise part of `eps` with the same linear
recursion (`N_0 = eps_0`, `N_{k+1} = (1 - gamma_eps) N_k + sqrt(2 gamma_eps) n_k`)
and returns `eps_nc = eps_K - N_K`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emd_jax.diffusion import denoise_xt, expand_to

Array = jax.Array


class EStepResult(NamedTuple):
  eps: Array  # [B, ...] final Langevin eps_K
  z: Array  # [B, ...] final latent z_K
  eps_nc: Array  # [B, ...] eps_K - N_K (== eps_K when noise cancellation is off)
  noise: Array  # [B, ...] the tracked noise N_K
  x0: Array | None  # [B, ...] g(z_K) when z was frozen, else None
  stats: dict  # scalars


def _per_example_norm(v: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.reshape(v, (v.shape[0], -1)) ** 2, axis=-1))


def score_gap(teacher_fn: Callable, fake_fn: Callable, x_t: Array, alpha: Array, sigma: Array):
  """`d = eps_hat_psi - eps_hat_T = (alpha / sigma)(D_T - D_psi)` at `x_t`, plus both D's.

  Both outputs are cast to float32 before the difference (the networks compute in one dtype,
  `teachers.network.with_compute_dtype`), so a fake denoiser equal to the teacher gives `d = 0` exactly.
  """
  d_teacher = denoise_xt(teacher_fn, x_t, alpha, sigma).astype(jnp.float32)
  d_fake = denoise_xt(fake_fn, x_t, alpha, sigma).astype(jnp.float32)
  d = expand_to(alpha / sigma, x_t) * (d_teacher - d_fake)
  return d, d_teacher, d_fake


def langevin_estep(
  rng: Array,
  eps0: Array,
  z0: Array,
  gen_fn: Callable[[Array], Array],
  teacher_fn: Callable,
  fake_fn: Callable,
  alpha: Array,
  sigma: Array,
  *,
  num_steps: int,
  gamma_eps: float,
  gamma_z: Array | float = 0.0,
  sigma_z: Array | float = 1.0,
  noise_cancellation: bool = True,
  x0: Array | None = None,
  per_example_keys: bool = False,
) -> EStepResult:
  """Runs `num_steps` Langevin steps on `(eps, z)`; pure and jittable.

  Args:
    rng: key for the injected noise.
    eps0, z0: chain start, `[B, ...]` each (eps0 ~ N(0, I), z0 ~ p(z)).
    gen_fn: `z -> g(z)` with the generator's parameters bound (only called when
      the latent moves, i.e. `gamma_z` is not the Python float 0).
    teacher_fn, fake_fn: denoise closures `(x, sigma, labels) -> D` (labels bound).
    alpha, sigma: forward-process coefficients, `[B]`.
    gamma_z: scalar or per-example `[B]` latent step size; a Python 0 freezes z.
    sigma_z: prior std of the latent, scalar or per-example `[B]`.
    x0: `g(z0)` if already computed (required when z is frozen).
    per_example_keys: `rng` is a batch of keys `[B]`, one per chain, so that each
      chain's noise does not depend on how the batch is split (gradient
      accumulation gives the same chains as one big batch).
  """
  if num_steps < 1:
    raise ValueError(f"estep.num_steps must be >= 1 for the E-step, got {num_steps}")
  move_z = not (isinstance(gamma_z, (int, float)) and gamma_z == 0)
  if x0 is None:
    x0 = gen_fn(z0)
  a = expand_to(alpha, eps0)
  s = expand_to(sigma, eps0)
  g_eps = gamma_eps
  g_z = expand_to(jnp.asarray(gamma_z, eps0.dtype), z0) if move_z else 0.0
  sz2 = sigma_z**2 if isinstance(sigma_z, (int, float)) else expand_to(jnp.asarray(sigma_z, z0.dtype), z0) ** 2

  def draw(key, i, tag, like):
    if per_example_keys:
      return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, i), tag), like.shape[1:]))(
        key
      )
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), tag), like.shape, like.dtype)

  def body(carry, i):
    eps, z, noise, x0_cur = carry
    if move_z:
      x0_cur, g_vjp = jax.vjp(gen_fn, z)
    x_t = a * x0_cur + s * eps
    d, _, _ = score_gap(teacher_fn, fake_fn, x_t, alpha, sigma)
    n = draw(rng, i, 0, eps)
    drift = g_eps * (d - eps)
    kick = jnp.sqrt(2.0 * g_eps) * n
    eps_new = eps + drift + kick
    # The same arithmetic as eps's update with d = 0, so a zero score gap gives eps_nc = 0 exactly.
    noise_new = noise + g_eps * (0.0 - noise) + kick
    if move_z:
      (jtd,) = g_vjp(d)
      grad_z = (a / s) * jtd - z / sz2
      z = z + g_z * grad_z + jnp.sqrt(2.0 * g_z) * draw(rng, i, 1, z)
    ratio = jnp.mean(_per_example_norm(drift) / (_per_example_norm(kick) + 1e-12))
    return (eps_new, z, noise_new, x0_cur), (ratio, jnp.mean(_per_example_norm(d)))

  (eps, z, noise, x0_last), (ratios, d_norms) = jax.lax.scan(body, (eps0, z0, eps0, x0), jnp.arange(num_steps))
  if move_z:
    x0_last = None  # the M-step evaluates (and differentiates) g at z_K itself
  eps_nc = eps - noise if noise_cancellation else eps
  dim = eps0[0].size
  stats = {
    "estep/eps_nc_norm": jnp.mean(_per_example_norm(eps_nc)) / jnp.sqrt(dim),
    "estep/drift_noise_ratio": jnp.mean(ratios),
    "estep/score_gap_norm": jnp.mean(d_norms) / jnp.sqrt(dim),
    "estep/z_shift": jnp.mean(_per_example_norm(z - z0)) / jnp.sqrt(dim),
  }
  return EStepResult(eps=eps, z=z, eps_nc=eps_nc, noise=noise, x0=x0_last, stats=stats)

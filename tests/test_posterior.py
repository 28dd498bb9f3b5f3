"""Exact Gaussian checks of the posterior machinery, the unfolded sampler, DiffPIR and metrics.

Tolerances: closed forms are checked to float32 round-off. Sampler means are
Monte Carlo estimates (standard error ~0.004 here) of samplers that are
biased for finite step sizes; the tests state the bias they allow and check
that it shrinks the way the theory says.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emd_jax.evaluators import restoration as metrics
from emd_jax.posterior import baselines, unfolded
from emd_jax.posterior import gaussian as gs
from emd_jax.posterior import operators as ops

SHAPE = (4, 4, 1)
D = 16


@pytest.fixture(scope="module")
def problem():
  """A smooth Gaussian prior, an inpainting operator and one noisy measurement."""
  prior = gs.smooth_prior(SHAPE, mean=0.1)
  op = ops.make_operator("inpaint_random", SHAPE, missing=0.5, seed=0)
  a = gs.dense_matrix(op.forward, SHAPE)
  x = prior.sample(jax.random.PRNGKey(0), 1)
  sigma_y = 0.1
  y = op.observe(jax.random.PRNGKey(1), x, sigma_y)
  return prior, op, a, x, y, sigma_y


def _info_form_mean(prior_mean, prior_prec, likelihoods):
  """Mean of N(prior) x prod N(obs; A x, s^2 I) in float64: `[(A, obs, s), ...]`."""
  prec = np.array(prior_prec, np.float64)
  rhs = prec @ np.asarray(prior_mean, np.float64)
  for a, obs, s in likelihoods:
    a = np.asarray(a, np.float64)
    prec = prec + a.T @ a / s**2
    rhs = rhs + a.T @ np.asarray(obs, np.float64).ravel() / s**2
  return np.linalg.solve(prec, rhs), np.linalg.inv(prec)


def test_gaussian_denoiser_and_posterior_closed_forms(problem):
  prior, op, a, x, y, sigma_y = problem
  mu, cov = np.asarray(prior.mean, np.float64), np.asarray(prior.cov, np.float64)
  xt = jax.random.normal(jax.random.PRNGKey(2), (3, *SHAPE))
  sig = jnp.array([0.05, 0.5, 3.0])
  d = prior.denoise(xt, sig)
  for i in range(3):
    ref = mu + cov @ np.linalg.solve(cov + sig[i] ** 2 * np.eye(D), np.asarray(xt[i]).ravel() - mu)
    np.testing.assert_allclose(np.asarray(d[i]).ravel(), ref, atol=1e-4)
  # Kalman-form posterior == information form.
  m_y, c_y = prior.posterior(a, y, sigma_y)
  ref_m, ref_c = _info_form_mean(mu, np.linalg.inv(cov), [(a, y[0], sigma_y)])
  np.testing.assert_allclose(m_y[0], ref_m, atol=2e-4)
  np.testing.assert_allclose(c_y, ref_c, atol=2e-5)
  # The posterior's own denoiser is E[x0 | x_t, y] (x_t = x0 + s n is one more observation).
  s = 0.7
  cond = prior.posterior_denoiser(a, y, sigma_y)(xt[:1], jnp.array([s]))
  ref, _ = _info_form_mean(mu, np.linalg.inv(cov), [(a, y[0], sigma_y), (np.eye(D), xt[0], s)])
  np.testing.assert_allclose(np.asarray(cond).ravel(), ref, atol=2e-4)


@pytest.mark.parametrize(
  "name,kw",
  [
    ("inpaint_random", dict(missing=0.5)),
    ("gaussian_blur", dict(kernel_size=3)),
    ("downsample", dict(factor=2)),
  ],
)
def test_prox_is_the_gaussian_conditional(name, kw):
  """prox(v; y, lam) is the posterior mean under the prior N(v, lam I)."""
  op = ops.make_operator(name, SHAPE, **kw)
  a = gs.dense_matrix(op.forward, SHAPE)
  v = jax.random.normal(jax.random.PRNGKey(3), (2, *SHAPE))
  y = op.observe(jax.random.PRNGKey(4), v[::-1], 0.2)
  lam = 0.3
  m, _ = gs.gaussian_posterior(v.reshape(2, D), lam * jnp.eye(D), a, y, 0.2)
  np.testing.assert_allclose(op.prox(v, y, lam, 0.2).reshape(2, D), m, atol=2e-5)


def test_single_block_without_renoise_is_closed_form(problem):
  """K = 1, t_delta -> 0: the block returns the combined prox (y and x_t likelihoods)."""
  prior, op, a, _, y, sigma_y = problem
  v0 = op.backproject(y)
  xt = jax.random.normal(jax.random.PRNGKey(5), (2, *SHAPE))
  yy = jnp.concatenate([y, y])
  sig_t = jnp.array([0.7, 2.0])  # per-example levels, as in training
  lam = 0.2
  blocks = jax.jit(
    lambda yy, xt, v: unfolded.unfolded_blocks(
      prior.denoise,
      op,
      yy,
      xt,
      sig_t,
      v,
      jax.random.PRNGKey(6),
      jnp.array([lam]),
      jnp.array([1e-4]),
      sigma_y,
    )
  )
  out, per_block = blocks(yy, xt, jnp.concatenate([v0, v0]))
  assert per_block.shape == (1, 2, *SHAPE)
  for i in range(2):
    ref, _ = _info_form_mean(
      np.asarray(v0).ravel(), np.eye(D) / lam, [(a, y[0], sigma_y), (np.eye(D), xt[i], sig_t[i])]
    )
    np.testing.assert_allclose(np.asarray(out[i]).ravel(), ref, atol=2e-3)
  # Without the x_t likelihood, the N = K = 1 sampler is prox(backproject(y)).
  p = {"log_lam": jnp.log(jnp.array([lam])), "log_t_delta": jnp.log(jnp.array([1e-4]))}
  s = jax.jit(
    lambda yy: unfolded.unfolded_sample(
      prior.denoise,
      op,
      yy,
      jax.random.PRNGKey(7),
      p,
      1,
      1,
      sigma_y,
      timesteps=(999,),
      xt_likelihood=False,
    )
  )(y)
  np.testing.assert_allclose(s, op.prox(v0, y, lam, sigma_y), atol=2e-3)


def test_block_chain_mean_approaches_exact_conditional_mean(problem):
  """Many blocks with lam = t_delta^2 = delta: the chain's mean tends to E[x0 | x_t, y].

  LATINO-type splitting is biased by O(delta) (expand the linear recursion of
  the means to first order in delta: its fixed point solves the posterior-mean
  equation). Measured max-abs bias: 0.09 at delta = 0.04, 0.036 at delta = 0.01.
  """
  prior, op, a, x, y, sigma_y = problem
  sig_t = 1.0
  xt = x + sig_t * jax.random.normal(jax.random.PRNGKey(3), x.shape)
  exact = prior.posterior_denoiser(a, y, sigma_y)(xt, jnp.array([sig_t]))[0]
  b, k = 1000, 60
  rep = lambda z: jnp.repeat(z, b, axis=0)

  @jax.jit
  def chain_mean(delta):
    lam = jnp.full((k,), delta)
    out, _ = unfolded.unfolded_blocks(
      prior.denoise,
      op,
      rep(y),
      rep(xt),
      sig_t,
      rep(op.backproject(y)),
      jax.random.PRNGKey(5),
      lam,
      jnp.sqrt(lam),
      sigma_y,
    )
    return out.mean(0)

  err = {d: float(jnp.abs(chain_mean(d) - exact).max()) for d in (0.04, 0.01)}
  assert err[0.01] < 0.06, err
  assert err[0.01] < 0.6 * err[0.04], err


@pytest.mark.parametrize("eta", [0.0, 0.8, 1.0])
def test_ddim_step_preserves_marginals(eta):
  """With the true x0, x_t ~ N(x0, s_t^2) maps to x_s ~ N(x0, s_s^2) for any eta."""
  x0 = jnp.linspace(-1, 1, 8)
  n = 20000
  xt = x0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (n, 8))
  noise = jax.random.normal(jax.random.PRNGKey(1), (n, 8))
  xs = unfolded.ddim_step(xt, jnp.broadcast_to(x0, (n, 8)), 2.0, 0.5, eta, noise)
  np.testing.assert_allclose(xs.mean(0), x0, atol=0.03)
  np.testing.assert_allclose(xs.std(0), 0.5, rtol=0.03)
  if eta == 0.0:
    np.testing.assert_allclose(xs, x0 + 0.25 * (xt - x0), atol=1e-6)
  np.testing.assert_allclose(unfolded.ddim_step(xt, xt * 0, 2.0, 0.0, eta, noise), 0.0)


def test_ddpm_sigmas():
  s = unfolded.ddpm_sigmas([0, 111, 444, 999])
  np.testing.assert_allclose(s[0], np.sqrt(1e-4 / (1 - 1e-4)), rtol=1e-5)
  np.testing.assert_allclose(s[1:], [0.3804, 2.5547, 157.41], rtol=1e-3)


def _recording(denoise):
  """A denoiser that logs every call's sigma (one NFE per call, also under scan/jit)."""
  log = []
  cb = lambda s: log.append(np.asarray(s)[0])

  def fn(x, sigma, labels=None):
    jax.debug.callback(cb, sigma, ordered=True)
    return denoise(x, sigma, labels)

  return fn, log


def test_unfolded_sampler_nfe_and_levels(problem):
  prior, op, _, x, y, sigma_y = problem
  params = unfolded.default_unfolded_params(3, 3)
  den, log = _recording(prior.denoise)
  yb = jnp.concatenate([y, y, y])
  out, aux = jax.jit(
    lambda yy: unfolded.unfolded_sample(den, op, yy, jax.random.PRNGKey(0), params, sigma_y=sigma_y, return_aux=True)
  )(yb)
  jax.effects_barrier()
  assert len(log) == 9  # N * K exactly
  np.testing.assert_allclose(log, np.exp(params["log_t_delta"]), rtol=1e-5)
  assert out.shape == (3, *SHAPE) and aux["x0_hat"].shape == (3, 3, *SHAPE)
  np.testing.assert_allclose(out, aux["x0_hat"][-1])
  assert float(metrics.psnr(out, jnp.repeat(x, 3, 0)).min()) > float(metrics.psnr(yb, x).max())


def test_diffpir_nfe_and_mean(problem):
  """DiffPIR (lambda = 1, zeta = 1) gets closer to the exact posterior mean with more NFE.

  It is not exact for any NFE; measured max-abs mean error on this problem:
  0.15 at 9 NFE, 0.07 at 50, 0.03 at 200 (Monte Carlo se ~0.004).
  """
  prior, op, a, _, y, sigma_y = problem
  den, log = _recording(prior.denoise)
  m_y, _ = prior.posterior(a, y, sigma_y)
  b = 1000
  yb = jnp.repeat(y, b, axis=0)

  def mean_err(nfe, denoise):
    cfg = baselines.DiffPIRConfig(lam=1.0, zeta=1.0, nfe=nfe)
    run = jax.jit(lambda r: baselines.diffpir_sample(denoise, op, yb, r, sigma_y=sigma_y, config=cfg))
    return float(jnp.abs(run(jax.random.PRNGKey(1)).reshape(b, D).mean(0) - m_y[0]).max())

  e9, e100 = mean_err(9, den), mean_err(100, prior.denoise)
  jax.effects_barrier()
  assert len(log) == 9  # one denoiser call per step
  assert e100 < 0.07, (e9, e100)
  assert e100 < 0.7 * e9, (e9, e100)
  zs = baselines.unfolded_zero_shot(prior.denoise, op, yb[:4], jax.random.PRNGKey(2), sigma_y=sigma_y)
  assert zs.shape == (4, *SHAPE) and bool(jnp.all(jnp.isfinite(zs)))


def test_psnr_ssim_sanity():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
  assert bool(jnp.all(jnp.isinf(metrics.psnr(x, x))))
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
  # A +-0.1 perturbation has mse 0.01 exactly: PSNR = 10 log10(2^2 / 0.01) = 26.02 dB.
  signs = jnp.sign(jax.random.normal(jax.random.PRNGKey(1), x.shape))
  np.testing.assert_allclose(metrics.psnr(x + 0.1 * signs, x), 10 * np.log10(400.0), rtol=1e-5)
  np.testing.assert_allclose(
    metrics.psnr((x + 1) / 2, (x + 0.1 * signs + 1) / 2, data_range=1.0),
    10 * np.log10(400.0),
    rtol=1e-5,
  )
  # Constant images: only the luminance term remains, (2ab + C1) / (a^2 + b^2 + C1),
  # with a, b the values shifted to [0, 1] and C1 = (0.01 * 1)^2.
  a, b = 0.6, 0.35
  c1 = 0.01**2
  s = metrics.ssim(jnp.full((1, 16, 16, 1), 2 * a - 1), jnp.full((1, 16, 16, 1), 2 * b - 1))
  np.testing.assert_allclose(s, (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-4)
  s01 = metrics.ssim(jnp.full((1, 16, 16, 1), a), jnp.full((1, 16, 16, 1), b), data_range=1.0)
  np.testing.assert_allclose(s01, s, rtol=1e-5)
  noisy = x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape)
  s1, s2 = metrics.ssim(noisy, x), metrics.ssim(x, noisy)
  np.testing.assert_allclose(s1, s2, rtol=1e-5)
  s01 = metrics.ssim((noisy + 1) / 2, (x + 1) / 2, data_range=1.0)
  np.testing.assert_allclose(s1, s01, rtol=1e-4)
  assert bool(jnp.all(s1 < 0.95)) and bool(jnp.all(metrics.ssim(-x, x) < 0))


def test_unfolded_training_loss_trains_block_parameters(problem):
  """The teacher-forced loss is per example, differentiable, and Adam on (log lam,
  log t_delta) lowers it on a fixed batch from the Gaussian prior."""
  import optax

  prior, op, _, _, _, sigma_y = problem
  x = prior.sample(jax.random.PRNGKey(8), 32)
  rng = jax.random.PRNGKey(9)
  params = unfolded.default_unfolded_params(3, 3)
  tx = optax.adam(0.1)

  def mean_loss(p):
    loss, aux = unfolded.unfolded_training_loss(prior.denoise, op, x, rng, p, sigma_y=sigma_y, weighting="x0")
    return loss.mean(), (loss, aux)

  @jax.jit
  def step(p, s):
    (val, (loss, aux)), g = jax.value_and_grad(mean_loss, has_aux=True)(p)
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s, val, loss, aux

  p, state = params, tx.init(params)
  p, state, first, loss, aux = step(p, state)
  assert loss.shape == (32,) and aux["x0_hat"].shape == x.shape
  grid = unfolded.ddpm_sigmas(unfolded.DEFAULT_TIMESTEPS)
  dist = np.abs(np.asarray(aux["sigma"])[:, None] - grid[None, :]).min(axis=1)
  assert dist.max() < 1e-6 and len(np.unique(np.asarray(aux["sigma"]))) == 3
  for _ in range(10):
    p, state, last, _, _ = step(p, state)
  assert float(last) < 0.9 * float(first)


def test_ddrm_structure(problem):
  """DDRM: NFE count, basis independence (identity blur == identity mask), and noiseless
  data consistency (observed spectral coordinates end exactly at ybar)."""
  prior, _, _, x, _, _ = problem
  ident_blur = ops.CircularBlur(
    jnp.ones((4, 3, 1), jnp.complex64), jnp.ones((1, 1)), SHAPE
  )  # delta kernel: K = 1 at every frequency
  ident_mask = ops.Inpainting(jnp.ones((4, 4, 1)))
  xs = prior.sample(jax.random.PRNGKey(10), 3)
  y = ident_mask.observe(jax.random.PRNGKey(11), xs, 0.1)
  cfg = baselines.DDRMConfig(nfe=6)
  den, log = _recording(prior.denoise)
  run = lambda op, d: jax.jit(
    lambda yy: baselines.ddrm_sample(d, op, yy, jax.random.PRNGKey(12), sigma_y=0.1, config=cfg)
  )(y)
  a = run(ident_blur, den)
  jax.effects_barrier()
  assert len(log) == 6
  np.testing.assert_allclose(a, run(ident_mask, prior.denoise), atol=1e-5)
  for name, kw in [("downsample", dict(factor=2))]:
    op = ops.make_operator(name, SHAPE, **kw)
    y0 = op.forward(x)
    out = jax.jit(
      lambda yy, op=op: baselines.ddrm_sample(prior.denoise, op, yy, jax.random.PRNGKey(3), sigma_y=0.0, config=cfg)
    )(y0)
    np.testing.assert_allclose(op.forward(out), y0, atol=1e-5)


@pytest.mark.slow
def test_ddrm_mean_downsample(problem):
  """DDRM's mean approaches the posterior mean for downsampling (measured max-abs error
  0.063 at 20 NFE, 0.013 at 100). Not for blur: coordinates with sigma_y / s far above
  the step's level get the same noisy ybar injected at every step, and that bias grows
  with NFE (measured 0.07 -> 0.14), a property of DDRM, not of this code."""
  prior, _, _, x, _, sigma_y = problem
  op = ops.make_operator("downsample", SHAPE, factor=2)
  a = gs.dense_matrix(op.forward, SHAPE)
  y = op.observe(jax.random.PRNGKey(1), x, sigma_y)
  m_y, _ = prior.posterior(a, y, sigma_y)
  b = 2000
  yb = jnp.repeat(y, b, axis=0)

  def err(nfe):
    cfg = baselines.DDRMConfig(nfe=nfe)
    out = jax.jit(lambda r: baselines.ddrm_sample(prior.denoise, op, yb, r, sigma_y=sigma_y, config=cfg))(
      jax.random.PRNGKey(2)
    )
    return float(jnp.abs(out.reshape(b, D).mean(0) - m_y[0]).max())

  e20, e100 = err(20), err(100)
  assert e100 < 0.03 and e100 < 0.5 * e20, (e20, e100)

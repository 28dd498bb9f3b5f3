"""Equivalences between methods (ALGORITHMS.md sections 4-6), checked on gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_models import gaussian_denoiser_apply, linear_generator_marginal
from helpers import flat

from emd_jax.diffusion import denoise_xt
from emd_jax.distill import distances
from emd_jax.distill.estep import langevin_estep
from emd_jax.distill.losses import LossSpec, emd_direction, generator_loss
from emd_jax.nets.mlp import MLPDenoiser

B, D = 32, 3


@pytest.fixture(scope="module")
def problem():
  """A small MLP generator and two different MLP denoisers (teacher, fake)."""
  net = MLPDenoiser(dim=D, hidden=16, depth=1, emb_dim=8)
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jnp.zeros((1, D))
  init = lambda k: net.init(k, x, jnp.ones((1,)))["params"]  # noqa: E731
  gen_p, teacher_p, fake_p = init(keys[0]), init(keys[1]), init(keys[2])
  apply = lambda p, xx, s, lab=None: net.apply({"params": p}, xx, s, lab)  # noqa: E731
  z = 2.5 * jax.random.normal(keys[3], (B, D))
  eps = jax.random.normal(keys[4], (B, D))
  sigma = jnp.exp(jax.random.normal(keys[5], (B,)) - 0.5)
  alpha = 1.0 / jnp.sqrt(1.0 + sigma**2)  # VP, so alpha is not 1
  sigma_t = sigma * alpha
  return dict(
    apply=apply,
    gen_p=gen_p,
    z=z,
    eps=eps,
    alpha=alpha,
    sigma=sigma_t,
    teacher=lambda xx, s, lab=None: apply(teacher_p, xx, s),
    fake=lambda xx, s, lab=None: apply(fake_p, xx, s),
  )


def _grad(pb, spec, estep=None, gamma_eps=0.0, num_estep=0, eps=None):
  def loss_of_params(p):
    x0 = pb["apply"](p, pb["z"], jnp.full((B,), 2.5))
    return generator_loss(
      spec,
      x0,
      teacher_fn=pb["teacher"],
      fake_fn=pb["fake"],
      alpha=pb["alpha"],
      sigma=pb["sigma"],
      eps=pb["eps"] if eps is None else eps,
      estep=estep,
      gamma_eps=gamma_eps,
      num_estep=num_estep,
    )[0]

  return jax.grad(loss_of_params)(pb["gen_p"])


def _estep_k1(pb, gamma):
  x0 = pb["apply"](pb["gen_p"], pb["z"], jnp.full((B,), 2.5))
  return langevin_estep(
    jax.random.PRNGKey(7),
    pb["eps"],
    pb["z"],
    None,
    pb["teacher"],
    pb["fake"],
    pb["alpha"],
    pb["sigma"],
    num_steps=1,
    gamma_eps=gamma,
    gamma_z=0.0,
    x0=x0,
  )


def test_emd_k1_equals_gamma_times_diff_instruct(problem):
  """EMD (K=1, NC, gamma_z=0) with w = sigma^2/alpha^2 == gamma_eps x Diff-Instruct (unit weight)."""
  gamma = 0.3
  est = _estep_k1(problem, gamma)
  g_emd = _grad(problem, LossSpec("emd", "linear", "sigma2"), est, gamma, 1)
  g_di = _grad(problem, LossSpec("di", "linear", "one"))
  a, b = flat(g_emd), gamma * flat(g_di)
  assert float(jnp.linalg.norm(b)) > 1e-3
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7 * float(jnp.abs(b).max()) + 1e-9)
  # And with the EMD weight w = 1 the two differ by the score-unit factor alpha^2 / sigma^2.
  g_emd_one = _grad(problem, LossSpec("emd", "linear", "one"), est, gamma, 1)
  g_di_inv = _grad(problem, LossSpec("di", "linear", "inv_sigma2"))
  np.testing.assert_allclose(flat(g_emd_one), gamma * flat(g_di_inv), rtol=1e-4, atol=1e-6)


def test_sim_l2_equals_sid_with_alpha_one(problem):
  """SIM with d = ||y||^2 (d' = 2y) is twice SiD's loss at alpha = 1, gradients included."""
  g_sim = _grad(problem, LossSpec("sim", "l2"))
  g_sid = _grad(problem, LossSpec("sid", "l2", sid_alpha=1.0))
  np.testing.assert_allclose(flat(g_sim), 2.0 * flat(g_sid), rtol=1e-5, atol=1e-7)
  g_sid12 = _grad(problem, LossSpec("sid", "l2", sid_alpha=1.2))
  assert float(jnp.linalg.norm(flat(g_sid12) - flat(g_sid))) > 1e-4  # alpha matters


def test_pseudo_huber_tends_to_l2_over_c(problem):
  """d'_PH(y) = y / sqrt(|y|^2 + c^2) -> y / c = d'_L2(y) / (2c) as c grows."""
  y = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
  for c in (1e2, 1e4):
    np.testing.assert_allclose(c * distances.direction("pseudo_huber", y, c=c), y, rtol=1e-3 if c == 1e2 else 1e-7)
  huge = 1e4 / np.sqrt(D)  # LossSpec's huber_c is per sqrt(dimension)
  g_ph = _grad(problem, LossSpec("sim", "pseudo_huber", huber_c=huge))
  g_l2 = _grad(problem, LossSpec("sim", "l2"))
  np.testing.assert_allclose(1e4 * flat(g_ph), 0.5 * flat(g_l2), rtol=2e-3, atol=1e-6)


def test_default_loss_at_k1_is_pseudo_huber_diff_instruct_direction(problem):
  """EMD + pseudo-Huber at K = 1: v = D_T - D_psi exactly, direction d'(D_T - D_psi)."""
  gamma = 0.25
  est = _estep_k1(problem, gamma)
  spec = LossSpec("emd", "pseudo_huber", "one", huber_c=0.03)
  c = emd_direction(spec, est, problem["alpha"], problem["sigma"], gamma, 1)
  x0 = problem["apply"](problem["gen_p"], problem["z"], jnp.full((B,), 2.5))
  x_t = problem["alpha"][:, None] * x0 + problem["sigma"][:, None] * problem["eps"]
  gap = denoise_xt(problem["teacher"], x_t, problem["alpha"], problem["sigma"]) - denoise_xt(
    problem["fake"], x_t, problem["alpha"], problem["sigma"]
  )
  expected = distances.direction("pseudo_huber", gap, c=0.03 * np.sqrt(D))
  np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-6)
  # With d' = identity, v is EMD's linear direction (alpha/sigma) eps_nc up to the per-noise-level
  # constant (alpha/sigma)^2 (1 - (1-g)^K).
  lin = emd_direction(LossSpec("emd", "linear"), est, problem["alpha"], problem["sigma"], gamma, 1)
  scale = (problem["sigma"] / problem["alpha"])[:, None] ** 2 / gamma
  np.testing.assert_allclose(lin * scale, gap, rtol=1e-4, atol=1e-6)


def test_emd_normalised_direction_is_k_invariant_for_constant_drift():
  """v = (sigma/alpha) eps_nc / (1 - (1-g)^K) is the same for any K when d is constant."""
  shift = jnp.array([0.2, -0.1, 0.05])
  teacher = lambda x, s, lab=None: 0.5 * x + shift  # noqa: E731
  fake = lambda x, s, lab=None: 0.5 * x  # noqa: E731
  eps0 = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  z0 = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
  alpha, sigma = jnp.full((8,), 0.9), jnp.full((8,), 0.4)
  spec = LossSpec("emd", "pseudo_huber", huber_c=0.1)
  outs = []
  for k, g in [(1, 0.5), (4, 0.2), (16, 0.05)]:
    est = langevin_estep(
      jax.random.PRNGKey(k), eps0, z0, None, teacher, fake, alpha, sigma, num_steps=k, gamma_eps=g, x0=z0
    )
    outs.append(emd_direction(spec, est, alpha, sigma, g, k))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4)
  np.testing.assert_allclose(outs[0], outs[2], rtol=1e-4)


@pytest.mark.parametrize("name", ["l2", "power", "pseudo_huber", "huber", "l1"])
def test_directions_are_gradients_of_distances(name):
  y = jax.random.normal(jax.random.PRNGKey(3), (3, 4)) * 0.3
  auto = jax.grad(lambda v: jnp.sum(distances.distance(name, v, c=0.5, power=4, delta=0.2)))(y)
  np.testing.assert_allclose(distances.direction(name, y, c=0.5, power=4, delta=0.2), auto, rtol=1e-5, atol=1e-6)


def test_dmd_is_diff_instruct_divided_per_example_by_mean_abs_error(problem):
  """DMD's dL/dx0 is Diff-Instruct's divided, example by example, by mean_j |x0 - D_T(x_t)|_j over that
  example's dimensions (ALGORITHMS.md section 5); the parameter gradients follow through one VJP."""
  pb = problem
  x0, vjp = jax.vjp(lambda p: pb["apply"](p, pb["z"], jnp.full((B,), 2.5)), pb["gen_p"])
  a, s = pb["alpha"][:, None], pb["sigma"][:, None]
  d_t = pb["teacher"]((a * x0 + s * pb["eps"]) / a, pb["sigma"] / pb["alpha"])
  norm = np.mean(np.abs(np.asarray(x0 - d_t)), axis=-1)  # [B]
  assert norm.std() > 0.1 * norm.mean()  # one batch-wide normaliser would not pass

  def dloss_dx0(spec):
    kw = dict(teacher_fn=pb["teacher"], fake_fn=pb["fake"], alpha=pb["alpha"], sigma=pb["sigma"], eps=pb["eps"])
    return jax.grad(lambda x: generator_loss(spec, x, **kw)[0])(x0)

  g_di, g_dmd = dloss_dx0(LossSpec("di", "linear", "one")), dloss_dx0(LossSpec("dmd", "linear", "one"))
  assert float(jnp.abs(g_di).max()) > 1e-4
  np.testing.assert_allclose(g_dmd, g_di / norm[:, None], rtol=1e-5, atol=1e-7 * float(jnp.abs(g_dmd).max()))
  (expected,) = vjp(jnp.asarray(g_di / norm[:, None]))
  expected = flat(expected)
  got = flat(_grad(pb, LossSpec("dmd", "linear", "one")))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


# ----------------------------------------------------------------------------
# SIM and SiD against their definitions on a linear-Gaussian problem: a linear generator
# x0 = A z + b, a Gaussian teacher and a Gaussian fake denoiser (the generator's marginal at the
# initial A, b, held fixed as the fake's parameters are). The reference writes each loss from
# ALGORITHMS.md section 5 with the posterior means in x_t space, E[x0 | x_t] = m + alpha C
# (alpha^2 C + sigma^2 I)^-1 (x_t - alpha m), d' by autodiff of d, and differentiates it with
# jax.grad: no project loss, direction or denoise code on that side.

LG_B, LG_D, LG_SIGMA_Z = 64, 3, 2.5


@pytest.fixture(scope="module")
def linear_gaussian():
  ks = jax.random.split(jax.random.PRNGKey(11), 6)
  theta = {
    "a": jnp.eye(LG_D) * 0.3 + 0.1 * jax.random.normal(ks[0], (LG_D, LG_D)),
    "b": 0.2 * jax.random.normal(ks[1], (LG_D,)),
  }
  root = jax.random.normal(ks[2], (LG_D, LG_D))
  teacher_p = {"mean": jnp.array([0.4, -0.2, 0.1]), "cov": 0.1 * root @ root.T + 0.2 * jnp.eye(LG_D)}
  fake_p = linear_generator_marginal(theta["a"], theta["b"], LG_SIGMA_Z)
  sigma_edm = jnp.exp(jax.random.normal(ks[3], (LG_B,)) - 0.5)
  alpha = 1.0 / jnp.sqrt(1.0 + sigma_edm**2)  # VP: alpha far from 1 at large sigma
  return dict(
    theta=theta,
    teacher_p=teacher_p,
    fake_p=fake_p,
    z=LG_SIGMA_Z * jax.random.normal(ks[4], (LG_B, LG_D)),
    eps=jax.random.normal(ks[5], (LG_B, LG_D)),
    alpha=alpha,
    sigma=sigma_edm * alpha,
  )


def _posterior_mean_xt(p, x_t, alpha, sigma):
  """E[x0 | x_t] for x0 ~ N(m, C), x_t = alpha x0 + sigma eps; x_t [B, D], alpha, sigma [B]."""
  m, c = p["mean"], p["cov"]
  cov_xt = alpha[:, None, None] ** 2 * c[None] + sigma[:, None, None] ** 2 * jnp.eye(m.shape[0])[None]
  resid = x_t - alpha[:, None] * m
  return m + alpha[:, None] * jnp.einsum("ij,bj->bi", c, jnp.linalg.solve(cov_xt, resid[..., None])[..., 0])


def _reference_loss(kind, lg, theta, c=0.0, sid_alpha=1.0, stop_xt=False):
  """Mean over the batch of SIM's / SiD's per-example loss, from the definitions."""
  x0 = lg["z"] @ theta["a"].T + theta["b"]
  x_t = lg["alpha"][:, None] * x0 + lg["sigma"][:, None] * lg["eps"]
  x_in = jax.lax.stop_gradient(x_t) if stop_xt else x_t  # only for the power check below
  d_f = _posterior_mean_xt(lg["fake_p"], x_in, lg["alpha"], lg["sigma"])
  d_t = _posterior_mean_xt(lg["teacher_p"], x_in, lg["alpha"], lg["sigma"])
  y = d_f - d_t
  if kind == "sid":  # (1 - alpha) ||D_T - D_psi||^2 + <D_T - D_psi, D_psi - x0>
    per = (1 - sid_alpha) * jnp.sum(y**2, -1) + jnp.sum((d_t - d_f) * (d_f - x0), -1)
  else:
    dist = {"l2": lambda v: jnp.sum(v**2), "pseudo_huber": lambda v: jnp.sqrt(jnp.sum(v**2) + c**2) - c}[kind]
    per = -jnp.sum(jax.vmap(jax.grad(dist))(y) * (d_f - x0), -1)  # - <d'(y), D_psi - x0>
  return jnp.mean(per)


def _project_grad(spec, lg):
  def loss(theta):
    x0 = lg["z"] @ theta["a"].T + theta["b"]
    return generator_loss(
      spec,
      x0,
      teacher_fn=lambda x, s, lab=None: gaussian_denoiser_apply(lg["teacher_p"], x, s),
      fake_fn=lambda x, s, lab=None: gaussian_denoiser_apply(lg["fake_p"], x, s),
      alpha=lg["alpha"],
      sigma=lg["sigma"],
      eps=lg["eps"],
    )[0]

  return jax.grad(loss)(lg["theta"])


@pytest.mark.parametrize(
  "spec, kind, kw",
  [
    (LossSpec("sim", "pseudo_huber", huber_c=0.03), "pseudo_huber", dict(c=0.03 * np.sqrt(LG_D))),
    (LossSpec("sim", "pseudo_huber", huber_c=1.0), "pseudo_huber", dict(c=np.sqrt(LG_D))),
    (LossSpec("sim", "l2"), "l2", {}),
    (LossSpec("sid", "l2", sid_alpha=1.2), "sid", dict(sid_alpha=1.2)),
    (LossSpec("sid", "l2", sid_alpha=1.0), "sid", dict(sid_alpha=1.0)),
  ],
  ids=["sim_ph_c0.03", "sim_ph_c1", "sim_l2", "sid_1.2", "sid_1.0"],
)
def test_sim_and_sid_gradients_match_their_definitions(linear_gaussian, spec, kind, kw):
  lg = linear_gaussian
  expected = flat(jax.jit(jax.grad(lambda t: _reference_loss(kind, lg, t, **kw)))(lg["theta"]))
  got = flat(jax.jit(lambda: _project_grad(spec, lg))())
  scale = np.abs(expected).max()
  assert scale > 1e-2
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)
  # Power: the gradient through x_t into the denoisers' inputs is a large part of the answer.
  no_input_grad = flat(jax.jit(jax.grad(lambda t: _reference_loss(kind, lg, t, stop_xt=True, **kw)))(lg["theta"]))
  assert np.abs(no_input_grad - expected).max() > 0.05 * scale


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="loss.name: unknown loss"):
    LossSpec("foo")
  with pytest.raises(ValueError, match="loss.distance: unknown distance"):
    LossSpec("sim", "cosine")
  with pytest.raises(ValueError, match="even"):
    distances.direction("power", jnp.ones((1, 2)), power=3)


def test_emd_simloss_k1_is_sim_at_one_langevin_step(problem):
  """SIM's loss at E-step samples, K = 1: SIM's gradient (written out here) at the noise of one
  hand-computed Langevin step eps_1 = (1 - g) eps_0 + g d(eps_0) + sqrt(2 g) n."""
  gamma, c = 0.3, 0.03 * np.sqrt(D)
  pb = problem
  est = _estep_k1(pb, gamma)
  a, s = pb["alpha"][:, None], pb["sigma"][:, None]
  x0 = pb["apply"](pb["gen_p"], pb["z"], jnp.full((B,), 2.5))
  # The step by hand: the drift from both denoisers at the start, the injected noise recovered
  # from the tracked noise N_1 = (1 - g) eps_0 + sqrt(2 g) n.
  x_t0 = a * x0 + s * pb["eps"]
  d0 = (a / s) * (
    denoise_xt(pb["teacher"], x_t0, pb["alpha"], pb["sigma"]) - denoise_xt(pb["fake"], x_t0, pb["alpha"], pb["sigma"])
  )
  n = (est.noise - (1 - gamma) * pb["eps"]) / np.sqrt(2 * gamma)
  assert abs(float(jnp.std(n)) - 1.0) < 0.3  # the recovered kick is unit Gaussian noise
  eps1 = (1 - gamma) * pb["eps"] + gamma * d0 + np.sqrt(2 * gamma) * n
  np.testing.assert_allclose(est.eps, eps1, rtol=1e-5, atol=1e-6)

  def sim_by_hand(p):
    x = pb["apply"](p, pb["z"], jnp.full((B,), 2.5))
    xt = a * x + s * eps1
    d_f = pb["fake"](xt / a, pb["sigma"] / pb["alpha"])
    d_t = pb["teacher"](xt / a, pb["sigma"] / pb["alpha"])
    y = d_f - d_t
    direction = y / jnp.sqrt(jnp.sum(y**2, axis=-1, keepdims=True) + c**2)
    return jnp.mean(-jnp.sum(direction * (d_f - x), axis=-1))

  expected = flat(jax.grad(sim_by_hand)(pb["gen_p"]))
  got = flat(_grad(pb, LossSpec("sim", "pseudo_huber", huber_c=0.03), est, gamma, 1, eps=est.eps))
  assert float(jnp.linalg.norm(expected)) > 1e-4
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * float(jnp.abs(expected).max()))
  # The chain moved the noise: SIM at the drawn eps_0 is a different gradient.
  at_eps0 = flat(_grad(pb, LossSpec("sim", "pseudo_huber", huber_c=0.03)))
  assert float(jnp.linalg.norm(at_eps0 - got)) > 1e-3 * float(jnp.linalg.norm(got))

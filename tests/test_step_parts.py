"""Each part of the distillation step alone, against an independent computation (emd_jax/distill/step.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from gaussian_models import gaussian_denoiser_apply

from emd_jax.diffusion import NoiseDist, edm_loss_weight
from emd_jax.distill import step as step_lib
from emd_jax.distill.fake_score import dsm_loss_and_grad
from emd_jax.distill.losses import LossSpec
from emd_jax.distill.state import create_state

DIM = 3
TEACHER = {"mean": jnp.array([0.3, -0.1, 0.2]), "cov": jnp.diag(jnp.array([0.4, 0.2, 0.1]))}


def linear_apply(params, x, sigma, labels=None):
  """A linear 'denoiser' `x A + b` that ignores sigma: as generator `g(z) = z A + b` `[B, D]`."""
  del sigma, labels
  return x @ params["A"] + params["b"]


def teacher_apply(params, x, sigma, labels=None):
  return gaussian_denoiser_apply(params, x, sigma)


def linear_params(seed, scale=0.3):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"A": jnp.eye(DIM) + scale * jax.random.normal(k1, (DIM, DIM)), "b": scale * jax.random.normal(k2, (DIM,))}


def config(**kw):
  base = dict(
    batch_size=8,
    data_shape=(DIM,),
    sigma_init=1.5,
    gen_noise=NoiseDist("lognormal", -0.5, 1.0),
    fake_noise=NoiseDist("lognormal", -0.5, 1.0),
    loss=LossSpec("sim", "l2", "one"),
  )
  return step_lib.StepConfig(**{**base, **kw})


NETS = step_lib.Nets.build("none", linear_apply, teacher_apply)


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _halves(d: step_lib.Draws, n: int):
  """The two strided halves of `d` (even and odd examples) by plain indexing (independent of
  `step.micro_batch`); `n` is the half size."""
  out = []
  for sl in (slice(0, 2 * n, 2), slice(1, 2 * n, 2)):
    out.append(
      d._replace(
        **{
          k: (v[:, sl] if k.startswith("fake_") or k == "sim_noise" else v[sl])
          for k, v in d._asdict().items()
          if v is not None
        }
      )
    )
  return out


def test_draw_randomness_shapes_and_shared_first_fake_batch():
  cfg = config(batch_size=4, num_classes=5, fake_steps=3)
  d = step_lib.draw_randomness(cfg, jax.random.key(0))
  assert d.z.shape == d.eps.shape == (4, DIM)
  assert d.labels.shape == (4, 5)
  np.testing.assert_array_equal(np.sum(np.asarray(d.labels), axis=-1), 1.0)  # one-hot
  assert d.sigma.shape == (4,) and bool(jnp.all(d.sigma > 0))
  assert d.chain_keys.shape == (4,)
  assert d.fake_z.shape == d.fake_noise.shape == (3, 4, DIM) and d.fake_sigma.shape == (3, 4)
  np.testing.assert_array_equal(d.fake_z[0], d.z)  # the first fake update trains on g(z)
  assert not np.allclose(d.fake_z[1], d.z) and not np.allclose(d.fake_z[1], d.fake_z[2])
  # Scaled by sigma_init: the latents' spread is about 1.5, the noises' about 1.
  assert 1.0 < float(jnp.std(d.fake_z)) < 2.2 and 0.6 < float(jnp.std(d.fake_noise)) < 1.5
  # The same key draws the same randomness; another key does not.
  again = step_lib.draw_randomness(cfg, jax.random.key(0))
  assert _leaves_equal(d._replace(chain_keys=None), again._replace(chain_keys=None))
  np.testing.assert_array_equal(jax.random.key_data(d.chain_keys), jax.random.key_data(again.chain_keys))
  assert len({tuple(np.asarray(k)) for k in jax.random.key_data(d.chain_keys)}) == 4  # one key per chain
  other = step_lib.draw_randomness(cfg, jax.random.key(1))
  assert not np.allclose(other.z, d.z)
  unconditional = step_lib.draw_randomness(config(), jax.random.key(0))
  assert unconditional.labels is None and unconditional.fake_z.shape == (1, 8, DIM)


def _hand_adam(params, grads, lr, b1, b2, eps):
  """One Adam step from zero moments, written out: m = (1-b1) g, v = (1-b2) g^2, bias-corrected."""

  def leaf(p, g):
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g**2 / (1 - b2)
    return p - lr * m_hat / (jnp.sqrt(v_hat) + eps)

  return jax.tree.map(leaf, params, grads)


def test_fake_update_is_one_adam_step_on_the_dsm_gradient():
  cfg = config()
  gen, fake = linear_params(0), linear_params(1)
  tx = optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-8)
  d = step_lib.draw_randomness(cfg, jax.random.key(3))
  new, opt_state, stats = step_lib.fake_update(cfg, NETS, tx, gen, fake, tx.init(fake), d)
  # Independently: the generator's samples, the DSM gradient, Adam by hand.
  x = d.z @ gen["A"] + gen["b"]
  loss, grads = dsm_loss_and_grad(linear_apply, fake, x, d.fake_sigma[0], d.fake_noise[0], None, cfg.sigma_data)
  _close(new, _hand_adam(fake, grads, 1e-2, 0.9, 0.99, 1e-8))
  np.testing.assert_allclose(stats.loss, [loss], rtol=1e-6)
  np.testing.assert_allclose(stats.grad_norm, [optax.global_norm(grads)], rtol=1e-6)
  assert stats.ok.tolist() == [True]
  # The DSM loss itself, written out: EDM weight times the mean squared denoising error.
  x_t = x + d.fake_sigma[0][:, None] * d.fake_noise[0]
  err = jnp.mean((x_t @ fake["A"] + fake["b"] - x) ** 2, axis=-1)
  np.testing.assert_allclose(loss, jnp.mean(edm_loss_weight(d.fake_sigma[0], cfg.sigma_data) * err), rtol=1e-5)
  # A given x0 is the first update's batch (no second generator pass): g(z) gives the same update,
  # anything else a different one.
  same, _, _ = step_lib.fake_update(cfg, NETS, tx, gen, fake, tx.init(fake), d, x0=x)
  _close(same, new)
  moved, _, _ = step_lib.fake_update(cfg, NETS, tx, gen, fake, tx.init(fake), d, x0=x + 1.0)
  assert not np.allclose(moved["b"], new["b"])


def test_fake_update_unrolled_and_scanned_agree_and_chain_their_updates():
  gen, fake = linear_params(0), linear_params(1)
  tx = optax.adam(1e-2)
  cfg_u = config(fake_steps=3, fake_loop="unroll")
  d = step_lib.draw_randomness(cfg_u, jax.random.key(4))
  pu, _, su = step_lib.fake_update(cfg_u, NETS, tx, gen, fake, tx.init(fake), d)
  ps, _, ss = step_lib.fake_update(config(fake_steps=3, fake_loop="scan"), NETS, tx, gen, fake, tx.init(fake), d)
  _close(pu, ps)
  _close(su, ss)
  assert su.loss.shape == (3,)
  # Update s trains on g(fake_z[s]) starting where update s-1 left off.
  p, opt = fake, tx.init(fake)
  for s in range(3):
    x = d.fake_z[s] @ gen["A"] + gen["b"]
    _, g = dsm_loss_and_grad(linear_apply, p, x, d.fake_sigma[s], d.fake_noise[s], None, 0.5)
    u, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, u)
  _close(pu, p)


def test_accumulate_is_the_mean_over_the_two_halves():
  """Gradients (not parameters after Adam) of the M-step with an E-step: the per-example chain keys
  and noises must follow their examples into the micro-batches."""
  cfg = config(loss=LossSpec("emd", "linear", "sigma2"), estep_steps=2, gamma_z=0.05, gamma_z_scaling="sigma2")
  gen, fake = linear_params(0), linear_params(1)
  d = step_lib.draw_randomness(cfg, jax.random.key(5))

  def fn(part):
    return step_lib.generator_grads(cfg, NETS, gen, fake, TEACHER, part)

  loss, grads, metrics = step_lib.accumulate(fn, d, 2)
  (l0, g0, m0), (l1, g1, m1) = (fn(h) for h in _halves(d, 4))
  np.testing.assert_allclose(loss, (l0 + l1) / 2, rtol=1e-5)
  _close(grads, jax.tree.map(lambda a, b: (a + b) / 2, g0, g1))
  _close(metrics, jax.tree.map(lambda a, b: (a + b) / 2, m0, m1))
  # The halves differ (so the mean is not trivially either one), and the full batch at once is the
  # same mean: every loss here is a mean over examples.
  assert not np.allclose(g0["A"], g1["A"])
  _, g_full, _ = fn(d)
  _close(grads, g_full, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="not a multiple"):
    step_lib.accumulate(fn, d, 3)


def test_generator_grads_di_is_the_closed_form_direction_through_a_linear_generator():
  """Diff-Instruct at K = 0, VE, w = 1: loss = -mean_b <c_b, g(z_b)> with c = D_T(x_t) - D_psi(x_t) fixed,
  x_t = g(z) + sigma eps; for g(z) = z A + b that is dL/dA = -mean_b z_b c_b^T, dL/db = -mean_b c_b."""
  cfg = config(loss=LossSpec("di", "linear", "one"))
  gen, fake = linear_params(0), linear_params(1)
  d = step_lib.draw_randomness(cfg, jax.random.key(6))
  loss, grads, metrics = step_lib.generator_grads(cfg, NETS, gen, fake, TEACHER, d)

  z, eps, sig = (np.asarray(v, np.float64) for v in (d.z, d.eps, d.sigma))
  a, b = np.asarray(gen["A"], np.float64), np.asarray(gen["b"], np.float64)
  x0 = z @ a + b
  x_t = x0 + sig[:, None] * eps
  m, cov = np.asarray(TEACHER["mean"], np.float64), np.asarray(TEACHER["cov"], np.float64)
  d_t = np.stack([m + cov @ np.linalg.solve(cov + s**2 * np.eye(DIM), xt - m) for xt, s in zip(x_t, sig, strict=True)])
  d_f = x_t @ np.asarray(fake["A"], np.float64) + np.asarray(fake["b"], np.float64)
  c = d_t - d_f
  np.testing.assert_allclose(grads["A"], -(z.T @ c) / len(z), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["b"], -np.mean(c, axis=0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(loss, -np.mean(np.sum(c * x0, axis=-1)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["loss/score_gap"], np.mean(np.linalg.norm(c, axis=-1)), rtol=1e-4)
  # The reused VJP of train_step's generator pass gives the same gradient.
  x0_j, vjp = jax.vjp(lambda p: step_lib.generate(cfg, NETS, p, d.z, d), gen)
  _, grads_vjp, _ = step_lib.generator_grads(cfg, NETS, gen, fake, TEACHER, d, x0_j, vjp)
  _close(grads_vjp, grads)


def _leaves_equal(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_guard_keeps_the_whole_state_on_a_nan_and_counts_it():
  cfg = config(ema_decay=0.9)
  txs = step_lib.Txs(optax.adam(1e-2), optax.adam(1e-2))
  state = create_state(jax.random.PRNGKey(0), linear_params(0), txs.gen, txs.fake)
  step = jax.jit(lambda s, t: step_lib.train_step(cfg, NETS, txs, s, t))
  nan_teacher = {"mean": TEACHER["mean"] * jnp.nan, "cov": TEACHER["cov"]}
  # A NaN teacher leaves the fake update finite but the generator's gradient not: nothing is kept,
  # not even the (finite) fake update.
  after, m = step(state, nan_teacher)
  assert int(m["nonfinite/skipped"]) == 1 and int(m["nonfinite/streak"]) == 1 and int(m["nonfinite/total"]) == 1
  assert int(after.step) == 1 and int(after.nonfinite_count) == 1 and int(after.nonfinite_streak) == 1
  assert bool(jnp.isfinite(m["loss/fake_dsm"])) and not bool(jnp.isfinite(m["loss/generator"]))
  for field in ("gen_params", "gen_opt_state", "gen_ema", "fake_params", "fake_opt_state", "rng"):
    assert _leaves_equal(getattr(state, field), getattr(after, field)), field
  # A healthy step after it updates everything and resets the streak, not the total.
  healthy, m = step(after, TEACHER)
  assert int(m["nonfinite/skipped"]) == 0 and int(healthy.nonfinite_streak) == 0 and int(healthy.nonfinite_count) == 1
  assert int(healthy.step) == 2
  for field in ("gen_params", "gen_ema", "fake_params"):
    assert not _leaves_equal(getattr(after, field), getattr(healthy, field)), field
  # The EMA after one accepted update: d * initial + (1 - d) * new.
  _close(healthy.gen_ema, jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.gen_ema, healthy.gen_params))

"""The adversarial term on real data (distill/adversarial.py): closed forms, gradient routing, off = today's
step, end-to-end resume with the real-data iterator, sharded == single device, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
  assert_trees_close,
  assert_trees_equal,
  flat,
  gmm_tiny,
  init_student_params,
  recording_optimizer,
  rel_err,
  trees_equal,
)

from emd_jax.config.validation import ConfigError
from emd_jax.distill import adversarial, methods
from emd_jax.distill import step as step_lib
from emd_jax.distill.adversarial import AdvSpec
from emd_jax.jobs import distill
from emd_jax.runtime import parallel
from emd_jax.teachers import gmm

# ----------------------------------------------------------------------------
# (a) Closed forms on two 2-D Gaussians: real N(mu_r, v_r I), fake N(mu_f, v_f I), both noised at sigma.

MU_R, V_R = jnp.array([0.5, -0.3]), 0.2**2
MU_F, V_F = jnp.array([-0.4, 0.6]), 0.5**2
SIGMA = 0.3
N = 200_000


def log_normal(x, mu, v):
  d = x.shape[-1]
  return -0.5 * jnp.sum((x - mu) ** 2, -1) / v - 0.5 * d * jnp.log(2 * jnp.pi * v)


def optimal_logit(x, sigma, labels=None):
  """log p_real,sigma(x) - log p_fake,sigma(x): the noised densities are N(mu, (v + sigma^2) I)."""
  s2 = jnp.reshape(sigma, (-1,)) ** 2
  return log_normal(x, MU_R, V_R + s2) - log_normal(x, MU_F, V_F + s2)


def optimal_logit_grad(x, sigma):
  s2 = sigma**2
  return -(x - MU_R) / (V_R + s2) + (x - MU_F) / (V_F + s2)


def gaussian_batches(key):
  k = jax.random.split(key, 4)
  real = MU_R + jnp.sqrt(V_R) * jax.random.normal(k[0], (N, 2))
  fake = MU_F + jnp.sqrt(V_F) * jax.random.normal(k[1], (N, 2))
  return real, jax.random.normal(k[2], (N, 2)), fake, jax.random.normal(k[3], (N, 2))


def test_optimal_logit_minimises_the_discriminator_loss():
  """The non-saturating discriminator loss is minimised pointwise by D = log p_real / p_fake (at the
  noised densities): there its gradient in an offset c and a scale a of the logit vanishes, and every
  perturbation costs more. A sign flip, a swapped real/fake or noise applied to the wrong input fails."""
  real, n_real, fake, n_fake = gaussian_batches(jax.random.PRNGKey(0))
  s = jnp.full((N,), SIGMA)
  spec = AdvSpec(gen_weight=1.0, disc_weight=1.0)

  def loss(c, a):
    fn = lambda x, sg, lab: a * optimal_logit(x, sg) + c  # noqa: E731
    return adversarial.disc_objective(spec, fn, real, None, s, n_real, fake, None, s, n_fake)[0]

  g = jax.grad(loss, argnums=(0, 1))(0.0, 1.0)
  assert abs(float(g[0])) < 4e-3 and abs(float(g[1])) < 1e-2, g
  g_wrong = jax.grad(loss)(0.5, 1.0)  # a wrong offset has a clearly non-zero gradient
  assert abs(float(g_wrong)) > 0.03
  best = float(loss(0.0, 1.0))
  for c, a in [(0.3, 1.0), (-0.3, 1.0), (0.0, 0.7), (0.0, 1.3)]:
    assert float(loss(c, a)) > best + 1e-3, (c, a)
  # Without noise the real batch at the noised optimum is mis-scored (the noise enters the loss).
  fn0 = lambda x, sg, lab: optimal_logit(x, sg)  # noqa: E731
  clean = adversarial.disc_objective(spec, fn0, real, None, s, 0 * n_real, fake, None, s, 0 * n_fake)[0]
  assert abs(float(clean) - best) > 1e-3


def test_generator_term_gradient_and_r1_are_the_analytic_ones():
  """d/dx0 of gen_weight * mean softplus(-D(x0 + sigma n)) = -gen_weight sigmoid(-D(x_t)) grad D(x_t) / B,
  and R1 = mean ||grad_x D(real_t)||^2, with D the closed-form optimal logit."""
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  b = 64
  x0 = MU_F + jnp.sqrt(V_F) * jax.random.normal(k[0], (b, 2))
  n = jax.random.normal(k[1], (b, 2))
  s = jnp.exp(jax.random.normal(k[2], (b,)) * 0.5 - 1.0)
  spec = AdvSpec(gen_weight=0.7, disc_weight=1.0, r1_weight=0.2)
  g = jax.grad(lambda x: adversarial.gen_term(spec, optimal_logit, x, s, n, None))(x0)
  xt = x0 + s[:, None] * n
  want = -0.7 * jax.nn.sigmoid(-optimal_logit(xt, s))[:, None] * optimal_logit_grad(xt, s[:, None]) / b
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  _, m = adversarial.disc_objective(spec, optimal_logit, x0, None, s, n, x0, None, s, n)
  r1 = jnp.mean(jnp.sum(optimal_logit_grad(xt, s[:, None]) ** 2, -1))
  np.testing.assert_allclose(m["adv/r1"], r1, rtol=1e-5)


# ----------------------------------------------------------------------------
# The step with the term on (GMM teacher, MLP student, real data = exact teacher samples).


def adv_config(**over):
  return gmm_tiny(**{"method": "sida", "data.name": "gmm", "batch_size": 64, **over})


def adv_setup(record=True, **over):
  c = adv_config(**over)
  distill.validate_distill(c)
  setup = distill.build_setup(c)
  if record:
    rec = recording_optimizer()
    setup = dataclasses.replace(setup, tx_gen=rec, tx_fake=rec)
  return setup


def with_adv(setup, **adv):
  return dataclasses.replace(setup, step_cfg=dataclasses.replace(setup.step_cfg, adv=adv_spec(setup, **adv)))


def adv_spec(setup, **adv):
  return dataclasses.replace(setup.step_cfg.adv, **adv)


def real_batch(n=64):
  t = gmm.gmm_teacher()
  return {"image": np.asarray(gmm.sample(t.params, jax.random.PRNGKey(5), n)[0], np.float32)}


def one_step(setup, mesh_shape=(1, 1), devices=None, real=None, at_step=0):
  """`(state, new_state, metrics)` of one step from random student parameters (host arrays), the state's
  step counter set to `at_step`."""
  key = jax.random.PRNGKey(0)
  params = init_student_params(setup, key)
  n = mesh_shape[0] * mesh_shape[1]
  mesh = parallel.make_mesh({"data": mesh_shape[0], "fsdp": mesh_shape[1]}, devices=devices or jax.devices()[:n])
  step, state_sh, teacher_sh = distill.sharded_step(setup, mesh, distill.abstract_state(setup, key))
  state = jax.device_get(distill.initial_state(setup, key, params))  # host copy: the step donates its input
  state = state.replace(step=np.asarray(at_step, np.asarray(state.step).dtype))
  args = [jax.device_put(state, state_sh), jax.device_put(setup.teacher.params, teacher_sh)]
  if setup.step_cfg.adv.on:
    real = real_batch() if real is None else real
    args.append(jax.device_put(real, parallel.batch_sharding(mesh)))
  new, metrics = jax.device_get(step(*args))
  return state, new, metrics


@pytest.mark.slow  # 40-70 s on the shared 2-core machine (3 step compilations)
def test_step_gradients_are_the_method_plus_the_independent_adversarial_terms():
  """Recorded (exact) gradients of one step: generator = method + grad of the GAN term computed here
  directly (d/dtheta through g, not the step's VJP); fake network = DSM + grad of the discriminator
  loss; head = grad of the discriminator loss. A term dropped, its weight applied twice, the wrong
  noise draws or a stale discriminator fails."""
  base = adv_setup()
  cfg = base.step_cfg
  assert cfg.adv.on and cfg.adv.gen_weight > 0 and cfg.adv.disc_weight > 0
  state, on, m = one_step(base)
  _, no_gen, _ = one_step(with_adv(base, gen_weight=0.0))
  _, no_disc, _ = one_step(with_adv(base, disc_weight=0.0))
  assert np.isfinite(m["loss/disc"]) and np.isfinite(m["loss/adv_generator"])

  nets = step_lib.Nets(base.net_apply, base.teacher.apply, base.disc_apply())
  key = step_lib.step_key(state)
  d = adversarial.add_draws(cfg, key, step_lib.draw_randomness(cfg, key), real_batch())
  disc = adversarial.frozen_disc(nets.disc_apply, state.fake_params, state.disc_params)  # unmoved (recording)

  def gen_term(p):
    x0 = step_lib.generate(cfg, nets, p, d.z, d)
    return adversarial.gen_term(cfg.adv, disc, x0, d.adv_gen_sigma, d.adv_gen_noise, d.labels)

  want_gen = jax.grad(gen_term)(state.gen_params)
  got_gen = jax.tree.map(jnp.subtract, on.gen_opt_state, no_gen.gen_opt_state)
  assert np.linalg.norm(flat(want_gen)) > 1e-6
  assert rel_err(got_gen, want_gen) < 1e-3, rel_err(got_gen, want_gen)

  x = step_lib.generate(cfg, nets, state.gen_params, d.fake_z[0], d)
  _, (g_net, g_head), _ = adversarial.disc_loss_and_grads(
    cfg.adv, nets.disc_apply, state.fake_params, state.disc_params, d, 0, x
  )
  got_fake = jax.tree.map(jnp.subtract, on.fake_opt_state, no_disc.fake_opt_state)
  assert np.linalg.norm(flat(g_net)) > 1e-6 and np.linalg.norm(flat(g_head)) > 1e-6
  assert rel_err(got_fake, g_net) < 1e-3, rel_err(got_fake, g_net)
  assert_trees_close(on.disc_opt_state, g_head, rtol=1e-4, atol=1e-7)


def test_gradient_routing():
  """The generator's GAN term gives the discriminator (fake network and head) no gradient; the
  discriminator's loss gives the generator none; the teacher is never an optimised argument and comes
  out of a step unchanged."""
  setup = adv_setup()
  cfg = setup.step_cfg
  key = jax.random.PRNGKey(0)
  state = distill.initial_state(setup, key, init_student_params(setup, key))
  disc_apply = setup.disc_apply()
  nets = step_lib.Nets(setup.net_apply, setup.teacher.apply, disc_apply)
  k = step_lib.step_key(state)
  d = adversarial.add_draws(cfg, k, step_lib.draw_randomness(cfg, k), real_batch())
  x0 = step_lib.generate(cfg, nets, state.gen_params, d.z, d)

  def gen_side(fp, hp, frozen=True):
    fn = adversarial.frozen_disc(disc_apply, fp, hp) if frozen else (lambda x, s, lab: disc_apply(fp, hp, x, s, lab))
    return adversarial.gen_term(cfg.adv, fn, x0, d.adv_gen_sigma, d.adv_gen_noise, d.labels)

  g = jax.grad(gen_side, argnums=(0, 1))(state.fake_params, state.disc_params)
  assert np.all(flat(g) == 0)
  g_open = jax.grad(lambda fp, hp: gen_side(fp, hp, frozen=False), argnums=(0, 1))(state.fake_params, state.disc_params)
  assert np.linalg.norm(flat(g_open)) > 1e-6  # the check above can fail

  def disc_side(gp):
    x = step_lib.generate(cfg, nets, gp, d.fake_z[0], d)
    return adversarial.disc_loss_and_grads(cfg.adv, disc_apply, state.fake_params, state.disc_params, d, 0, x)[0]

  assert np.all(flat(jax.grad(disc_side)(state.gen_params)) == 0)
  assert np.linalg.norm(flat(jax.grad(gen_term_of(cfg, nets, state, d))(state.gen_params))) > 1e-6

  teacher_before = jax.tree.map(np.array, setup.teacher.params)
  one_step(setup)
  assert_trees_equal(setup.teacher.params, teacher_before)


def gen_term_of(cfg, nets, state, d):
  disc = adversarial.frozen_disc(nets.disc_apply, state.fake_params, state.disc_params)
  return lambda p: adversarial.gen_term(
    cfg.adv, disc, step_lib.generate(cfg, nets, p, d.z, d), d.adv_gen_sigma, d.adv_gen_noise, d.labels
  )


# ----------------------------------------------------------------------------
# (c) Off: the data-free step, bit for bit.


def test_weights_zero_is_the_data_free_step_bit_for_bit():
  """`sida` with both weights 0 is `sid` exactly: no discriminator in the state, a two-argument step,
  and the same state after a step (Adam, not recorded)."""
  off = adv_setup(record=False, **{"loss.adv_weight": 0.0, "fake.adv_weight": 0.0})
  assert not off.step_cfg.adv.on and off.disc_apply() is None
  c = gmm_tiny(method="sid", batch_size=64)
  distill.validate_distill(c)
  assert c.loss.adv_weight == 0.0 and c.fake.adv_weight == 0.0  # the data-free rows resolve to 0
  sid = distill.build_setup(c)
  assert off.step_cfg == sid.step_cfg
  s_off, n_off, m_off = one_step(off)
  s_sid, n_sid, m_sid = one_step(sid)
  assert s_off.disc_params is None and n_off.disc_params is None
  assert_trees_equal(n_off, n_sid)
  assert "loss/disc" not in m_off
  assert not trees_equal(n_off.gen_params, s_off.gen_params)  # the step trained


# ----------------------------------------------------------------------------
# (d) End to end: the term on trains, is finite, and resumes bit-identically (data position restored).


def run_cfg(total):
  return adv_config(
    total_steps=total,
    checkpoint_every=3,
    log_every=3,
    eval_every=1000,
    eval_num_samples=256,
    export_at_end=False,
    **{"teacher.surrogate_steps": 10, "data.num_examples": 100, "mesh.devices": 1},
  )


@pytest.mark.slow  # 40-70 s on the shared 2-core machine (3 step compilations)
def test_end_to_end_runs_and_resume_is_bit_identical(tmp_path):
  full = distill.train_and_evaluate(run_cfg(6), str(tmp_path / "full"))["state"]
  distill.train_and_evaluate(run_cfg(3), str(tmp_path / "split"))
  resumed = distill.train_and_evaluate(run_cfg(6), str(tmp_path / "split"))["state"]
  assert int(resumed.step) == 6 and int(full.nonfinite_count) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(full))
  assert_trees_equal(full, resumed)
  start = distill.train_and_evaluate(run_cfg(0), str(tmp_path / "start"))["state"]
  assert not trees_equal(start.disc_params, full.disc_params)  # the head trained
  # 100 examples, 64 per step: the real batches of steps 1..6 differ, so a resume that restarted the
  # data would not match (this is what makes the equality above check the iterator's position).
  c = run_cfg(6)
  distill.validate_distill(c)
  setup = distill.build_setup(c)
  b = [next(distill.real_batches(c, setup, s))["image"] for s in (0, 3)]
  assert not np.array_equal(b[0], b[1])


# ----------------------------------------------------------------------------
# (e) Sharded == single device, with the term on.


@pytest.mark.slow  # 40-70 s on the shared 2-core machine (3 step compilations)
def test_sharded_step_equals_single_device_with_the_term():
  _, one, _ = one_step(adv_setup())
  assert np.linalg.norm(flat(one.disc_opt_state)) > 1e-6
  for shape in [(8, 1), (4, 2)]:
    _, many, _ = one_step(adv_setup(), shape, devices=jax.devices())
    for name in ("gen_opt_state", "fake_opt_state", "disc_opt_state"):
      a, b = getattr(many, name), getattr(one, name)
      assert rel_err(a, b) < 1e-4, (shape, name, rel_err(a, b))


def test_head_lr_sets_the_heads_step_and_nothing_else():
  """`adv.head_lr` gives the discriminator head its own Adam: with b1 = 0 Adam's first update of a
  parameter is lr * g / (|g| + eps) (bias-corrected), so every head parameter with a gradient well above
  eps moves by head_lr, not fake.lr, while the fake network's update is the one without it, bit for
  bit (the generator's term reads the updated head, so its update may differ). A head still on the fake
  optimizer, or a head_lr that leaks into the fake network's optimizer, fails."""
  base = adv_setup(record=False)
  fast = adv_setup(record=False, **{"adv.head_lr": 1e-2})
  fake_lr = float(adv_config().fake.lr)
  assert fake_lr <= 1e-3  # ten times below head_lr, so the two steps cannot be confused
  assert base.tx_disc is None and fast.tx_disc is not None
  state, plain, _ = one_step(base)
  state2, quick, _ = one_step(fast)
  assert_trees_equal(state.disc_params, state2.disc_params)
  assert_trees_equal(plain.fake_params, quick.fake_params)
  for old, new_fast, new_base in zip(
    jax.tree.leaves(state.disc_params),
    jax.tree.leaves(quick.disc_params),
    jax.tree.leaves(plain.disc_params),
    strict=True,
  ):
    moved, moved_base = np.abs(new_fast - old), np.abs(new_base - old)
    ok = moved > 0
    assert ok.mean() > 0.5
    # lr * g / (|g| + eps): exactly head_lr up to Adam's eps, which shortens the step of a parameter
    # whose gradient is within a few hundred eps of zero.
    assert float(moved.max()) <= 1e-2 * (1 + 1e-5)
    np.testing.assert_allclose(np.median(moved[ok]), 1e-2, rtol=1e-3)
    assert np.mean(moved[ok] > 0.99e-2) > 0.8
    assert float(moved_base.max()) <= fake_lr * (1 + 1e-5)  # the fake optimizer's own step


def test_start_step_is_the_data_free_step_before_it_and_the_term_after():
  """`adv.start_step = n`: at a step below n the step is `sid`'s (generator and fake network, parameters
  and Adam states) and the head and its optimizer state are untouched; at step n it is the step with
  the term on from the start. A gate that leaks the term early, freezes the head after n, or tests
  the wrong counter fails."""
  gated = adv_setup(record=False, **{"adv.start_step": 5, "total_steps": 10})
  always = adv_setup(record=False, **{"total_steps": 10})
  c = gmm_tiny(method="sid", batch_size=64, total_steps=10)
  distill.validate_distill(c)
  sid = distill.build_setup(c)
  assert gated.step_cfg.adv.start_step == 5 and always.step_cfg.adv.start_step == 0
  for at in (0, 4):
    s0, before, m = one_step(gated, at_step=at)
    _, plain, _ = one_step(sid, at_step=at)
    assert m["adv/on"] == 0.0 and np.isfinite(m["loss/adv_generator"])
    for name in ("gen_params", "gen_opt_state", "fake_params", "fake_opt_state"):
      assert_trees_close(getattr(before, name), getattr(plain, name), rtol=1e-6, atol=1e-7)
    assert_trees_equal(before.disc_params, s0.disc_params)
    assert_trees_equal(before.disc_opt_state, s0.disc_opt_state)
  _, after, m = one_step(gated, at_step=5)
  _, on, _ = one_step(always, at_step=5)
  _, plain, _ = one_step(sid, at_step=5)
  assert m["adv/on"] == 1.0
  for name in ("gen_params", "fake_params", "disc_params", "disc_opt_state"):
    assert_trees_close(getattr(after, name), getattr(on, name), rtol=1e-6, atol=1e-7)
  assert not trees_equal(after.disc_params, s0.disc_params)
  assert rel_err(after.gen_params, plain.gen_params) > 1e-6  # the term changes the step once on


# ----------------------------------------------------------------------------
# (e') The head's readout: "mean" cannot weigh where a feature is, "dense" can.


def _swap_pair(key, n=256, c=8):
  """Two feature sets `[n, 2, c]` with the same per-position vectors u, v, at swapped positions."""
  u, v = jax.random.normal(key, (2, c))
  noise = 0.01 * jax.random.normal(jax.random.fold_in(key, 1), (2, n, 2, c))
  a = jnp.broadcast_to(jnp.stack([u, v]), (n, 2, c)) + noise[0]
  b = jnp.broadcast_to(jnp.stack([v, u]), (n, 2, c)) + noise[1]
  return a, b


def test_mean_readout_is_blind_to_position_and_dense_readout_learns_it():
  import optax

  a, b = _swap_pair(jax.random.key(0))
  for readout in ("mean", "dense"):
    head = adversarial.DiscHead(16, readout)
    params = head.init(jax.random.key(1), a[:1])["params"]
    # Exact property of the patch readout: permuting positions leaves every logit unchanged.
    same = np.allclose(head.apply({"params": params}, a), head.apply({"params": params}, a[:, ::-1]), atol=1e-6)
    assert same == (readout == "mean"), readout
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    loss = lambda p, h=head: adversarial.disc_loss_from_logits(h.apply({"params": p}, a), h.apply({"params": p}, b))
    for _ in range(200):
      g = jax.grad(loss)(params)
      u, opt = tx.update(g, opt)
      params = optax.apply_updates(params, u)
    acc = (np.mean(head.apply({"params": params}, a) > 0) + np.mean(head.apply({"params": params}, b) < 0)) / 2
    if readout == "mean":
      # b is a with its positions swapped (up to the noise): no mean readout separates them.
      assert float(loss(params)) > 2 * np.log(2) - 0.05 and acc < 0.7, (float(loss(params)), acc)
    else:
      assert float(loss(params)) < 0.1 and acc == 1.0, (float(loss(params)), acc)


@pytest.mark.slow  # two short runs (two step compilations)
def test_dense_readout_runs_in_the_step_and_a_resume_with_another_readout_is_refused(tmp_path):
  from emd_jax.runtime.loop import TrainingError

  c = run_cfg(2)
  c.adv.head_readout = "dense"
  state = distill.train_and_evaluate(c, str(tmp_path / "w"))["state"]
  assert int(state.step) == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.disc_params))
  c = run_cfg(3)  # the default readout: the head's parameters differ in shape
  with pytest.raises(TrainingError) as e:
    distill.train_and_evaluate(c, str(tmp_path / "w"))
  assert "adv_head_readout" in str(e.value), str(e.value)


@pytest.mark.slow  # three step compilations, 60 s on the shared 2-core machine
def test_own_features_leave_the_fake_denoiser_to_its_denoising_loss():
  """`adv.features = "own"`: the discriminator reads a copy of the fake network (started equal to it),
  which its loss trains; the fake network's update is the data-free one (`sid`'s), while with the
  shared encoder it is not."""
  c = gmm_tiny(method="sid", batch_size=64)
  distill.validate_distill(c)
  _, n_sid, _ = one_step(distill.build_setup(c))
  own = adv_setup(record=False, **{"adv.features": "own", "fake.adv_weight": 1.0})
  s_own, n_own, m_own = one_step(own)
  _, n_shared, _ = one_step(adv_setup(record=False, **{"fake.adv_weight": 1.0}))
  assert set(s_own.disc_params) == {"head", "encoder"}
  assert_trees_equal(s_own.disc_params["encoder"], s_own.fake_params)  # a copy of the fake network
  assert_trees_close(n_own.fake_params, n_sid.fake_params, rtol=1e-6, atol=1e-8)
  assert rel_err(n_shared.fake_params, n_sid.fake_params) > 1e-5  # the check above can fail
  assert not trees_equal(n_own.disc_params["encoder"], s_own.disc_params["encoder"])  # the copy trains
  assert rel_err(n_own.gen_params, n_sid.gen_params) > 1e-6  # the generator sees the term


# ----------------------------------------------------------------------------
# (f) Config errors, before any compute.


@pytest.mark.parametrize(
  "over, field",
  [
    ({}, "data.name"),  # sida without data
    ({"method": "sid", "loss.adv_weight": 0.1}, "fake.adv_weight"),  # a generator term with an untrained D
    ({"data.name": "digits"}, "data.name"),  # image data for the vector (gmm) teacher
    ({"data.name": "gmm", "loss.adv_weight": -1.0}, "loss.adv_weight"),
    ({"data.name": "gmm", "adv.r1_weight": -1.0}, "adv.r1_weight"),
    ({"data.name": "gmm", "adv.head_lr": 0.0}, "adv.head_lr"),
    ({"data.name": "gmm", "adv.head_readout": "max"}, "adv.head_readout"),
    ({"data.name": "gmm", "adv.features": "teacher"}, "adv.features"),
    ({"data.name": "gmm", "adv.start_step": -1}, "adv.start_step"),
    ({"data.name": "gmm", "adv.start_step": 10_000_000}, "adv.start_step"),
    ({"data.name": "gmm", "adv.sigma.sigma_min": 0.0}, "adv.sigma.sigma_min"),
  ],
)
def test_config_errors_name_the_field(over, field, monkeypatch):
  c = gmm_tiny(**{"method": "sida", **over})
  monkeypatch.setattr(distill, "build_setup", lambda *a, **k: pytest.fail("compute started"))
  with pytest.raises(ConfigError) as e:
    distill.train_and_evaluate(c, "/nonexistent/never-created")
  assert e.value.field == field, str(e.value)


def test_digits_teacher_data_must_match_its_shape():
  from configs.digits import get_config

  c = get_config("tiny")
  c.method = "sida"
  c.data.name = "digits"
  c.data.resolution = 8
  with pytest.raises(ConfigError, match="teacher's resolution 16") as e:
    distill.validate_distill(c)
  assert e.value.field == "data.resolution"
  c.data.resolution = 16
  c.data.channels = 3
  with pytest.raises(ConfigError) as e:
    distill.validate_distill(c)
  assert e.value.field == "data.channels"


def test_presets():
  for name, want in methods.ADVERSARIAL.items():
    c = gmm_tiny(method=name, **{"data.name": "gmm"})
    distill.validate_distill(c)
    assert c.loss.adv_weight == want["loss.adv_weight"] and c.fake.adv_weight == want["fake.adv_weight"]
  c = gmm_tiny(method="dmd2", **{"data.name": "gmm"})
  distill.validate_distill(c)
  assert c.fake.steps_per_gen_step == 5 and c.loss.name == "dmd"
  c = gmm_tiny(method="dmd2", **{"data.name": "gmm", "fake.steps_per_gen_step": 2, "loss.adv_weight": 0.5})
  distill.validate_distill(c)
  assert c.fake.steps_per_gen_step == 2 and c.loss.adv_weight == 0.5  # set fields win


def test_digits_config_runs_the_adversarial_rows_as_shipped():
  """configs/digits.py configures the real digits (16x16, as the teacher's data), so `--config.method=sida`
  etc. need no data flags; the data-free default never reads them (no batches without the term)."""
  from configs.digits import get_config

  for name in ("sida", "dmd2", "emd_sim_adv"):
    c = get_config("tiny")
    c.method = name
    distill.validate_distill(c)
    assert distill.adv_spec(c).on
  c = get_config("tiny")
  distill.validate_distill(c)
  assert not distill.adv_spec(c).on
  c = get_config("adv,tiny")  # the default method with the term, its own encoder
  distill.validate_distill(c)
  spec = distill.adv_spec(c)
  assert c.method == "emd_simloss_k1" and spec.on and spec.features == "own" and spec.gen_weight == 0.1

"""The one jitted distillation step: fake-score update, E-step, M-step.

`train_step` composes the parts below, chosen by config (ALGORITHMS.md section 6):

  0. few-step students only: each example's step n_b and its input, from the student's own
     earlier steps (`simulate`, backward simulation)
  1. z ~ N(0, sigma_init^2 I);  x0, vjp = jax.vjp(g_theta, z)   (one generator pass)
  2. fake denoiser: `fake_steps` EDM denoising updates on stop_grad(x0)   (`fake_update`)
  3. E-step (if estep.num_steps > 0): Langevin on (eps, z) with the new fake   (`run_estep`)
  4. M-step: dL/dx0 of the configured loss, pulled back through `vjp`   (`generator_grads`)
     (EMD with a moving latent evaluates g at z_K instead)
  5. non-finite guard: a non-finite loss or gradient leaves the state as it
     was (step still advances, so the next step draws new randomness)

All randomness of a step is drawn for the whole batch first (`draw_randomness`,
per-example where it must be), so gradient accumulation over `grad_accum_steps`
micro-batches (`accumulate`) computes the same update as one big batch. No Python
loop over steps and no host sync: the step returns scalars only.

The settings are a `StepConfig` built by `emd_jax.jobs.distill.build_setup` from a config that
`emd_jax.config.validation.validate_distill` has checked: the rules on config values live there
only, and nothing here checks them again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from emd_jax import qmc
from emd_jax.diffusion import NoiseDist, Schedule, expand_to
from emd_jax.distill import adversarial, latent_mean
from emd_jax.distill.adversarial import AdvSpec
from emd_jax.distill.estep import EStepResult, langevin_estep
from emd_jax.distill.fake_score import dsm_loss_and_grad
from emd_jax.distill.losses import LossSpec, generator_loss
from emd_jax.distill.state import DistillState
from emd_jax.training.ema import EmaTrack, debiased_decay, ema_update, track_decay
from emd_jax.training.guard import all_finite, guarded_update
from emd_jax.training.optimizer import tree_norm

Array = jax.Array

# Up to this many fake updates per generator step are unrolled at trace time under
# `fake_loop="auto"`: inside a `lax.scan` (even `unroll=True`) XLA:CPU emitted the fake denoiser's
# weight-gradient convolutions as naive loops, a 3-4x slower step on CPU (docs/scaling.md).
FAKE_UNROLL_MAX = 8

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
FAKE_LOOPS = ("auto", "unroll", "scan")
GAMMA_Z_SCALINGS = ("constant", "sigma2")
GEN_TRAIN_STEPS = ("uniform", "last")
DRAWS = ("iid", "stratified")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable; resolved from a validated config).

  The values are trusted: `validate_distill` checks every rule on them (names, ranges,
  `grad_accum_steps` dividing `batch_size`, an E-step for the 'emd' loss) with an error that
  names the config field.
  """

  batch_size: int
  data_shape: tuple[int, ...]
  sigma_init: float = 2.5
  sigma_data: float = 0.5
  num_classes: int = 0
  schedule: Schedule = Schedule("ve")
  gen_noise: NoiseDist = NoiseDist()
  fake_noise: NoiseDist = NoiseDist()
  loss: LossSpec = LossSpec()
  estep_steps: int = 0
  gamma_eps: float = 0.3
  gamma_z: float = 0.0
  gamma_z_scaling: str = "constant"  # one of GAMMA_Z_SCALINGS; "sigma2": per-example gamma_z * sigma^2
  noise_cancellation: bool = True
  fake_steps: int = 1
  # How several fake updates per generator step are traced (one of FAKE_LOOPS): "auto" unrolls
  # up to FAKE_UNROLL_MAX of them at trace time and scans longer runs; "unroll" / "scan" force one form.
  fake_loop: str = "auto"
  ema_decay: float = 0.999
  ema_debias: bool = False  # weights d^(n-k) over accepted updates k = 1..n only (no initial weights)
  ema_tracks: tuple[EmaTrack, ...] = ()  # named extra EMAs (`generator.ema_tracks`), in `state.gen_ema_tracks`
  grad_accum_steps: int = 1
  # Keep the generator pass's VJP (its activations) from the fake updates to the M-step; False
  # recomputes it there (one generator forward more per step, less memory at the fake updates).
  keep_gen_pass: bool = True
  remat: str = "none"  # activation rematerialisation of every network pass (a key of REMAT_POLICIES)
  # Few-step student (`generator.num_steps`, docs/algorithms.md): its grid `sigma_0 = sigma_init >
  # ... > sigma_{N-1} > 0`, the final 0 included; () is the one-step generator. `gen_backprop`:
  # the M-step's gradient also flows through the student's earlier steps (backward simulation).
  gen_sigmas: tuple[float, ...] = ()
  gen_backprop: bool = False
  # Which step each example trains (one of GEN_TRAIN_STEPS): "uniform" n_b ~ U{0..N-1} (DMD2's
  # recipe: every step's output is a sample the loss and the fake score see); "last": n_b = N - 1,
  # the sampler's final output only (the earlier steps learn only through `gen_backprop`).
  gen_train_step: str = "last"
  # The optional adversarial term on real data (`distill/adversarial.py`); off: the data-free step.
  adv: AdvSpec = AdvSpec()
  # How the step's latents, forward noises and noise levels are drawn (one of DRAWS): "iid", or
  # "stratified" (a randomly shifted lattice for the Gaussians, one noise level per 1/B of the
  # distribution: each draw exact, the batch spread evenly; emd_jax/qmc.py). E-step chains, labels,
  # few-step and adversarial draws stay i.i.d.
  draws: str = "iid"
  # The generator's input centre `mu` (`generator.latent_mean`, distill/latent_mean.py), flattened:
  # the first step denoises `mu + z`, `z ~ N(0, sigma_init^2 I)`; () is `mu = 0`.
  latent_shift: tuple[float, ...] = ()

  @property
  def gen_steps(self) -> int:
    """N, the student's number of steps (1: the one-step generator)."""
    return max(1, len(self.gen_sigmas) - 1)


@dataclasses.dataclass(frozen=True)
class Nets:
  """The step's network functions, each `f(params, x, sigma, labels) -> D(x; sigma)` `[B, ...]`.

  `net_apply` is the student architecture (generator and fake denoiser share it), `teacher_apply`
  the teacher. Build it with `Nets.build`, which applies the rematerialisation policy once.
  """

  net_apply: Callable
  teacher_apply: Callable
  # The adversarial term's discriminator `disc(fake_params, head_params, x_t, sigma, labels) -> [B]`
  # (`adversarial.make_disc_apply`); None without the term.
  disc_apply: Callable | None = None

  @classmethod
  def build(cls, remat: str, net_apply: Callable, teacher_apply: Callable, disc_apply: Callable | None = None) -> Nets:
    """The functions under `jax.checkpoint(policy=REMAT_POLICIES[remat])`, or as given for 'none'."""
    if remat == "none":
      return cls(net_apply, teacher_apply, disc_apply)
    policy = REMAT_POLICIES[remat]
    ck = lambda f: None if f is None else jax.checkpoint(f, policy=policy)  # noqa: E731
    return cls(ck(net_apply), ck(teacher_apply), ck(disc_apply))


class Txs(NamedTuple):
  """The generator's and the fake denoiser's optimizers, and the adversarial term's head's (None: the fake's)."""

  gen: optax.GradientTransformation
  fake: optax.GradientTransformation
  disc: optax.GradientTransformation | None = None


class Draws(NamedTuple):
  """The randomness of one step, for the whole batch (leading dim B)."""

  z: Array  # [B, ...] generator latents
  labels: Array | None  # [B, C] one-hot, or None
  sigma: Array  # [B] EDM noise level of the M-step / E-step
  eps: Array  # [B, ...] forward-process noise of x_t
  chain_keys: Array  # [B] per-chain Langevin keys
  fake_z: Array  # [S, B, ...] latents per fake step; fake_z[0] is z
  fake_sigma: Array  # [S, B]
  fake_noise: Array  # [S, B, ...]
  # Few-step students only (None for one step); see `simulate`.
  gen_step: Array | None = None  # [B] int: the student step n_b each example trains
  gen_sigma: Array | None = None  # [B] that step's input level sigma_{n_b}; z and fake_z are sigma_{n_b} N(0, I)
  sim_noise: Array | None = None  # [N-1, B, ...] the backward simulation's noises (start, then re-noising)
  # [B, ...] stop_grad(x0_{n_b - 1}), the centre mu (0 by default) where n_b = 0 (set by `simulate`)
  base: Array | None = None
  # The adversarial term only (None without it); see `adversarial.add_draws`.
  real: Array | None = None  # [B, ...] the step's real batch
  real_labels: Array | None = None  # [B, C] its one-hot labels (conditional teachers), else None
  adv_real_sigma: Array | None = None  # [S, B] noise levels of the real inputs, per fake update
  adv_real_noise: Array | None = None  # [S, B, ...]
  adv_fake_sigma: Array | None = None  # [S, B] of the generator samples the discriminator sees
  adv_fake_noise: Array | None = None  # [S, B, ...]
  adv_gen_sigma: Array | None = None  # [B] of the generator's own term
  adv_gen_noise: Array | None = None  # [B, ...]


# Fields of `Draws` whose batch axis is 1 (one row per fake update or simulated step).
STEP_MAJOR = ("fake_z", "fake_sigma", "fake_noise", "sim_noise") + (
  "adv_real_sigma",
  "adv_real_noise",
  "adv_fake_sigma",
  "adv_fake_noise",
)


class FakeStats(NamedTuple):
  """Per fake update `s = 0..S-1`: DSM loss, gradient norm, and whether both were finite."""

  loss: Array  # [S]
  grad_norm: Array  # [S]
  ok: Array  # [S] bool
  disc_loss: Array | None = None  # [S] the adversarial term's discriminator loss (None without it)


def step_key(state: DistillState) -> Array:
  """The step's key: `fold_in(rng, step)` of the run's raw base key (resuming needs nothing else)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)


def draw_randomness(cfg: StepConfig, key: Array, batch_sharding=None) -> Draws:
  """All randomness of one step for the batch `B = cfg.batch_size`, `S = cfg.fake_steps` (see `Draws`).

  The first fake update trains on the generator's own batch (`fake_z[0]` is `z`, so x0 = g(z) is
  shared with the M-step); further ones draw fresh latents. `batch_sharding`, if given, constrains
  `z` and `eps`. A few-step student also draws each example's step `n_b ~ U{0..N-1}` and the
  backward simulation's noises; its latents are scaled by `sigma_{n_b}` (a one-step student's
  draws do not change).
  """
  b, s = cfg.batch_size, cfg.fake_steps
  shape = (b, *cfg.data_shape)

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  k = jax.random.split(key, 8)
  labels = None
  if cfg.num_classes:
    labels = jax.nn.one_hot(jax.random.randint(k[0], (b,), 0, cfg.num_classes), cfg.num_classes)
  few = {}
  scale = cfg.sigma_init
  if cfg.gen_steps > 1:
    kf = jax.random.split(jax.random.fold_in(key, 1), 2)
    if cfg.gen_train_step == "last":
      gen_step = jnp.full((b,), cfg.gen_steps - 1, jnp.int32)
    else:
      gen_step = jax.random.randint(kf[0], (b,), 0, cfg.gen_steps)
    gen_sigma = jnp.asarray(cfg.gen_sigmas[:-1], jnp.float32)[gen_step]
    few = {
      "gen_step": gen_step,
      "gen_sigma": gen_sigma,
      "sim_noise": jax.random.normal(kf[1], (cfg.gen_steps - 1, *shape)),
    }
    scale = expand_to(gen_sigma, jnp.zeros(shape))
  if cfg.draws == "stratified":
    z, eps, sigma, fake_z, fake_sigma, fake_noise = _stratified_draws(cfg, k, shape)
    z, eps = constrain(scale * z), constrain(eps)
    fake_z = jnp.concatenate([z[None], scale * fake_z])
  else:
    z = constrain(scale * jax.random.normal(k[1], shape))
    fake_z = z[None]
    if s > 1:
      fake_z = jnp.concatenate([fake_z, scale * jax.random.normal(k[5], (s - 1, *shape))])
    sigma, eps = cfg.gen_noise.sample(k[2], (b,)), constrain(jax.random.normal(k[3], shape))
    fake_sigma = jax.vmap(lambda kk: cfg.fake_noise.sample(kk, (b,)))(jax.random.split(k[6], s))
    fake_noise = jax.random.normal(k[7], (s, *shape))
  return Draws(
    z=z,
    labels=labels,
    sigma=sigma,
    eps=eps,
    chain_keys=jax.random.split(k[4], b),
    fake_z=fake_z,
    fake_sigma=fake_sigma,
    fake_noise=fake_noise,
    **few,
  )


def _stratified_draws(cfg: StepConfig, k: Array, shape: tuple[int, ...]):
  """`draws = "stratified"`: each example's standard normals and noise-level uniforms are the
  coordinates of one point of a randomly shifted rank-1 lattice (emd_jax/qmc.py), so the batch is
  even in their joint space, not only in each marginal. The first lattice holds everything the
  M-step and the first fake update see, `(z, eps, sigma, fake_noise[0], fake_sigma[0])`; each further
  fake update has its own `(fake_z, fake_noise, fake_sigma)`. Returns `(z, eps, sigma, fake_z[1:],
  fake_sigma, fake_noise)` (latents unscaled)."""
  b, s = cfg.batch_size, cfg.fake_steps
  dim = math.prod(shape[1:])

  def gauss(u):
    return jnp.reshape(jax.scipy.special.ndtri(u), (b, *shape[1:]))

  u0 = qmc.lattice_uniform(k[1], b, 3 * dim + 2)
  z, eps, fake_noise0 = (gauss(u0[:, i * dim : (i + 1) * dim]) for i in range(3))
  sigma, fake_sigma0 = cfg.gen_noise.quantile(u0[:, -2]), cfg.fake_noise.quantile(u0[:, -1])
  if s == 1:
    return z, eps, sigma, jnp.zeros((0, *shape)), fake_sigma0[None], fake_noise0[None]
  u = jax.vmap(lambda kk: qmc.lattice_uniform(kk, b, 2 * dim + 1))(jax.random.split(k[5], s - 1))
  fake_z = jax.vmap(lambda v: gauss(v[:, :dim]))(u)
  fake_noise = jnp.concatenate([fake_noise0[None], jax.vmap(lambda v: gauss(v[:, dim : 2 * dim]))(u)])
  fake_sigma = jnp.concatenate([fake_sigma0[None], cfg.fake_noise.quantile(u[..., -1])])
  return z, eps, sigma, fake_z, fake_sigma, fake_noise


def generate(cfg: StepConfig, nets: Nets, gen_params, z: Array, d: Draws, through_steps: bool = False) -> Array:
  """The generator pass that trains: `[B, ...]` latents to samples, labels from `d`.

  One step: `g(z) = D_theta(z, sigma_init)`. A few-step student: the pass of each example's step
  `n_b`, `D_theta(base + z, sigma_{n_b})` with `base = d.base` from `simulate` (no gradient), or
  recomputed from `gen_params` when `through_steps` (gradients through the earlier steps).
  """
  if cfg.gen_steps == 1:
    return nets.net_apply(gen_params, first_input(cfg, z), jnp.full((z.shape[0],), cfg.sigma_init), d.labels)
  base = simulate(cfg, nets, gen_params, d) if through_steps else d.base
  return nets.net_apply(gen_params, base + z, d.gen_sigma, d.labels)


def first_input(cfg: StepConfig, z: Array) -> Array:
  """The student's first input from latents `z` `[B, ...]`: `mu + z` (`cfg.latent_shift`), or `z`."""
  mu = latent_mean.shift_array(cfg.latent_shift, cfg.data_shape)
  return z if mu is None else z + mu


def simulate(cfg: StepConfig, nets: Nets, gen_params, d: Draws) -> Array:
  """Backward simulation: each example's earlier-step output, from the student's own steps.

  Runs the student's steps `0 .. N-2` from pure noise `sigma_0 * sim_noise[0]` exactly as the
  sampler does (`diffusion.student_sample`: predict, re-noise to the next level with
  `sim_noise[k + 1]`), and returns per example the prediction `x0_{n_b - 1}` its step `n_b`
  starts from (the centre `mu`, 0 by default, where `n_b = 0`): `[B, ...]`. Never forward-noised
  data or teacher samples: the student trains on the inputs it meets when sampling. `N - 1` passes for the whole batch.
  """
  sig = cfg.gen_sigmas
  b = d.z.shape[0]
  x = first_input(cfg, sig[0] * d.sim_noise[0])
  base = first_input(cfg, jnp.zeros_like(d.z))  # step 0's examples start from the centre alone
  for k in range(cfg.gen_steps - 1):
    x0 = nets.net_apply(gen_params, x, jnp.full((b,), sig[k]), d.labels)
    base = jnp.where(expand_to(d.gen_step == k + 1, x0), x0, base)
    if k + 2 < cfg.gen_steps:
      x = x0 + sig[k + 1] * d.sim_noise[k + 1]
  return base


def with_base(cfg: StepConfig, nets: Nets, gen_params, d: Draws) -> Draws:
  """`d` with `base` set by `simulate` (no gradient); `d` itself for a one-step student."""
  if cfg.gen_steps == 1:
    return d
  return d._replace(base=jax.lax.stop_gradient(simulate(cfg, nets, gen_params, d)))


def micro_batch(d: Draws, i, accum: int) -> Draws:
  """Micro-batch `i` of `accum`: examples `i, i + accum, i + 2 accum, ...` of `d` (strided).

  The batch axis (axis 1 of the `STEP_MAJOR` fields, else axis 0) is split as `[B / accum, accum]`
  and index `i` taken on the second factor. A batch sharded in contiguous blocks over the mesh's
  data axes then gives every device `B / (accum * devices)` examples of each micro-batch: the
  micro-step spans the whole mesh and nothing is resharded (a contiguous slice `[i * micro, (i + 1)
  * micro)` would sit on `1 / accum` of the devices, or be moved; tests/test_microbatch.py).
  """

  def take(v, axis):
    n = v.shape[axis]
    split = v.reshape(v.shape[:axis] + (n // accum, accum) + v.shape[axis + 1 :])
    return jax.lax.dynamic_index_in_dim(split, i, axis=axis + 1, keepdims=False)

  return d._replace(**{k: take(v, 1 if k in STEP_MAJOR else 0) for k, v in d._asdict().items() if v is not None})


def accumulate(fn: Callable[[Draws], object], d: Draws, accum: int):
  """The mean of `fn(part)` over `accum` equal strided micro-batches `part` of `d` (`micro_batch`, a
  `lax.scan`), or `fn(d)`.

  `fn` returns a pytree of arrays (losses, gradients, metrics) that are means over its batch, so
  the mean over micro-batches is the full-batch value. `B` must be a multiple of `accum`.
  """
  if accum == 1:
    return fn(d)
  b = d.z.shape[0]
  if b % accum:
    raise ValueError(f"accumulate: batch {b} is not a multiple of accum={accum}")

  def body(total, i):
    out = fn(micro_batch(d, i, accum))
    return jax.tree.map(lambda t, o: t + o / accum, total, out), None

  zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda dd: fn(micro_batch(dd, 0, accum)), d))
  total, _ = jax.lax.scan(body, zero, jnp.arange(accum))
  return total


def fake_unrolled(cfg: StepConfig) -> bool:
  """Whether the `cfg.fake_steps` fake updates are a trace-time loop (else a `lax.scan`)."""
  return cfg.fake_loop == "unroll" or (cfg.fake_loop == "auto" and cfg.fake_steps <= FAKE_UNROLL_MAX)


def fake_update(
  cfg: StepConfig,
  nets: Nets,
  tx_fake,
  gen_params,
  fake_params,
  fake_opt_state,
  d: Draws,
  x0: Array | None = None,
  disc: tuple | None = None,
  tx_disc=None,
  adv_on: Array | None = None,
):
  """`cfg.fake_steps` EDM denoising updates of the fake denoiser on generator samples.

  Update `s` trains on `g(fake_z[s])` at `fake_sigma[s]`, `fake_noise[s]` (accumulated over
  `cfg.grad_accum_steps` micro-batches). `x0 = g(z)` `[B, ...]`, when given (only without
  accumulation), is the first update's batch instead of a second generator pass; a scanned loop
  recomputes it. Returns `(fake_params, fake_opt_state, FakeStats)`.

  `disc = (head_params, head_opt_state)` adds the adversarial term's discriminator loss to each
  update (the fake network's gradient is the sum; the head has its own optimizer state, of `tx_disc`,
  default `tx_fake`) and returns `(fake_params, fake_opt_state, FakeStats, disc)`. `adv_on` (a traced
  bool, None: on) gates it (`adv.start_step`): off, the fake network's gradient is the DSM one and the
  head and its optimizer state are kept.
  """
  tx_disc = tx_fake if tx_disc is None else tx_disc
  if x0 is not None and cfg.grad_accum_steps != 1:
    raise ValueError("fake_update: x0 is the full batch; it cannot be reused with grad_accum_steps > 1")

  def update(carry, s):
    params, opt_state = carry[:2]

    def one(part):
      if x0 is not None and isinstance(s, int) and s == 0:
        x = x0
      else:
        x = generate(cfg, nets, gen_params, part.fake_z[s], part)
      out = dsm_loss_and_grad(
        nets.net_apply, params, x, part.fake_sigma[s], part.fake_noise[s], part.labels, cfg.sigma_data
      )
      if disc is None:
        return out
      adv_loss, (g_net, g_head), _ = adversarial.disc_loss_and_grads(
        cfg.adv, nets.disc_apply, params, carry[2][0], part, s, x
      )
      g_net = adversarial.gate(adv_on, g_net, jax.tree.map(jnp.zeros_like, g_net))
      return out[0], jax.tree.map(jnp.add, out[1], g_net), adv_loss, g_head

    if disc is None:
      loss, grads = accumulate(one, d, cfg.grad_accum_steps)
    else:
      loss, grads, adv_loss, g_head = accumulate(one, d, cfg.grad_accum_steps)
    updates, opt_state = tx_fake.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & all_finite(grads)
    if disc is None:
      return (params, opt_state), (loss, tree_norm(grads), ok)
    head, head_opt = carry[2]
    head_updates, new_head_opt = tx_disc.update(g_head, head_opt, head)
    head, head_opt = adversarial.gate(adv_on, (optax.apply_updates(head, head_updates), new_head_opt), (head, head_opt))
    ok = ok & jnp.isfinite(adv_loss) & all_finite(g_head)
    return (params, opt_state, (head, head_opt)), (loss, tree_norm(grads), ok, adv_loss)

  carry = (fake_params, fake_opt_state) + (() if disc is None else (disc,))
  if fake_unrolled(cfg):
    # A trace-time loop, not a scan (see FAKE_UNROLL_MAX): the same updates in the same order.
    outs = []
    for s in range(cfg.fake_steps):
      carry, out = update(carry, s)
      outs.append(out)
    stats = FakeStats(*(jnp.stack(v) for v in zip(*outs, strict=True)))
  else:
    carry, outs = jax.lax.scan(update, carry, jnp.arange(cfg.fake_steps))
    stats = FakeStats(*outs)
  if disc is None:
    return carry[0], carry[1], stats
  return carry[0], carry[1], stats, carry[2]


def _denoisers(nets: Nets, fake_params, teacher_params, labels) -> tuple[Callable, Callable]:
  """`(teacher_fn, fake_fn)`, each `f(x, sigma, labels=None)` with this batch's `labels` bound."""
  teacher_fn = lambda x, s, lab=None: nets.teacher_apply(teacher_params, x, s, labels)  # noqa: E731
  fake_fn = lambda x, s, lab=None: nets.net_apply(fake_params, x, s, labels)  # noqa: E731
  return teacher_fn, fake_fn


def run_estep(cfg: StepConfig, nets: Nets, gen_params, fake_params, teacher_params, d: Draws, x0: Array) -> EStepResult:
  """The E-step: `cfg.estep_steps` Langevin steps on `(eps, z)` from `(d.eps, d.z)`, one chain per example.

  `x0 = g(d.z)` `[B, ...]` (not differentiated). With `gamma_z_scaling='sigma2'` the latent's step
  size is `gamma_z * sigma^2` per example. `x0` of the result is None when the latent moved.
  A few-step student's latent is its trained step's fresh noise (prior `N(0, sigma_{n_b}^2)`),
  the earlier steps' output `d.base` held fixed.
  """
  teacher_fn, fake_fn = _denoisers(nets, fake_params, teacher_params, d.labels)
  alpha, sigma = cfg.schedule.alpha_sigma(d.sigma)
  gamma_z = cfg.gamma_z
  if cfg.gamma_z and cfg.gamma_z_scaling == "sigma2":
    gamma_z = cfg.gamma_z * sigma**2
  return langevin_estep(
    d.chain_keys,
    d.eps,
    d.z,
    lambda zz: generate(cfg, nets, gen_params, zz, d),
    teacher_fn,
    fake_fn,
    alpha,
    sigma,
    num_steps=cfg.estep_steps,
    gamma_eps=cfg.gamma_eps,
    gamma_z=gamma_z,
    sigma_z=cfg.sigma_init if cfg.gen_steps == 1 else d.gen_sigma,
    noise_cancellation=cfg.noise_cancellation,
    x0=jax.lax.stop_gradient(x0),
    per_example_keys=True,
  )


def mstep_loss(cfg: StepConfig, teacher_fn, fake_fn, alpha, sigma, eps, est) -> Callable:
  """`x0 -> (loss, metrics)`: the method row's M-step loss at the (E-step's) noise `eps`, as the step uses it."""

  def loss_of_x0(x):
    return generator_loss(
      cfg.loss,
      x,
      teacher_fn=teacher_fn,
      fake_fn=fake_fn,
      alpha=alpha,
      sigma=sigma,
      eps=jax.lax.stop_gradient(eps),
      estep=est,
      gamma_eps=cfg.gamma_eps,
      num_estep=cfg.estep_steps,
      sigma_data=cfg.sigma_data,
    )

  return loss_of_x0


def generator_grads(
  cfg: StepConfig,
  nets: Nets,
  gen_params,
  fake_params,
  teacher_params,
  d: Draws,
  x0=None,
  gen_vjp=None,
  disc_params=None,
  adv_on: Array | None = None,
):
  """`(loss, grads, metrics)` of the M-step (after the E-step, if any) on one (micro-)batch `d`.

  `x0, gen_vjp = jax.vjp(g, gen_params)` at `d.z`, when given, is reused; otherwise it is computed.
  The loss depends on `gen_params` only through `x0`: its `dL/dx0` is pulled back through the VJP
  (through a new one at `z_K` when the E-step moved the latent). `grads` has `gen_params`' structure.
  With the adversarial term on (`cfg.adv.gen_weight > 0`), the generator's GAN term at the same `x0`
  is added to the loss, the discriminator (`fake_params`, `disc_params`) stopped; `adv_on` (a traced bool,
  None: on) gates it (`adv.start_step`; the logged `loss/adv_generator` is the ungated value).
  """
  teacher_fn, fake_fn = _denoisers(nets, fake_params, teacher_params, d.labels)
  if gen_vjp is None:
    x0, gen_vjp = jax.vjp(lambda p: generate(cfg, nets, p, d.z, d, cfg.gen_backprop), gen_params)
  alpha, sigma = cfg.schedule.alpha_sigma(d.sigma)
  eps, est, metrics = d.eps, None, {}
  if cfg.estep_steps > 0:
    with jax.named_scope("estep"):
      est = run_estep(cfg, nets, gen_params, fake_params, teacher_params, d, x0)
    metrics.update(est.stats)
    if est.x0 is None:  # the latent moved: the M-step differentiates g at z_K
      z_k = jax.lax.stop_gradient(est.z)
      x0, gen_vjp = jax.vjp(lambda p: generate(cfg, nets, p, z_k, d, cfg.gen_backprop), gen_params)
    eps = est.eps

  loss_of_x0 = mstep_loss(cfg, teacher_fn, fake_fn, alpha, sigma, eps, est)

  if cfg.adv.gen_weight:
    method_loss = loss_of_x0
    disc_fn = adversarial.frozen_disc(nets.disc_apply, fake_params, disc_params)

    def loss_of_x0(x):
      loss, m = method_loss(x)
      adv = adversarial.gen_term(cfg.adv, disc_fn, x, d.adv_gen_sigma, d.adv_gen_noise, d.labels)
      return loss + adversarial.gate(adv_on, adv, jnp.zeros_like(adv)), {**m, "loss/adv_generator": adv}

  with jax.named_scope("mstep_loss"):
    (loss, loss_metrics), dx0 = jax.value_and_grad(loss_of_x0, has_aux=True)(x0)
  with jax.named_scope("generator_pullback"):
    (grads,) = gen_vjp(dx0)
  metrics.update(loss_metrics)
  return loss, grads, metrics


def ema_decay(cfg: StepConfig, state: DistillState):
  """This step's EMA decay: `cfg.ema_decay`, or its bias-corrected form over the accepted updates.

  Debiased, the EMA is the normalised average `sum_k d^(n-k) p_k / sum_k d^(n-k)` over the
  `n = step - nonfinite_count + 1` accepted updates (the initial weights carry no weight).
  """
  if not cfg.ema_debias:
    return cfg.ema_decay
  return debiased_decay(cfg.ema_decay, state.step - state.nonfinite_count + 1)


def train_step(
  cfg: StepConfig, nets: Nets, txs: Txs, state: DistillState, teacher_params, batch_sharding=None, real=None
) -> tuple[DistillState, dict]:
  """One distillation step (the five steps of the module docstring): `(new_state, scalar metrics)`.

  `real`: the step's real batch {'image': [B, ...], 'label': [B, K]}, read only by the adversarial term.
  """
  # Each part runs under a `jax.named_scope` of its name: profiles and XLA's buffer reports
  # (benchmarks/memory.py --where) attribute their ops and buffers to it.
  with jax.named_scope("draw_randomness"):
    d = draw_randomness(cfg, step_key(state), batch_sharding)
    if cfg.adv.on:
      d = adversarial.add_draws(cfg, step_key(state), d, real)
  # 0. A few-step student's inputs: its own earlier steps (backward simulation, no gradient).
  with jax.named_scope("backward_simulation"):
    d = with_base(cfg, nets, state.gen_params, d)

  # 1. One generator pass, kept as a VJP for the M-step (and reused by the first fake update). With
  # `keep_gen_pass=False` it is a forward pass only, and the M-step recomputes it with its VJP after
  # the fake updates: one generator forward more, none of its activations alive during them.
  x0 = gen_vjp = None
  gen_params = state.gen_params
  if cfg.grad_accum_steps == 1:
    with jax.named_scope("generator_pass"):
      if cfg.keep_gen_pass:
        x0, gen_vjp = jax.vjp(lambda p: generate(cfg, nets, p, d.z, d, cfg.gen_backprop), gen_params)
      else:
        x0 = jax.lax.stop_gradient(generate(cfg, nets, gen_params, d.z, d))

  # 2. Fake-denoiser updates on generator samples.
  disc = (state.disc_params, state.disc_opt_state) if cfg.adv.on else None
  # The term's switch-on (`adv.start_step`): a traced bool, None when it is on from the first step.
  adv_on = state.step >= cfg.adv.start_step if cfg.adv.on and cfg.adv.start_step else None
  with jax.named_scope("fake_update"):
    fake_params, fake_opt_state, fake, *new_disc = fake_update(
      cfg, nets, txs.fake, state.gen_params, state.fake_params, state.fake_opt_state, d, x0, disc, txs.disc, adv_on
    )

  # 3-4. E-step and M-step with the new fake denoiser, accumulated over micro-batches.
  if not cfg.keep_gen_pass:
    # The recomputed generator pass depends on the new fake parameters: XLA can neither merge it
    # with step 1's pass (CSE) nor schedule it before the fake updates.
    gen_params, fake_params = jax.lax.optimization_barrier((gen_params, fake_params))
  with jax.named_scope("generator_grads"):
    g_loss, g_grads, metrics = accumulate(
      lambda part: generator_grads(
        cfg,
        nets,
        gen_params,
        fake_params,
        teacher_params,
        part,
        x0,
        gen_vjp,
        new_disc[0][0] if disc else None,
        adv_on,
      ),
      d,
      cfg.grad_accum_steps,
    )
  with jax.named_scope("generator_update"):
    updates, gen_opt_state = txs.gen.update(g_grads, state.gen_opt_state, state.gen_params)
    gen_params = optax.apply_updates(state.gen_params, updates)
  with jax.named_scope("ema_update"):
    gen_ema = ema_update(state.gen_ema, gen_params, ema_decay(cfg, state))
    n_accepted = state.step - state.nonfinite_count + 1
    gen_ema_tracks = {
      t.name: ema_update(state.gen_ema_tracks[t.name], gen_params, track_decay(t, n_accepted)) for t in cfg.ema_tracks
    }

  # 5. Non-finite guard: keep the old state unless everything is finite.
  ok = jnp.isfinite(g_loss) & all_finite(g_grads) & jnp.all(fake.ok)
  new = state.replace(
    gen_params=gen_params,
    gen_opt_state=gen_opt_state,
    gen_ema=gen_ema,
    gen_ema_tracks=gen_ema_tracks,
    fake_params=fake_params,
    fake_opt_state=fake_opt_state,
  )
  if disc is not None:
    new = new.replace(disc_params=new_disc[0][0], disc_opt_state=new_disc[0][1])
    metrics["loss/disc"] = jnp.mean(fake.disc_loss)
    if adv_on is not None:
      metrics["adv/on"] = adv_on.astype(jnp.float32)
  with jax.named_scope("nonfinite_guard"):
    kept, guard_metrics = guarded_update(ok, new, state)
  metrics.update(
    {
      "loss/generator": g_loss,
      "loss/fake_dsm": jnp.mean(fake.loss),
      "grad_norm/generator": tree_norm(g_grads),
      "grad_norm/fake": jnp.mean(fake.grad_norm),
      "param_norm/generator": tree_norm(gen_params),
      "update_norm/generator": tree_norm(updates),
      "sigma/mean_log": jnp.mean(jnp.log(d.sigma)),
      **guard_metrics,
    }
  )
  return kept, metrics


def make_train_step(
  cfg: StepConfig,
  net_apply: Callable,
  teacher_apply: Callable,
  tx_gen: optax.GradientTransformation,
  tx_fake: optax.GradientTransformation,
  batch_sharding=None,
  disc_apply: Callable | None = None,
  tx_disc: optax.GradientTransformation | None = None,
) -> Callable[[DistillState, object], tuple[DistillState, dict]]:
  """`train_step` with its static arguments bound: `step(state, teacher_params) -> (state, metrics)`.

  Not yet jitted. `net_apply(params, x, sigma, labels)` is the student architecture (generator
  and fake denoiser share it); `teacher_apply(params, x, sigma, labels)` the teacher.
  `batch_sharding`, if given, constrains per-example arrays. With the adversarial term on
  (`cfg.adv.on`, `disc_apply` from `adversarial.make_disc_apply`) the step is
  `step(state, teacher_params, real_batch)`.
  """
  nets = Nets.build(cfg.remat, net_apply, teacher_apply, disc_apply)
  txs = Txs(tx_gen, tx_fake, tx_disc)

  if cfg.adv.on:

    def adv_step(state: DistillState, teacher_params, real) -> tuple[DistillState, dict]:
      return train_step(cfg, nets, txs, state, teacher_params, batch_sharding, real)

    return adv_step

  def step(state: DistillState, teacher_params) -> tuple[DistillState, dict]:
    return train_step(cfg, nets, txs, state, teacher_params, batch_sharding)

  return step

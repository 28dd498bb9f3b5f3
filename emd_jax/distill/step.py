"""The one jitted distillation step: fake-score update, E-step, M-step.

One function composes the pieces chosen by config (ALGORITHMS.md section 6):

  1. z ~ N(0, sigma_init^2 I);  x0, vjp = jax.vjp(g_theta, z)   (one generator pass)
  2. fake denoiser: `fake_steps` EDM denoising updates on stop_grad(x0)
  3. E-step (if estep.num_steps > 0): Langevin on (eps, z) with the new fake
  4. M-step: dL/dx0 of the configured loss, pulled back through `vjp`
     (EMD with a moving latent evaluates g at z_K instead)
  5. non-finite guard: a non-finite loss or gradient leaves the state as it
     was (step still advances, so the next step draws new randomness)

All randomness of a step is drawn for the whole batch first (per-example
where it must be), so gradient accumulation over `grad_accum_steps`
micro-batches computes the same update as one big batch. No Python loop over
steps and no host sync: the step returns scalars only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from emd_jax.diffusion import NoiseDist, Schedule
from emd_jax.distill.estep import langevin_estep
from emd_jax.distill.fake_score import dsm_loss_and_grad
from emd_jax.distill.losses import LossSpec, generator_loss
from emd_jax.distill.state import DistillState
from emd_jax.training.guard import all_finite, keep_if

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


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable; resolved from the config)."""

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
  gamma_z_scaling: str = "constant"  # or "sigma2": per-example gamma_z * sigma^2
  noise_cancellation: bool = True
  fake_steps: int = 1
  # How several fake updates per generator step are traced: "auto" unrolls up to FAKE_UNROLL_MAX
  # of them at trace time and scans longer runs; "unroll" / "scan" force one form.
  fake_loop: str = "auto"
  ema_decay: float = 0.999
  ema_debias: bool = False  # weights d^(n-k) over accepted updates k = 1..n only (no initial weights)
  grad_accum_steps: int = 1
  remat: str = "none"  # activation rematerialisation of every network pass

  def __post_init__(self):
    if self.gamma_z_scaling not in ("constant", "sigma2"):
      raise ValueError(f"estep.gamma_z_scaling must be 'constant' or 'sigma2', got {self.gamma_z_scaling!r}")
    if self.fake_loop not in ("auto", "unroll", "scan"):
      raise ValueError(f"fake.loop must be 'auto', 'unroll' or 'scan', got {self.fake_loop!r}")
    if self.fake_steps < 1:
      raise ValueError(f"fake.steps_per_gen_step must be >= 1, got {self.fake_steps}")
    if self.loss.name == "emd" and self.estep_steps < 1:
      raise ValueError("loss.name='emd' needs estep.num_steps >= 1")
    if not 0.0 < self.gamma_eps <= 1.0 and self.estep_steps > 0:
      raise ValueError(f"estep.gamma_eps must be in (0, 1], got {self.gamma_eps}")
    if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
      raise ValueError(f"grad_accum_steps={self.grad_accum_steps} must be >= 1 and divide batch_size={self.batch_size}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")


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


def make_train_step(
  cfg: StepConfig,
  net_apply: Callable,
  teacher_apply: Callable,
  tx_gen: optax.GradientTransformation,
  tx_fake: optax.GradientTransformation,
  batch_sharding=None,
) -> Callable[[DistillState, object], tuple[DistillState, dict]]:
  """Builds `train_step(state, teacher_params) -> (state, metrics)` (not yet jitted).

  `net_apply(params, x, sigma, labels)` is the student architecture (generator
  and fake denoiser share it); `teacher_apply(params, x, sigma, labels)` the
  teacher. `batch_sharding`, if given, constrains per-example arrays.
  """
  policy = REMAT_POLICIES[cfg.remat]
  if cfg.remat != "none":
    net_apply = jax.checkpoint(net_apply, policy=policy)
    teacher_apply = jax.checkpoint(teacher_apply, policy=policy)
  b, accum = cfg.batch_size, cfg.grad_accum_steps
  micro = b // accum
  shape = (b, *cfg.data_shape)

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  def draw(key) -> Draws:
    k = jax.random.split(key, 8)
    labels = None
    if cfg.num_classes:
      labels = jax.nn.one_hot(jax.random.randint(k[0], (b,), 0, cfg.num_classes), cfg.num_classes)
    s = cfg.fake_steps
    z = constrain(cfg.sigma_init * jax.random.normal(k[1], shape))
    # The first fake update uses the generator's own batch (x0 = g(z), shared with the M-step);
    # further ones draw fresh latents.
    fake_z = z[None]
    if s > 1:
      fake_z = jnp.concatenate([fake_z, cfg.sigma_init * jax.random.normal(k[5], (s - 1, *shape))])
    return Draws(
      z=z,
      labels=labels,
      sigma=cfg.gen_noise.sample(k[2], (b,)),
      eps=constrain(jax.random.normal(k[3], shape)),
      chain_keys=jax.random.split(k[4], b),
      fake_z=fake_z,
      fake_sigma=jax.vmap(lambda kk: cfg.fake_noise.sample(kk, (b,)))(jax.random.split(k[6], s)),
      fake_noise=jax.random.normal(k[7], (s, *shape)),
    )

  def gen_apply(params, z, labels):
    return net_apply(params, z, jnp.full((z.shape[0],), cfg.sigma_init), labels)

  def generator_grads(gen_params, fake_params, teacher_params, d: Draws, x0=None, gen_vjp=None):
    """Loss, gradient and metrics of the M-step on one (micro-)batch."""
    labels = d.labels
    teacher_fn = lambda x, s, lab=None: teacher_apply(teacher_params, x, s, labels)  # noqa: E731
    fake_fn = lambda x, s, lab=None: net_apply(fake_params, x, s, labels)  # noqa: E731
    if x0 is None:
      x0, gen_vjp = jax.vjp(lambda p: gen_apply(p, d.z, labels), gen_params)
    alpha, sigma = cfg.schedule.alpha_sigma(d.sigma)
    eps, est, metrics = d.eps, None, {}
    if cfg.estep_steps > 0:
      gamma_z = cfg.gamma_z
      if cfg.gamma_z and cfg.gamma_z_scaling == "sigma2":
        gamma_z = cfg.gamma_z * sigma**2
      est = langevin_estep(
        d.chain_keys,
        d.eps,
        d.z,
        lambda zz: gen_apply(gen_params, zz, labels),
        teacher_fn,
        fake_fn,
        alpha,
        sigma,
        num_steps=cfg.estep_steps,
        gamma_eps=cfg.gamma_eps,
        gamma_z=gamma_z,
        sigma_z=cfg.sigma_init,
        noise_cancellation=cfg.noise_cancellation,
        x0=jax.lax.stop_gradient(x0),
        per_example_keys=True,
      )
      metrics.update(est.stats)
      if est.x0 is None:  # the latent moved: the M-step differentiates g at z_K
        z_k = jax.lax.stop_gradient(est.z)
        x0, gen_vjp = jax.vjp(lambda p: gen_apply(p, z_k, labels), gen_params)
      eps = est.eps

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

    (loss, loss_metrics), dx0 = jax.value_and_grad(loss_of_x0, has_aux=True)(x0)
    (grads,) = gen_vjp(dx0)
    metrics.update(loss_metrics)
    return loss, grads, metrics

  def accumulate(fn, d: Draws):
    """Mean of `fn(micro_draws)` outputs over the micro-batches (a scan when accum > 1)."""
    if accum == 1:
      return fn(d)

    def body(total, i):
      part = d._replace(
        **{
          k: jax.lax.dynamic_slice_in_dim(v, i * micro, micro, axis=1 if k.startswith("fake_") else 0)
          for k, v in d._asdict().items()
          if v is not None
        }
      )
      out = fn(part)
      return jax.tree.map(lambda t, o: t + o / accum, total, out), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, d._replace(**_micro_shapes(d, micro))))
    total, _ = jax.lax.scan(body, zero, jnp.arange(accum))
    return total

  def train_step(state: DistillState, teacher_params) -> tuple[DistillState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
    d = draw(key)

    # 1. One generator pass, kept as a VJP for the M-step (reused by the fake update).
    x0 = gen_vjp = None
    if accum == 1:
      x0, gen_vjp = jax.vjp(lambda p: gen_apply(p, d.z, d.labels), state.gen_params)

    # 2. Fake-denoiser updates on generator samples. Update s trains on g(fake_z[s]); the first
    # one reuses the M-step's generator pass x0 (fake_z[0] is z) when it is at hand.
    def fake_body(carry, s):
      params, opt_state = carry

      def one(part):
        if accum == 1 and isinstance(s, int) and s == 0:
          x = x0
        else:
          x = gen_apply(state.gen_params, part.fake_z[s], part.labels)
        return dsm_loss_and_grad(
          net_apply, params, x, part.fake_sigma[s], part.fake_noise[s], part.labels, cfg.sigma_data
        )

      loss, grads = accumulate(one, d)
      updates, opt_state = tx_fake.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      ok = jnp.isfinite(loss) & all_finite(grads)
      return (params, opt_state), (loss, optax.global_norm(grads), ok)

    carry = (state.fake_params, state.fake_opt_state)
    unroll = cfg.fake_loop == "unroll" or (cfg.fake_loop == "auto" and cfg.fake_steps <= FAKE_UNROLL_MAX)
    if unroll:
      # A trace-time loop, not a scan (see FAKE_UNROLL_MAX): the same updates in the same order.
      outs = []
      for s in range(cfg.fake_steps):
        carry, out = fake_body(carry, s)
        outs.append(out)
      (fake_params, fake_opt_state) = carry
      f_loss, f_gnorm, f_ok = (jnp.stack(v) for v in zip(*outs, strict=True))
    else:
      (fake_params, fake_opt_state), (f_loss, f_gnorm, f_ok) = jax.lax.scan(
        fake_body, carry, jnp.arange(cfg.fake_steps)
      )

    # 3-4. E-step and M-step, accumulated over micro-batches.
    if accum == 1:
      g_loss, g_grads, metrics = generator_grads(state.gen_params, fake_params, teacher_params, d, x0, gen_vjp)
    else:
      g_loss, g_grads, metrics = accumulate(
        lambda part: generator_grads(state.gen_params, fake_params, teacher_params, part), d
      )
    updates, gen_opt_state = tx_gen.update(g_grads, state.gen_opt_state, state.gen_params)
    gen_params = optax.apply_updates(state.gen_params, updates)
    decay = cfg.ema_decay
    if cfg.ema_debias:
      # Bias-corrected EMA: the normalised average sum_k d^(n-k) p_k / sum_k d^(n-k) over the
      # n accepted updates, so the initial (teacher) weights carry no weight. n = 1 copies p_1.
      n = (state.step - state.nonfinite_count + 1).astype(jnp.float32)
      decay = decay * (1.0 - decay ** (n - 1.0)) / (1.0 - decay**n)
    gen_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.gen_ema, gen_params)

    # 5. Non-finite guard: keep the old state unless everything is finite.
    ok = jnp.isfinite(g_loss) & all_finite(g_grads) & jnp.all(f_ok)
    new = state.replace(
      gen_params=gen_params,
      gen_opt_state=gen_opt_state,
      gen_ema=gen_ema,
      fake_params=fake_params,
      fake_opt_state=fake_opt_state,
    )
    kept = keep_if(ok, new, state)
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
    kept = kept.replace(
      step=state.step + 1,
      nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
      nonfinite_streak=streak,
    )
    metrics.update(
      {
        "loss/generator": g_loss,
        "loss/fake_dsm": jnp.mean(f_loss),
        "grad_norm/generator": optax.global_norm(g_grads),
        "grad_norm/fake": jnp.mean(f_gnorm),
        "param_norm/generator": optax.global_norm(gen_params),
        "update_norm/generator": optax.global_norm(updates),
        "sigma/mean_log": jnp.mean(jnp.log(d.sigma)),
        "nonfinite/skipped": (~ok).astype(jnp.int32),
        "nonfinite/total": kept.nonfinite_count,
        "nonfinite/streak": streak,
      }
    )
    return kept, metrics

  return train_step


def _micro_shapes(d: Draws, micro: int) -> dict:
  """ShapeDtypeStructs of one micro-batch of `d` (for the accumulator's zeros)."""
  out = {}
  for k, v in d._asdict().items():
    if v is None:
      continue
    axis = 1 if k.startswith("fake_") else 0
    shape = list(v.shape)
    shape[axis] = micro
    out[k] = jax.ShapeDtypeStruct(tuple(shape), v.dtype)
  return out

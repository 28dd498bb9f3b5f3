"""The one jitted distillation step: fake-score update, E-step, M-step.

One function composes the pieces chosen by config (ALGORITHMS.md section 6):

  1. z ~ N(0, sigma_init^2 I);  x0, vjp = jax.vjp(g_theta, z)   (one generator pass)
  2. fake denoiser: `fake_steps` EDM denoising updates on stop_grad(x0)
  3. E-step (if estep.num_steps > 0): Langevin on (eps, z) with the new fake
  4. M-step: dL/dx0 of the configured loss, pulled back through `vjp`
     (EMD with a moving latent evaluates g at z_K instead)
  5. non-finite guard: a non-finite loss or gradient leaves the state as it
     was (step still advances, so the next step draws new randomness)

No Python loop over steps and no host sync: the step returns scalars only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from emd_jax.diffusion import NoiseDist, Schedule
from emd_jax.distill.estep import langevin_estep
from emd_jax.distill.fake_score import all_finite, fake_dsm_update
from emd_jax.distill.losses import LossSpec, generator_loss
from emd_jax.distill.state import DistillState

Array = jax.Array


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
  ema_decay: float = 0.999

  def __post_init__(self):
    if self.gamma_z_scaling not in ("constant", "sigma2"):
      raise ValueError(f"estep.gamma_z_scaling must be 'constant' or 'sigma2', got {self.gamma_z_scaling!r}")
    if self.fake_steps < 1:
      raise ValueError(f"fake.steps_per_gen_step must be >= 1, got {self.fake_steps}")
    if self.loss.name == "emd" and self.estep_steps < 1:
      raise ValueError("loss.name='emd' needs estep.num_steps >= 1")
    if not 0.0 < self.gamma_eps <= 1.0 and self.estep_steps > 0:
      raise ValueError(f"estep.gamma_eps must be in (0, 1], got {self.gamma_eps}")


def _select(pred: Array, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


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
  shape = (cfg.batch_size, *cfg.data_shape)

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  def train_step(state: DistillState, teacher_params) -> tuple[DistillState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
    k_z, k_lab, k_fake, k_sig, k_eps, k_chain = jax.random.split(key, 6)
    labels = None
    if cfg.num_classes:
      labels = jax.nn.one_hot(jax.random.randint(k_lab, (cfg.batch_size,), 0, cfg.num_classes), cfg.num_classes)
    sigma_init = jnp.full((cfg.batch_size,), cfg.sigma_init)
    teacher_fn = lambda x, s, lab=None: teacher_apply(teacher_params, x, s, labels)  # noqa: E731

    def gen_at(params, z):
      return net_apply(params, z, sigma_init, labels)

    # 1. One generator pass, kept as a VJP for the M-step.
    z = constrain(cfg.sigma_init * jax.random.normal(k_z, shape))
    x0, gen_vjp = jax.vjp(lambda p: gen_at(p, z), state.gen_params)

    # 2. Fake-denoiser updates on generator samples.
    def fake_body(carry, k):
      params, opt_state = carry
      k_noise, k_fresh = jax.random.split(k)
      if cfg.fake_steps == 1:
        x = x0
      else:
        x = gen_at(state.gen_params, constrain(cfg.sigma_init * jax.random.normal(k_fresh, shape)))
      fake_apply = lambda p, xx, s, lab: net_apply(p, xx, s, labels)  # noqa: E731
      params, opt_state, loss, gnorm, ok = fake_dsm_update(
        fake_apply, tx_fake, params, opt_state, x, k_noise, cfg.fake_noise, labels, cfg.sigma_data
      )
      return (params, opt_state), (loss, gnorm, ok)

    (fake_params, fake_opt_state), (f_loss, f_gnorm, f_ok) = jax.lax.scan(
      fake_body, (state.fake_params, state.fake_opt_state), jax.random.split(k_fake, cfg.fake_steps)
    )
    fake_fn = lambda x, s, lab=None: net_apply(fake_params, x, s, labels)  # noqa: E731

    # 3. E-step.
    sigma_edm = cfg.gen_noise.sample(k_sig, (cfg.batch_size,))
    alpha, sigma = cfg.schedule.alpha_sigma(sigma_edm)
    eps = constrain(jax.random.normal(k_eps, shape))
    est = None
    metrics = {}
    if cfg.estep_steps > 0:
      gamma_z = cfg.gamma_z
      if cfg.gamma_z and cfg.gamma_z_scaling == "sigma2":
        gamma_z = cfg.gamma_z * sigma**2
      est = langevin_estep(
        k_chain,
        eps,
        z,
        lambda zz: gen_at(state.gen_params, zz),
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
      )
      metrics.update(est.stats)
      if est.x0 is None:  # the latent moved: the M-step differentiates g at z_K
        z_k = jax.lax.stop_gradient(est.z)
        x0, gen_vjp = jax.vjp(lambda p: gen_at(p, z_k), state.gen_params)
      eps = est.eps

    # 4. M-step: dL/dx0, then the generator VJP.
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

    (g_loss, loss_metrics), dx0 = jax.value_and_grad(loss_of_x0, has_aux=True)(x0)
    (g_grads,) = gen_vjp(dx0)
    updates, gen_opt_state = tx_gen.update(g_grads, state.gen_opt_state, state.gen_params)
    gen_params = optax.apply_updates(state.gen_params, updates)
    decay = cfg.ema_decay
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
    kept = _select(ok, new, state)
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
    kept = kept.replace(
      step=state.step + 1,
      nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
      nonfinite_streak=streak,
    )
    metrics.update(loss_metrics)
    metrics.update(
      {
        "loss/generator": g_loss,
        "loss/fake_dsm": jnp.mean(f_loss),
        "grad_norm/generator": optax.global_norm(g_grads),
        "grad_norm/fake": jnp.mean(f_gnorm),
        "param_norm/generator": optax.global_norm(gen_params),
        "update_norm/generator": optax.global_norm(updates),
        "sigma/mean_log": jnp.mean(jnp.log(sigma_edm)),
        "nonfinite/skipped": (~ok).astype(jnp.int32),
        "nonfinite/total": kept.nonfinite_count,
        "nonfinite/streak": streak,
      }
    )
    return kept, metrics

  return train_step

"""The optional adversarial term on real data (SiDA, DMD2): a discriminator on the fake score's features.

Off by default (`loss.adv_weight = fake.adv_weight = 0`: the data-free step, bit for bit). On, it is
added to whatever the method's row forms (docs/algorithms.md "Adversarial term"):

  discriminator  D(x_t, sigma) = head(features_psi(x_t, sigma)), `features_psi` the fake score
                 network's encoder output (the MLP's last hidden layer; the U-Nets' bottleneck,
                 `nets.features_apply`), `head` a small MLP over channels, read out by the mean over
                 positions or (`adv.head_readout = "dense"`) by a learnt weight per position
                 (its parameters `state.disc_params`, its own state of the fake optimizer); with
                 `adv.features = "own"` the encoder is a copy of the fake network (started as the
                 teacher), trained by the discriminator's loss alone; no third
                 network is trained from scratch (SiDA reuses the fake score's encoder; DMD2 puts a
                 classifier on the fake U-Net's bottleneck).
  inputs         real images and generator samples, each noised `x_t = x + sigma n` (EDM's frame, the
                 one the fake denoiser is trained in) at `sigma ~ adv.sigma`, fresh draws per use.
  fake update    + fake.adv_weight * [softplus(-D(real_t)) + softplus(D(stop_grad(g(z))_t))]
                 + adv.r1_weight / 2 * ||grad_x D(real_t)||^2   (mean over the batch), into the fake
                 network's parameters (its encoder) and the head.
  generator      + loss.adv_weight * softplus(-D(g(z)_t))  (non-saturating), differentiated in x0
                 only, so it reaches the generator through the M-step's VJP and never the
                 discriminator (nor the teacher).
  switch-on      `adv.start_step = n > 0`: the first n steps are the data-free step (the term's
                 gradients are zero, the head and its optimizer state stay as initialised; DMD2 and
                 SiDA start their GAN terms on a student that is already close), the term is on from
                 the step whose `state.step` is n. A select, not a branch: the discriminator's passes
                 are computed (and the real data read) from the first step, so the switch-on does not
                 recompile and a resume stays exact.

Pure functions of given randomness: `add_draws` draws everything for the batch first, into fields
of `step.Draws`, so micro-batch accumulation slices it like the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from emd_jax.diffusion import NoiseDist, expand_to

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AdvSpec:
  """Static settings of the adversarial term (from `loss.adv_weight`, `fake.adv_weight`, `adv.*`)."""

  gen_weight: float = 0.0  # loss.adv_weight: the generator's non-saturating term
  disc_weight: float = 0.0  # fake.adv_weight: the discriminator's loss in the fake update
  r1_weight: float = 0.0  # adv.r1_weight: R1 penalty on noised real inputs
  sigma: NoiseDist = NoiseDist()  # adv.sigma: noise levels of the discriminator's inputs
  head_hidden: int = 64  # adv.head_hidden: width of the head's hidden layer
  head_readout: str = "mean"  # adv.head_readout: "mean" over positions or "dense" (position-aware)
  features: str = "shared"  # adv.features: the fake network's encoder ("shared") or a copy of it ("own")
  start_step: int = 0  # adv.start_step: the term is on from this step (state.step >= start_step)

  @property
  def on(self) -> bool:
    return self.gen_weight > 0 or self.disc_weight > 0


READOUTS = ("mean", "dense")


class DiscHead(nn.Module):
  """Features `[B, ..., C]` -> logits `[B]`: LayerNorm, Dense(hidden), SiLU per position, then a readout.

  `readout="mean"`: Dense(1) per position, averaged over positions (a patch discriminator: translation
  equivariant, it cannot weigh *where* a feature is). `readout="dense"`: one Dense(1) over the flattened
  positions x hidden (a learnt weight per position, as a last convolution whose kernel covers the whole
  map, DMD2's classifier on the bottleneck): it can see a spatial statistic such as where the ink lies
  on average. On features without positions (`[B, C]`, the MLP) the two are the same function.
  """

  hidden: int = 64
  readout: str = "mean"

  @nn.compact
  def __call__(self, f: Array) -> Array:
    f = nn.LayerNorm(name="norm")(f.astype(jnp.float32))
    h = nn.silu(nn.Dense(self.hidden, name="fc")(f))
    if self.readout == "dense":
      return nn.Dense(1, name="out")(h.reshape(h.shape[0], -1))[:, 0]
    if self.readout != "mean":
      raise ValueError(f"DiscHead: readout must be one of {READOUTS}, got {self.readout!r}")
    logit = nn.Dense(1, name="out")(h)[..., 0]
    return jnp.mean(logit.reshape(logit.shape[0], -1), axis=-1)


FEATURES = ("shared", "own")


def make_disc_apply(features_apply: Callable, hidden: int, readout: str = "mean", features: str = "shared") -> Callable:
  """`disc(fake_params, head_params, x_t, sigma, labels) -> [B]`: a head on `features_apply`'s output.

  `features="shared"`: the features of the fake network itself (`fake_params`), so the discriminator's
  loss also trains the encoder the fake denoiser uses. `features="own"`: `head_params` is
  `{"head": ..., "encoder": ...}`, the encoder a copy of the fake network (from `init_head`, so it
  starts as the teacher's, not from scratch) trained only by the discriminator's loss; `fake_params`
  is then unused and receives no gradient, and the fake denoiser is the data-free one.
  """
  head = DiscHead(hidden, readout)
  if features == "own":

    def disc(fake_params, head_params, x, sigma, labels):
      del fake_params
      return head.apply({"params": head_params["head"]}, features_apply(head_params["encoder"], x, sigma, labels))

  elif features == "shared":

    def disc(fake_params, head_params, x, sigma, labels):
      return head.apply({"params": head_params}, features_apply(fake_params, x, sigma, labels))

  else:
    raise ValueError(f"make_disc_apply: features must be one of {FEATURES}, got {features!r}")
  return disc


def init_head(
  key: Array,
  features_apply: Callable,
  fake_params,
  data_shape,
  num_classes: int,
  hidden: int,
  readout: str = "mean",
  features: str = "shared",
):
  """The discriminator's initial parameters for the features of `fake_params` (shapes from one traced pass):
  the head's, or with `features="own"` `{"head": ..., "encoder": a copy of fake_params}`."""
  x = jnp.zeros((1, *data_shape))
  labels = jnp.zeros((1, num_classes)) if num_classes else None
  feats = jax.eval_shape(features_apply, fake_params, x, jnp.ones((1,)), labels)
  head = DiscHead(hidden, readout).init(key, jnp.zeros(feats.shape, jnp.float32))["params"]
  if features == "own":  # own buffers: the state is donated leaf by leaf
    return {"head": head, "encoder": jax.tree.map(jnp.copy, fake_params)}
  return head


# ----------------------------------------------------------------------------
# The losses, on logits (tests/test_adversarial.py checks them against closed forms).


def disc_loss_from_logits(real_logits: Array, fake_logits: Array) -> Array:
  """Non-saturating discriminator loss `mean softplus(-D(real)) + mean softplus(D(fake))` (scalar)."""
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def gen_loss_from_logits(fake_logits: Array) -> Array:
  """The generator's non-saturating loss `mean softplus(-D(g(z)))` (scalar)."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def noised(x: Array, sigma: Array, noise: Array) -> Array:
  """`x + sigma n` per example (`sigma` `[B]`)."""
  return x + expand_to(sigma, x) * noise


def disc_objective(
  spec: AdvSpec, disc_fn: Callable, x_real, real_labels, s_real, n_real, x_fake, fake_labels, s_fake, n_fake
):
  """`(loss, metrics)` of the discriminator: `disc_weight * GAN + r1_weight / 2 * R1`.

  `disc_fn(x_t, sigma, labels) -> [B]` logits; `x_fake` is stopped (no gradient to the generator).
  """
  x_fake = jax.lax.stop_gradient(x_fake)
  real_t = noised(x_real, s_real, n_real)
  fake_t = noised(x_fake, s_fake, n_fake)
  real_logits = disc_fn(real_t, s_real, real_labels)
  fake_logits = disc_fn(fake_t, s_fake, fake_labels)
  gan = disc_loss_from_logits(real_logits, fake_logits)
  loss = spec.disc_weight * gan
  metrics = {
    "adv/disc_gan": gan,
    "adv/real_logit": jnp.mean(real_logits),
    "adv/fake_logit": jnp.mean(fake_logits),
  }
  if spec.r1_weight:
    grad_x = jax.grad(lambda x: jnp.sum(disc_fn(x, s_real, real_labels)))(real_t)
    r1 = jnp.mean(jnp.sum(jnp.reshape(grad_x**2, (grad_x.shape[0], -1)), axis=-1))
    loss = loss + 0.5 * spec.r1_weight * r1
    metrics["adv/r1"] = r1
  return loss, metrics


def disc_loss_and_grads(spec: AdvSpec, disc_apply: Callable, fake_params, head_params, part, s: int, x_fake):
  """`(loss, (fake_grads, head_grads), metrics)` of `disc_objective` for fake update `s` on (micro-)batch `part`.

  `part` is a `step.Draws` holding the real batch and the adversarial draws (`add_draws`).
  """

  def objective(fp, hp):
    return disc_objective(
      spec,
      lambda x, sg, lab: disc_apply(fp, hp, x, sg, lab),
      part.real,
      part.real_labels,
      part.adv_real_sigma[s],
      part.adv_real_noise[s],
      x_fake,
      part.labels,
      part.adv_fake_sigma[s],
      part.adv_fake_noise[s],
    )

  (loss, metrics), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(fake_params, head_params)
  return loss, grads, metrics


def gen_term(spec: AdvSpec, disc_fn: Callable, x0: Array, sigma: Array, noise: Array, labels) -> Array:
  """`gen_weight * softplus(-D(x0 + sigma n))`, mean over the batch; `disc_fn` sees no gradient."""
  return spec.gen_weight * gen_loss_from_logits(disc_fn(noised(x0, sigma, noise), sigma, labels))


def frozen_disc(disc_apply: Callable, fake_params, head_params) -> Callable:
  """`disc_fn(x_t, sigma, labels)` with the discriminator's parameters stopped (the generator's view)."""
  fp, hp = jax.lax.stop_gradient(fake_params), jax.lax.stop_gradient(head_params)
  return lambda x, sg, lab: disc_apply(fp, hp, x, sg, lab)


def gate(on: Array | None, new, old):
  """`new` where the term is on (`on`, a traced bool; None: always on), else `old`, leaf by leaf."""
  if on is None:
    return new
  return jax.tree.map(lambda a, b: jnp.where(on, a, b), new, old)


def add_draws(cfg, key: Array, d, real: dict):
  """`d` (a `step.Draws`) with the real batch and the adversarial term's randomness.

  `real` = {'image': [B, ...], 'label': [B, K] (optional)}. Per fake update `s`: noise levels and
  noises of its real and fake inputs `[S, B(, ...)]`; for the generator's term `[B(, ...)]`.
  Drawn from `fold_in(key, 2)`, so the method's own draws do not change.
  """
  b, s = cfg.batch_size, cfg.fake_steps
  shape = (b, *cfg.data_shape)
  k = jax.random.split(jax.random.fold_in(key, 2), 6)
  dist = cfg.adv.sigma
  labels = real.get("label") if cfg.num_classes else None
  return d._replace(
    real=jnp.asarray(real["image"], jnp.float32),
    real_labels=None if labels is None else jnp.asarray(labels, jnp.float32),
    adv_real_sigma=dist.sample(k[0], (s, b)),
    adv_real_noise=jax.random.normal(k[1], (s, *shape)),
    adv_fake_sigma=dist.sample(k[2], (s, b)),
    adv_fake_noise=jax.random.normal(k[3], (s, *shape)),
    adv_gen_sigma=dist.sample(k[4], (b,)),
    adv_gen_noise=jax.random.normal(k[5], shape),
  )

"""The UD2M training job (`config.job == "ud2m"`; ALGORITHMS.md section 7).

`train_and_evaluate(config, workdir)` adapts a frozen teacher denoiser into an
N x K unfolded posterior sampler for one measurement operator:

  trainable   LoRA factors of the teacher (rank `lora.rank` on `lora.targets`:
              attention projections and output layers) and the per-block
              `log_lam`, `log_t_delta` `[N*K]` of the unfolded sampler
  frozen      the teacher's weights: a separate, sharded, never-donated step
              argument, wrapped in `stop_gradient` and given the optimizer label
              "frozen" (`optax.set_to_zero`), so they cannot change
  data        (x, y) pairs made on the fly: x from the data pipeline,
              `y = A x + sigma_y n` inside the step
  loss        mse_weight * noise-prediction MSE of one teacher-forced outer step
              (`unfolded_training_loss`) + perceptual_weight * squared feature
              distance + adversarial_weight * non-saturating GAN loss; the
              discriminator (`discriminator.py`) is updated on the same batch
              with R1 on real images

Optimisers: AdamW (lr 1e-4, weight decay 0.01) for LoRA, the same with
`optim.unfolded_lr_mult` x lr for the block parameters, AdamW for the critic.
Randomness: the state holds the run's step key `rng` (from `PRNGKey(seed)`), update
n uses `fold_in(rng, n - 1)`, so resume is exact. Set-up, resume, checkpoints,
TensorBoard, NaN guard and preemption are `emd_jax.runtime.runner` / `loop`;
evaluation restores held-out images with the full sampler (PSNR/SSIM and a
clean / observed / restored grid); the end of training writes `DIR/export/`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from emd_jax import teachers
from emd_jax.config.validation import ConfigError, validate_common
from emd_jax.evaluators import registry
from emd_jax.formats import paths
from emd_jax.formats import ud2m_export as export_lib
from emd_jax.nets import lora as lora_lib
from emd_jax.posterior import discriminator as disc_lib
from emd_jax.posterior import operators as ops
from emd_jax.posterior.unfolded import default_unfolded_params, unfolded_sample, unfolded_training_loss
from emd_jax.runtime import logs as metrics_lib
from emd_jax.runtime import parallel, runner
from emd_jax.teachers.base import Teacher
from emd_jax.training.guard import all_finite, guarded_update

Array = jax.Array

# Perceptual feature spaces: name -> factory(config.perceptual) -> (features(aux_params, x [B,H,W,C]) -> [B, F],
# aux_params). Register LPIPS (or any other) here; see docs/ud2m.md.
PERCEPTUAL: dict[str, Callable[[Any], tuple[Callable[[Any, Array], Array], Any]]] = {}


def _digits_classifier_features(_cfg) -> tuple[Callable[[Any, Array], Array], Any]:
  from emd_jax.evaluators import digits_classifier as dc

  model, params, _ = dc.load_classifier()

  def features(p, x):
    return model.apply({"params": p}, dc.to_classifier_input(x))[1]  # [B, 64] penultimate activations

  return features, params


def _lpips_unavailable(_cfg):
  raise ConfigError(
    "perceptual.kind",
    "'lpips' needs an implementation and its weights: register a factory in "
    "emd_jax.jobs.ud2m.PERCEPTUAL['lpips'] (docs/ud2m.md), or use 'none' / 'digits_classifier'",
  )


PERCEPTUAL["digits_classifier"] = _digits_classifier_features
PERCEPTUAL.setdefault("lpips", _lpips_unavailable)


@struct.dataclass
class UD2MState:
  """Everything that changes in training (the teacher's weights are not here)."""

  step: Array  # int32 []
  rng: Array  # uint32 [2], the run's step key: update n uses fold_in(rng, n - 1)
  params: dict  # {"lora": LoRA factors, "unfolded": {"log_lam" [N*K], "log_t_delta" [N*K]}}
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  nonfinite_count: Array  # int32 []
  nonfinite_streak: Array  # int32 []


@dataclasses.dataclass(frozen=True)
class UD2MStepConfig:
  """Static settings of the UD2M step and sampler (hashable; built once from the config)."""

  num_outer: int
  num_inner: int
  timesteps: tuple[int, ...]  # DDPM times of the outer steps, decreasing
  sigma_y: float
  eta: float
  xt_likelihood: bool
  init: str  # "previous" or "backproject"
  lora_scale: float
  weighting: str  # "eps" or "x0"
  mse_weight: float
  perceptual_weight: float
  adversarial_weight: float
  disc_conditional: bool
  r1_gamma: float

  @classmethod
  def from_config(cls, config, sigma_y: float) -> UD2MStepConfig:
    s, w = config.sampler, config.loss
    return cls(
      num_outer=int(s.num_outer),
      num_inner=int(s.num_inner),
      timesteps=tuple(int(t) for t in s.timesteps),
      sigma_y=float(sigma_y),
      eta=float(s.eta),
      xt_likelihood=bool(s.xt_likelihood),
      init=str(s.init),
      lora_scale=float(config.lora.scale),
      weighting=str(w.weighting),
      mse_weight=float(w.mse_weight),
      perceptual_weight=float(w.perceptual_weight),
      adversarial_weight=float(w.adversarial_weight),
      disc_conditional=bool(config.disc.conditional),
      r1_gamma=float(config.disc.r1_gamma),
    )


@dataclasses.dataclass
class UD2MSetup:
  """Everything built from a config before the first step (the step reads only `step_cfg` and the modules)."""

  config: ml_collections.ConfigDict
  teacher: Teacher
  operator: ops.LinearOperator
  operator_name: str
  operator_settings: dict
  sigma_y: float
  image_shape: tuple[int, int, int]
  tx: optax.GradientTransformation
  disc: disc_lib.Discriminator
  tx_disc: optax.GradientTransformation
  features: Callable[[Any, Array], Array] | None
  feature_params: Any
  step_cfg: UD2MStepConfig

  @property
  def timesteps(self) -> tuple[int, ...]:
    return self.step_cfg.timesteps

  def denoiser(self, base, lora_params) -> Callable:
    """The LoRA-adapted teacher `(x, sigma, labels) -> D` (base weights behind stop_gradient)."""
    params = lora_lib.merge(base, lora_params, self.step_cfg.lora_scale, stop_base_grad=True)
    return lambda x, sigma, labels=None: self.teacher.apply(params, x, sigma, labels)

  def restore(self, base, params, y, rng) -> Array:
    """The full N x K sampler with the current adapter: `y -> x0 [B, H, W, C]`."""
    s = self.step_cfg
    return unfolded_sample(
      self.denoiser(base, params["lora"]),
      self.operator,
      y,
      rng,
      params["unfolded"],
      s.num_outer,
      s.num_inner,
      s.sigma_y,
      s.timesteps,
      s.eta,
      xt_likelihood=s.xt_likelihood,
      init=s.init,
    )


def _eval_config(config):
  """`config.eval`, or the `restoration` evaluator's defaults when the config has none."""
  return config.get("eval") or {"evaluator": "restoration"}


def validate(config) -> None:
  """Semantic checks of a UD2M config (one line naming the field on failure)."""
  validate_common(config)
  name = _eval_config(config).get("evaluator") or ""
  if not name or registry.kind(name) != "restoration":
    raise ConfigError("eval.evaluator", f"UD2M needs an evaluator of the restoration kind, got {name!r}")

  def req(cond, field, msg):
    if not cond:
      raise ConfigError(field, msg)

  req(config.task in export_lib.TASKS, "task", f"unknown task {config.task!r}; known: {sorted(export_lib.TASKS)}")
  req(config.sigma_y >= 0, "sigma_y", f"must be >= 0, got {config.sigma_y}")
  s = config.sampler
  req(s.num_outer >= 1 and s.num_inner >= 1, "sampler.num_outer", "num_outer and num_inner must be >= 1")
  req(len(s.timesteps) == s.num_outer, "sampler.timesteps", f"needs {s.num_outer} times, got {tuple(s.timesteps)}")
  req(all(0 <= t < 1000 for t in s.timesteps), "sampler.timesteps", "DDPM times must be in [0, 1000)")
  req(list(s.timesteps) == sorted(s.timesteps, reverse=True), "sampler.timesteps", "must decrease")
  req(0 <= s.eta <= 1, "sampler.eta", f"must be in [0, 1], got {s.eta}")
  req(s.init in ("previous", "backproject"), "sampler.init", "must be 'previous' or 'backproject'")
  req(0 < s.t_delta_min <= s.t_delta_max, "sampler.t_delta_min", "need 0 < t_delta_min <= t_delta_max")
  req(config.lora.rank >= 1, "lora.rank", f"must be >= 1, got {config.lora.rank}")
  req(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
  req(config.disc.lr > 0, "disc.lr", f"must be > 0, got {config.disc.lr}")
  req(config.loss.weighting in ("eps", "x0"), "loss.weighting", "must be 'eps' or 'x0'")
  kinds = ("none", *PERCEPTUAL)
  req(config.perceptual.kind in kinds, "perceptual.kind", f"unknown {config.perceptual.kind!r}; known: {kinds}")
  req(config.teacher.kind == "checkpoint", "teacher.kind", "UD2M needs a network teacher ('checkpoint')")
  req(bool(config.teacher.checkpoint), "teacher.checkpoint", "no teacher checkpoint directory given")
  path = teachers.resolve_path(config.teacher.checkpoint)
  req(paths.isdir(path), "teacher.checkpoint", f"teacher checkpoint not found: {config.teacher.checkpoint}")


def make_optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(sampler optimizer over {"base", "lora", "unfolded"}, discriminator optimizer)."""
  o = config.optim

  def adamw(lr):
    tx = optax.adamw(lr, o.b1, o.b2, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip > 0 else tx

  labels = lambda tree: {k: jax.tree.map(lambda _, k=k: "frozen" if k == "base" else k, v) for k, v in tree.items()}
  tx = optax.multi_transform(
    {"lora": adamw(o.lr), "unfolded": adamw(o.lr * o.unfolded_lr_mult), "frozen": optax.set_to_zero()}, labels
  )
  d = config.disc
  tx_disc = optax.adamw(d.lr, d.b1, d.b2, weight_decay=d.weight_decay)
  return tx, tx_disc


def build_setup(config, teacher: Teacher | None = None) -> UD2MSetup:
  teacher = teachers.from_config(config.teacher) if teacher is None else teacher
  shape = tuple(teacher.data_shape)
  if len(shape) != 3:
    raise ConfigError("teacher.checkpoint", f"UD2M needs an image teacher [H, W, C], got data shape {shape}")
  d = config.data
  if (d.resolution, d.resolution, d.channels) != shape:
    raise ConfigError(
      "data.resolution",
      f"data {d.resolution}x{d.resolution}x{d.channels} does not match the teacher's {shape} "
      "(set data.resolution / data.channels)",
    )
  if teacher.num_classes:
    raise ConfigError("teacher.checkpoint", "class-conditional teachers are not supported by UD2M here")
  overrides = {**config.operator.to_dict(), "sigma_y": config.sigma_y}
  try:
    name, settings, sigma_y = export_lib.task_operator(config.task, shape, overrides)
  except ValueError as e:
    raise ConfigError("operator", str(e)) from e
  tx, tx_disc = make_optimizers(config)
  features, feature_params = None, None
  if config.perceptual.kind != "none" and config.loss.perceptual_weight > 0:
    features, feature_params = PERCEPTUAL[config.perceptual.kind](config.perceptual)
  disc = disc_lib.Discriminator(config.disc.width, config.disc.levels)
  op = ops.make_operator(name, shape, **settings)
  step_cfg = UD2MStepConfig.from_config(config, sigma_y)
  return UD2MSetup(
    config, teacher, op, name, settings, sigma_y, shape, tx, disc, tx_disc, features, feature_params, step_cfg
  )


def init_state(setup: UD2MSetup, key: Array, rng: Array, base=None) -> UD2MState:
  """Fresh state: zero-effect LoRA (B = 0), the default block parameters, a fresh critic.

  `key` draws the LoRA and critic initialisations; `rng` (uint32 [2]) is stored as the run's step
  key. `base` is the teacher's parameter tree (default `setup.teacher.params`; pass it as an
  argument under jit so that it is not captured as a constant).
  """
  c = setup.config
  base = setup.teacher.params if base is None else base
  k_lora, k_disc = jax.random.split(key)
  lora_params = lora_lib.init_lora(k_lora, base, c.lora.rank, tuple(c.lora.targets))
  s = c.sampler
  unfolded = default_unfolded_params(s.num_outer, s.num_inner, s.t_delta_max, s.t_delta_min, s.lam_over_t_delta_sq)
  params = {"lora": lora_params, "unfolded": unfolded}
  opt_state = setup.tx.init({"base": base, **params})
  d_in = setup.image_shape[:2] + (setup.image_shape[2] * (2 if c.disc.conditional else 1),)
  disc_params = setup.disc.init(k_disc, jnp.zeros((1, *d_in)))["params"]
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
  rng = jnp.array(rng, jnp.uint32)  # a copy: the state is donated
  return UD2MState(zero(), rng, params, opt_state, disc_params, setup.tx_disc.init(disc_params), zero(), zero())


def _tree_norm(tree) -> Array:
  return optax.tree.norm(tree)


def make_train_step(setup: UD2MSetup, batch_sharding=None) -> Callable:
  """`step(state, base, feature_params, images [B, H, W, C]) -> (state, metrics)`; pure, jittable.

  The step reads the static parts of `setup` only (`step_cfg`, the operator, the networks' apply
  functions, the optimizers), never its config or weights: the teacher's weights, the feature
  network's and the step key (`state.rng`) all come in through the arguments.
  """
  cfg = setup.step_cfg

  def sampler_loss(full, disc_params, feature_params, x, key):
    denoise = setup.denoiser(full["base"], full["lora"])
    mse, aux = unfolded_training_loss(
      denoise,
      setup.operator,
      x,
      key,
      full["unfolded"],
      cfg.num_outer,
      cfg.num_inner,
      cfg.sigma_y,
      cfg.timesteps,
      xt_likelihood=cfg.xt_likelihood,
      weighting=cfg.weighting,
    )  # [B]
    x0 = aux["x0_hat"]  # [B, H, W, C]
    cond = setup.operator.backproject(aux["y"]) if cfg.disc_conditional else None
    logits = setup.disc.apply({"params": disc_params}, disc_lib.discriminator_input(x0, cond))  # [B]
    adv = disc_lib.generator_adversarial_loss(logits)  # [B]
    if setup.features is not None:
      f_hat, f_ref = setup.features(feature_params, x0), setup.features(feature_params, x)  # [B, F]
      perc = jnp.mean((f_hat - jax.lax.stop_gradient(f_ref)) ** 2, axis=-1)  # [B]
    else:
      perc = jnp.zeros_like(mse)
    total = cfg.mse_weight * mse.mean() + cfg.perceptual_weight * perc.mean() + cfg.adversarial_weight * adv.mean()
    terms = {
      "loss/total": total,
      "loss/mse": mse.mean(),
      "loss/perceptual": perc.mean(),
      "loss/adversarial": adv.mean(),
    }
    return total, (terms, x0, aux["y"])

  def step(state: UD2MState, base, feature_params, x):
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
    k_loss, _ = jax.random.split(key)
    full = {"base": base, **state.params}
    # Differentiate the trainable leaves only: the frozen base is a constant, so the backward
    # pass forms no weight gradients for it by construction (rather than relying on XLA to drop
    # unused ones). The optimizer still sees the whole tree, the base masked to zero.
    trainable_loss = lambda p: sampler_loss({"base": base, **p}, state.disc_params, feature_params, x, k_loss)
    g_trainable, (terms, x0, y) = jax.grad(trainable_loss, has_aux=True)(state.params)
    grads = {"base": jax.tree.map(jnp.zeros_like, base), **g_trainable}
    updates, opt_state = setup.tx.update(grads, state.opt_state, full)
    params = optax.apply_updates(state.params, {k: updates[k] for k in state.params})  # the base update is unused

    cond = setup.operator.backproject(y) if cfg.disc_conditional else None
    x0 = jax.lax.stop_gradient(x0)

    def critic_loss(dp):
      apply = lambda z: setup.disc.apply({"params": dp}, disc_lib.discriminator_input(z, cond))
      return disc_lib.discriminator_loss(apply, x, x0, cfg.r1_gamma)

    (d_loss, d_metrics), d_grads = jax.value_and_grad(critic_loss, has_aux=True)(state.disc_params)
    d_updates, disc_opt_state = setup.tx_disc.update(d_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)

    ok = jnp.isfinite(terms["loss/total"]) & all_finite(g_trainable) & jnp.isfinite(d_loss) & all_finite(d_grads)
    new = state.replace(params=params, opt_state=opt_state, disc_params=disc_params, disc_opt_state=disc_opt_state)
    new_state, guard_metrics = guarded_update(ok, new, state)
    lam = jnp.exp(state.params["unfolded"]["log_lam"])
    t_delta = jnp.exp(state.params["unfolded"]["log_t_delta"])
    metrics = {
      **terms,
      "loss/disc": d_loss,
      **d_metrics,
      "grad_norm/lora": _tree_norm(grads["lora"]),
      "grad_norm/unfolded": _tree_norm(grads["unfolded"]),
      "grad_norm/disc": _tree_norm(d_grads),
      "param_norm/lora": _tree_norm(state.params["lora"]),
      "unfolded/lam_mean": lam.mean(),
      "unfolded/t_delta_first": t_delta[0],
      "unfolded/t_delta_last": t_delta[-1],
      **guard_metrics,
    }
    return new_state, metrics

  return step


def arg_shardings(setup: UD2MSetup, mesh) -> tuple:
  """Shardings of the step's extra arguments `(base, feature_params)`: FSDP rules, features replicated."""
  rep = parallel.replicated(mesh)
  return parallel.tree_shardings(setup.teacher.params, mesh), jax.tree.map(lambda _: rep, setup.feature_params)


def config_fingerprint(config, setup: UD2MSetup) -> dict:
  """What must match between a checkpoint and the run that restores it."""
  return {
    "teacher": setup.teacher.spec,
    "task": {"operator": setup.operator_name, "settings": setup.operator_settings},
    "lora": {"rank": config.lora.rank, "targets": list(config.lora.targets)},
    "sampler": {"num_outer": config.sampler.num_outer, "num_inner": config.sampler.num_inner},
    "disc": {"width": config.disc.width, "levels": config.disc.levels, "conditional": config.disc.conditional},
    # The step key lives in the state: checkpoints written before it did are refused with this
    # field named, rather than failing to restore and being moved aside as unreadable.
    "step_key": "state.rng",
  }


class Evaluator:
  """PSNR/SSIM of the full sampler on held-out images, and a clean / observed / restored grid."""

  def __init__(self, setup: UD2MSetup, key: Array, mesh):
    from emd_jax.data import pipeline

    c = setup.config
    images = pipeline.load_arrays(c.data, c.eval_split)["image"][: c.eval_num_samples]
    self.clean = jnp.asarray(images, jnp.float32)  # [E, H, W, C]
    self.y = setup.operator.observe(jax.random.fold_in(key, 0), self.clean, setup.sigma_y)
    self.key = jax.random.fold_in(key, 1)
    self.batch = c.eval_batch_size
    self.setup = setup
    self.mesh = mesh
    self._restore = jax.jit(setup.restore)
    # PSNR / SSIM (and PSNR of A^T y) from the registry's `restoration` evaluator, or the
    # restoration-kind evaluator a config names in `eval.evaluator` (checked by `validate`).
    self.metrics = registry.build(_eval_config(c))

  def _place(self, y: Array) -> Array:
    """Batches that split evenly go on the mesh's data axes (the sampler then runs sharded)."""
    n = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    return jax.device_put(y, parallel.batch_sharding(self.mesh)) if y.shape[0] % n == 0 else y

  def __call__(self, base, params) -> tuple[dict, dict]:
    out = [
      self._restore(base, params, self._place(self.y[i : i + self.batch]), jax.random.fold_in(self.key, i))
      for i in range(0, self.y.shape[0], self.batch)
    ]
    restored = jnp.concatenate(out)
    observed = self.setup.operator.backproject(self.y)
    scalars = {f"eval/{k}": v for k, v in self.metrics(restored, self.clean, observed).items()}
    return scalars, {"restoration": restoration_grid(self.clean, observed, restored)}


def restoration_grid(clean, observed, restored, num: int = 8, scale: int = 4) -> np.ndarray:
  """uint8 `[1, 3*(H+1)+1, num*(W+1)+1, C]` x scale: rows clean, observed, restored."""
  from emd_jax.evaluators.grids import image_grid

  n = min(num, clean.shape[0])
  rows = np.concatenate([np.clip(np.asarray(a[:n]), -1, 1) for a in (clean, observed, restored)])
  grid = image_grid(rows, ncols=n)
  return grid.repeat(scale, 0).repeat(scale, 1)[None]


def export(config, setup: UD2MSetup, state: UD2MState, workdir: str) -> str:
  s = config.sampler
  return export_lib.write_sampler(
    os.path.join(workdir, "export"),
    teacher_path=config.teacher.checkpoint,
    teacher_info=setup.teacher.spec,
    copy_teacher=config.copy_teacher,
    lora_params=state.params["lora"],
    lora_meta={"rank": config.lora.rank, "scale": config.lora.scale, "targets": list(config.lora.targets)},
    unfolded=state.params["unfolded"],
    task={
      "task": config.task,
      "operator": setup.operator_name,
      "settings": setup.operator_settings,
      "sigma_y": setup.sigma_y,
      "image_shape": list(setup.image_shape),
    },
    sampler={
      "num_outer": s.num_outer,
      "num_inner": s.num_inner,
      "nfe": s.num_outer * s.num_inner,
      "timesteps": list(setup.timesteps),
      "eta": s.eta,
      "xt_likelihood": s.xt_likelihood,
      "init": s.init,
    },
    extra={"step": int(state.step), "config": config.to_dict()},
  )


def make_job(config, setup: UD2MSetup, workdir: str) -> runner.Job:
  """UD2M as a `runner.Job`: the frozen base and the feature network's weights are the step's arguments."""
  from emd_jax.data import pipeline

  k_state, k_eval, k_step = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  init = lambda base: init_state(setup, k_state, k_step, base)  # noqa: E731

  def batches(start: int):
    it = pipeline.make_train_iterator(
      config.data, config.seed, start, config.batch_size, jax.process_index(), jax.process_count()
    )
    return (batch["image"] for batch in it)

  def make_evaluate(mesh, args):
    evaluator, base = Evaluator(setup, k_eval, mesh), args[0]
    return lambda st, step: evaluator(base, st.params)

  def export_fn(st: UD2MState, _last_eval: dict) -> dict:
    metrics_lib.log_line(f"exported UD2M sampler to {export(config, setup, st, workdir)}")
    return {}

  return runner.Job(
    abstract_state=jax.eval_shape(init, setup.teacher.params),
    init=init,
    init_inputs=lambda: (setup.teacher.params,),
    make_step=lambda mesh: make_train_step(setup, parallel.batch_sharding(mesh)),
    fingerprint=config_fingerprint(config, setup),
    args=(setup.teacher.params, setup.feature_params),
    arg_shardings=lambda mesh: arg_shardings(setup, mesh),
    batches=batches,
    make_evaluate=make_evaluate,
    export=export_fn if config.export_at_end else None,
    console_keys=("loss/total", "loss/mse", "loss/disc"),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, teacher: Teacher | None = None) -> dict:
  """Trains the UD2M sampler; resumes from `workdir`; returns the last evaluation, `step` and `state`."""
  config = ml_collections.ConfigDict(config)  # private, unlocked copy
  validate(config)
  setup = build_setup(config, teacher)  # loads and checks the teacher: a bad one leaves no workdir behind
  return runner.run_job(make_job(config, setup, workdir), config, workdir)

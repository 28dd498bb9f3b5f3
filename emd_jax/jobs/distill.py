"""The distillation job: teacher and state in, steps, evaluation, export (`runtime.runner` runs it).

`train_and_evaluate(config, workdir)` is what `python -m emd_jax.main` runs
for `config.job == "distill"`; notebooks and tests call it directly.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from emd_jax import nets, teachers
from emd_jax.config.validation import ConfigError, validate_distill
from emd_jax.diffusion import Schedule, noise_dist_from_config, student_sample, student_sigmas
from emd_jax.distill import adversarial, latent_mean
from emd_jax.distill import step as step_lib
from emd_jax.distill.losses import LossSpec
from emd_jax.distill.state import DistillState, create_state
from emd_jax.distill.step import StepConfig, make_train_step
from emd_jax.formats import generator_export as export_lib
from emd_jax.formats import paths
from emd_jax.runtime import fsdp, parallel, runner
from emd_jax.runtime import logs as metrics_lib
from emd_jax.runtime.loop import TrainingError  # noqa: F401  (re-exported for callers)
from emd_jax.teachers.base import Teacher
from emd_jax.teachers.network import with_compute_dtype
from emd_jax.training.ema import parse_ema_tracks
from emd_jax.training.optimizer import make_optimizer


@dataclasses.dataclass
class DistillSetup:
  """Everything built from a config before the first step."""

  teacher: Teacher
  net_spec: dict
  module: object
  step_cfg: StepConfig
  tx_gen: object
  tx_fake: object
  evaluator: object = None  # built once from config.eval (evaluators.registry); None: no scores
  gather: str = "per_layer"  # config.mesh.gather (runtime.fsdp)
  tx_disc: object = None  # the adversarial head's optimizer (adv.head_lr); None: tx_fake

  def net_apply(self, params, x, sigma, labels=None):
    return self.module.apply({"params": params}, x, sigma, labels)

  def net_features(self, params, x, sigma, labels=None):
    """The student architecture's encoder features (`nets.features_apply`), the discriminator's input."""
    return nets.features_apply(self.module, params, x, sigma, labels)

  def disc_apply(self):
    """The adversarial term's discriminator on the fake network, or None when the term is off."""
    adv = self.step_cfg.adv
    return (
      adversarial.make_disc_apply(self.net_features, adv.head_hidden, adv.head_readout, adv.features)
      if adv.on
      else None
    )


def student_spec(config, teacher: Teacher) -> dict:
  """The generator / fake-denoiser architecture: the teacher's own when it is a network.

  `config.compute_dtype` (e.g. "bfloat16") sets the activation dtype; parameters and
  optimizer state stay float32. `build_setup` builds a network teacher with the same dtype
  (`teachers.network.with_compute_dtype`).
  """
  if teacher.spec.get("kind") == "network":
    spec = dict(teacher.spec["net"])
    if config.get("compute_dtype"):
      spec["dtype"] = config.compute_dtype
    return spec
  spec = dict(config.net)
  if config.get("compute_dtype"):
    spec["dtype"] = config.compute_dtype
  if spec["arch"] == "mlp":
    if len(teacher.data_shape) != 1:
      raise ValueError(f"net.arch 'mlp' needs vector data, the teacher's data shape is {teacher.data_shape}")
    spec.update(dim=teacher.data_shape[0], num_classes=teacher.num_classes, sigma_data=teacher.sigma_data)
  return spec


def init_score_gap(setup: DistillSetup, batch: int = 2, seed: int = 0) -> float:
  """Health check of matched precision: the RMS of `D_fake - D_teacher` per dimension at step 0.

  For a network teacher the fake denoiser starts as a copy of the teacher, so with the two
  computing in one dtype this is exactly 0; a nonzero value means the networks differ in dtype
  (the score gap that drives every method would be round-off). Run once before training, on
  `batch` noisy inputs at noise levels 0.5 and 2 (unconditional for a guided teacher, whose
  conditional output is the guided mixture). Returns NaN for an analytic teacher.
  """
  teacher = setup.teacher
  if teacher.spec.get("kind") != "network":
    return float("nan")
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (batch, *teacher.data_shape))
  sigma = jnp.geomspace(0.5, 2.0, batch)
  x = x * sigma.reshape((batch,) + (1,) * len(teacher.data_shape))
  labels = None
  if teacher.num_classes and not teacher.spec.get("guidance_applied"):  # a guided teacher: compare unconditionally
    labels = jax.nn.one_hot(jax.random.randint(k2, (batch,), 0, teacher.num_classes), teacher.num_classes)

  @jax.jit
  def gap(p):
    fake = setup.net_apply(p, x, sigma, labels).astype(jnp.float32)
    d = fake - teacher.apply(p, x, sigma, labels).astype(jnp.float32)
    return jnp.sqrt(jnp.mean(d**2))

  return float(gap(teacher.params))


def build_setup(
  config, teacher: Teacher | None = None, measure_correction: bool = True, workdir: str | None = None
) -> DistillSetup:
  """Teacher, student network, step config, optimizers and evaluator for a distillation config.

  With `mean_correction.mode` on, the teacher's first-moment error is measured on its own samples
  here (one sampling run); `measure_correction=False` (tools that never call the teacher, e.g. the
  checkpoint sweep) only marks the teacher's spec so that the run's fingerprint matches; `workdir`
  keeps the measured table (`_mean_corrected`).
  """
  teacher = teachers.from_config(config.teacher) if teacher is None else teacher
  # The teacher computes in the student's dtype: at step 0 (fake = teacher) the score gap is exactly 0.
  teacher = with_compute_dtype(teacher, config.get("compute_dtype"))
  teacher = _mean_corrected(config, teacher, measure_correction, workdir)
  spec = student_spec(config, teacher)
  module = nets.build(spec)
  loss = LossSpec(
    name=config.loss.name,
    distance=config.loss.distance,
    weight=config.loss.weight,
    huber_c=config.loss.huber_c,
    huber_delta=config.loss.huber_delta,
    power=config.loss.power,
    sid_alpha=config.loss.sid_alpha,
  )
  gen_sigmas = student_grid(config)
  step_cfg = StepConfig(
    batch_size=config.batch_size,
    data_shape=tuple(teacher.data_shape),
    sigma_init=config.generator.sigma_init,
    sigma_data=teacher.sigma_data,
    num_classes=teacher.num_classes,
    schedule=Schedule(config.schedule),
    gen_noise=noise_dist_from_config(config.loss.noise),
    fake_noise=noise_dist_from_config(config.fake.noise),
    loss=loss,
    estep_steps=config.estep.num_steps,
    gamma_eps=config.estep.gamma_eps,
    gamma_z=config.estep.gamma_z,
    gamma_z_scaling=config.estep.gamma_z_scaling,
    noise_cancellation=config.estep.noise_cancellation,
    fake_steps=config.fake.steps_per_gen_step,
    fake_loop=config.fake.get("loop", "auto"),
    ema_decay=config.generator.ema_decay,
    ema_debias=config.generator.get("ema_debias", False),
    ema_tracks=parse_ema_tracks(config.generator.get("ema_tracks", "")),
    grad_accum_steps=config.get("grad_accum_steps", 1),
    keep_gen_pass=bool(config.get("keep_generator_pass", True)),
    remat=config.get("remat", "none"),
    gen_sigmas=gen_sigmas if len(gen_sigmas) > 2 else (),
    gen_backprop=bool(config.generator.get("backprop_steps", False)),
    gen_train_step=config.generator.get("train_step", "last"),
    draws=config.get("draws", "iid"),
    adv=adv_spec(config),
    latent_shift=latent_mean.as_tuple(_latent_mean(config, teacher, workdir)),
  )
  tx_gen = make_optimizer(config.generator, config.total_steps)
  tx_fake = make_optimizer(config.fake, config.total_steps)
  evaluator = build_evaluator(config, teacher)
  return DistillSetup(
    teacher, spec, module, step_cfg, tx_gen, tx_fake, evaluator, fsdp.gather_mode(config), disc_optimizer(config)
  )


MEAN_CORRECTION_FILE = "mean_correction.npz"


def _from_process_zero(tree):
  """Process 0's float32 leaves on every process: the values compiled into the step. Other leaves keep
  each process's own (a broadcast would round float64 to float32): the config's echoes and counts, the
  same everywhere, and the mean-correction table's float64 noise floor, which is only logged."""
  sent = multihost_utils.broadcast_one_to_all(tree)
  return jax.tree.map(lambda mine, got: np.asarray(got) if np.asarray(mine).dtype == np.float32 else mine, tree, sent)


def _measured_once(config, workdir, filename: str, source: str, salt: int, load, compute, save):
  """A quantity measured once per run: read from `source` if given, else from `workdir/filename` (a resumed
  run: exactly what it started with), else `compute(key, batch_size)` from the run's seed and `salt`, then
  written there. Returns `(value, how)`, `how` saying where it came from for the setup log."""
  saved = os.path.join(workdir, filename) if workdir else None
  several = jax.process_count() > 1
  if not source and saved:
    found = paths.exists(saved)
    if several:  # process 0's view for all: every process reads, or every process computes (no deadlock)
      found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
    source = saved if found else ""
  if source:
    return load(source), f"read from {source}"
  t0 = time.perf_counter()
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), salt)
  value, how = compute(key, config.get("eval", {}).get("batch_size", 500))
  if several:  # one value for all processes (it is compiled into the step), and one writer
    value = _from_process_zero(value)
  if saved and jax.process_index() == 0:
    paths.makedirs(workdir)
    save(saved, value)
  return value, f"{how}, in {time.perf_counter() - t0:.1f} s"


def _latent_mean(config, teacher: Teacher, workdir: str | None) -> np.ndarray | None:
  """The generator's input centre `mu` for `generator.latent_mean` (distill/latent_mean.py); None for "zero".

  Read from `workdir`'s `latent_mean.npy` when there (a resumed run: exactly the `mu` it started with), else
  computed by the Tweedie fixed point on the teacher at `sigma_init` and written there.
  """
  g = config.generator
  if g.get("latent_mean", "zero") == "zero":
    return None
  shape = tuple(teacher.data_shape)
  n, iters = g.get("latent_mean_samples", 2048), g.get("latent_mean_iters", 4)

  def compute(key, batch):
    mu, changes = latent_mean.tweedie_fixed_point(
      teacher.denoise, shape, g.sigma_init, key, n, iters, batch, teacher.num_classes
    )
    return mu, f"Tweedie fixed point on {n} draws, {iters} iterations, changes {', '.join(f'{c:.3g}' for c in changes)}"

  mu, how = _measured_once(
    config, workdir, latent_mean.FILE, "", 0x1A7E, lambda path: latent_mean.load(path, shape), compute, latent_mean.save
  )
  metrics_lib.log_line(
    f"generator.latent_mean: g(z) = D(mu + z, {g.sigma_init}) with |mu| = {np.linalg.norm(mu):.3g}, "
    f"mean {mu.mean():.3g} ({how})"
  )
  return mu


def _mean_corrected(config, teacher: Teacher, measure: bool, workdir: str | None) -> Teacher:
  """The teacher with its first-moment error removed when `mean_correction.mode` asks for it.

  The table comes from `mean_correction.table` if set, else from `workdir`'s `mean_correction.npz`
  (a resumed run: exactly the table it started with), else it is measured here and written there.
  """
  mc = config.get("mean_correction")
  if mc is None or mc.mode == "none":
    return teacher
  from emd_jax.teachers import mean_correction

  if teacher.num_classes:
    raise ConfigError(
      "mean_correction.mode", "is measured unconditionally: not for a class-conditional teacher (use 'none')"
    )
  if not measure:
    return dataclasses.replace(teacher, spec=mean_correction.marked_spec(teacher.spec))
  shape = tuple(teacher.data_shape)

  def compute(key, batch):
    tab = mean_correction.measure(teacher, key, mc.num_samples, mc.heun_steps, mc.sigmas, batch_size=batch)
    return tab, f"measured on {mc.num_samples} of its Heun-{mc.heun_steps} samples"

  tab, how = _measured_once(
    config,
    workdir,
    MEAN_CORRECTION_FILE,
    mc.get("table", ""),
    0x7EED1E,
    lambda path: mean_correction.load_table(path, shape),
    compute,
    mean_correction.save_table,
  )
  metrics_lib.log_line(
    f"mean_correction: the teacher's first-moment error ({how}), by sigma: {mean_correction.summary(tab)}"
  )
  return mean_correction.with_mean_correction(teacher, tab["sigmas"], tab["table"])


def disc_optimizer(config):
  """The adversarial head's optimizer: the fake denoiser's (`config.fake`) at `adv.head_lr`; None (the fake's
  own, `tx_fake`) when the term is off or `adv.head_lr` is unset."""
  adv = config.get("adv")
  head_lr = None if adv is None else adv.get("head_lr")
  if head_lr is None or not adv_spec(config).on:
    return None
  cfg = ml_collections.ConfigDict(config.fake.to_dict())
  cfg.lr = float(head_lr)
  return make_optimizer(cfg, config.total_steps)


def adv_spec(config) -> adversarial.AdvSpec:
  """The adversarial term's settings (`loss.adv_weight`, `fake.adv_weight`, `adv.*`); all off when absent."""
  gen_w = float(config.loss.get("adv_weight") or 0.0)
  disc_w = float(config.fake.get("adv_weight") or 0.0)
  if not (gen_w or disc_w):
    return adversarial.AdvSpec()
  adv = config.adv
  return adversarial.AdvSpec(
    gen_weight=gen_w,
    disc_weight=disc_w,
    r1_weight=float(adv.r1_weight),
    sigma=noise_dist_from_config(adv.sigma),
    head_hidden=int(adv.head_hidden),
    head_readout=str(adv.get("head_readout") or "mean"),
    features=str(adv.get("features") or "shared"),
    start_step=int(adv.get("start_step") or 0),
  )


def real_batches(config, setup: DistillSetup, start: int):
  """This process' real batches for steps `start + 1, ...` (the adversarial term's data), exactly resumable.

  Image data: `data.pipeline.make_train_iterator(config.data, ...)` (as the teacher job). `data.name
  = 'gmm'`: `data.num_examples` samples of the analytic teacher (drawn once from `config.seed`), read
  by the same index sequence (`pipeline.global_batch_indices`). The first batch's shape is checked
  against the teacher's data shape.
  """
  from emd_jax.config.validation import ConfigError
  from emd_jax.data import pipeline

  pi, pc = jax.process_index(), jax.process_count()
  if config.data.name == "gmm":
    from emd_jax.teachers import gmm

    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 17)
    x = np.asarray(gmm.sample(setup.teacher.params, key, config.data.num_examples)[0], np.float32)
    local = pipeline._local_slice(config.batch_size, pi, pc)
    it = pipeline._in_memory_iterator({"image": x}, config.seed, start, config.batch_size, local)
  else:
    it = pipeline.make_train_iterator(config.data, config.seed, start, config.batch_size, pi, pc)
  first = next(it)
  want = tuple(setup.teacher.data_shape)
  if tuple(first["image"].shape[1:]) != want:
    raise ConfigError("data", f"real images have shape {tuple(first['image'].shape[1:])}, the teacher's data {want}")
  k = setup.teacher.num_classes
  if k and first["label"].shape[-1] != k:
    raise ConfigError("data.num_classes", f"labels of width {first['label'].shape[-1]}, the teacher has {k} classes")

  def chain():
    yield first
    yield from it

  return chain()


def with_disc(setup: DistillSetup, state: DistillState, key) -> DistillState:
  """`state` with the adversarial term's discriminator head and its fake-optimizer state (term off: `state`)."""
  adv = setup.step_cfg.adv
  if not adv.on:
    return state
  t = setup.teacher
  head = adversarial.init_head(
    key,
    setup.net_features,
    state.fake_params,
    t.data_shape,
    t.num_classes,
    adv.head_hidden,
    adv.head_readout,
    adv.features,
  )
  return state.replace(disc_params=head, disc_opt_state=(setup.tx_disc or setup.tx_fake).init(head))


def student_grid(config) -> tuple[float, ...]:
  """The student's levels `(sigma_0 = sigma_init, ..., sigma_{N-1}, 0.0)`: `generator.sigmas` or the default grid."""
  g = config.generator
  if tuple(g.get("sigmas", ()) or ()):
    return tuple(float(s) for s in g.sigmas)
  return student_sigmas(g.get("num_steps", 1), g.sigma_init, g.get("sigma_min", 0.2))


def build_evaluator(config, teacher: Teacher):
  """The run's evaluator, built once (its files read and checked here, before any compute).

  The analytic GMM teacher is scored by the exact mixture figures (`gmm`); image teachers by
  `config.eval.evaluator` (default `digits`); other vector teachers get no scores.
  """
  from emd_jax.evaluators import registry

  if teacher.spec.get("kind") == "gmm":
    return registry.build({"evaluator": "gmm"}, teacher=teacher)
  if len(teacher.data_shape) == 3:
    return registry.build(_eval_cfg(config))
  return None


def initial_student_params(config, setup: DistillSetup, rng):
  """Teacher weights for a network teacher; a fitted surrogate for an analytic one."""
  teacher = setup.teacher
  if teacher.spec.get("kind") == "network":
    return teacher.params  # `create_state` copies them
  from emd_jax.teachers import gmm
  from emd_jax.teachers.surrogate import fit_surrogate

  k_init, k_fit = jax.random.split(rng)
  x = jnp.zeros((1, *teacher.data_shape))
  labels = jnp.zeros((1, teacher.num_classes)) if teacher.num_classes else None
  params = setup.module.init(k_init, x, jnp.ones((1,)), labels)["params"]
  params, loss = fit_surrogate(
    k_fit,
    setup.net_apply,
    params,
    teacher.apply,
    teacher.params,
    lambda k, n: gmm.sample(teacher.params, k, n)[0],
    steps=config.teacher.surrogate_steps,
    batch_size=config.teacher.surrogate_batch_size,
    lr=config.teacher.surrogate_lr,
    dist=setup.step_cfg.fake_noise,
    sigma_data=teacher.sigma_data,
  )
  logging.info(
    "surrogate of the analytic teacher: %d steps, final weighted loss %.3g", config.teacher.surrogate_steps, float(loss)
  )
  return params


def config_fingerprint(config, setup: DistillSetup) -> dict:
  """What must match between a checkpoint and the run that restores it (the EMA tracks' names, if any)."""
  out = {"net": setup.net_spec, "data_shape": list(setup.teacher.data_shape), "teacher": setup.teacher.spec}
  if setup.step_cfg.ema_tracks:
    out["ema_tracks"] = list(track_names(setup))
  if setup.step_cfg.latent_shift:  # the generator function depends on mu
    out["latent_mean"] = config.generator.latent_mean
  if setup.step_cfg.adv.on:  # the state holds a discriminator head
    out["adv_head_hidden"] = setup.step_cfg.adv.head_hidden
    if setup.step_cfg.adv.head_readout != "mean":  # the head's parameters have another shape
      out["adv_head_readout"] = setup.step_cfg.adv.head_readout
    if setup.step_cfg.adv.features != "shared":  # the discriminator holds its own encoder
      out["adv_features"] = setup.step_cfg.adv.features
  return out


def track_names(setup: DistillSetup) -> tuple[str, ...]:
  """The configured `generator.ema_tracks`, in order (without `ema` and `raw`)."""
  return tuple(t.name for t in setup.step_cfg.ema_tracks)


def generator_params(state: DistillState, name: str = "ema"):
  """The generator parameters called `name`: `ema` (the default EMA), `raw` (not averaged) or an EMA track.

  Raises `UserError` naming the available ones for any other name.
  """
  if name == "ema":
    return state.gen_ema
  if name == "raw":
    return state.gen_params
  if name not in state.gen_ema_tracks:
    from emd_jax.errors import UserError

    known = ", ".join(["raw", "ema", *sorted(state.gen_ema_tracks)])
    raise UserError(f"--ema {name!r}: no such EMA track in this run; it has: {known}")
  return state.gen_ema_tracks[name]


def evaluate(
  config, setup: DistillSetup, params, rng, step: int | None = None, workdir: str | None = None
) -> tuple[dict, dict]:
  """Scalars and images for the current generator (EMA) parameters.

  Image teachers: `eval_num_samples` student samples (balanced classes for a
  conditional teacher) scored by `config.eval.evaluator` (FD to the real data,
  coverage, precision/recall); a grid for TensorBoard, also written as
  `samples_step{step}.png` in `workdir` when both are given.
  """
  n = config.eval_num_samples
  if len(setup.teacher.data_shape) == 3:
    return _evaluate_images(config, setup, params, rng, step, workdir)
  z = setup.step_cfg.sigma_init * jax.random.normal(rng, (n, *setup.teacher.data_shape))
  x = _generate(setup, params, z, rng=jax.random.fold_in(rng, 1))
  if setup.evaluator is None:
    return {}, {}
  from emd_jax.evaluators.gmm import scatter_image

  return setup.evaluator(np.asarray(x)), {"samples": scatter_image(np.asarray(x))[None]}


def _generate(setup: DistillSetup, params, z, labels=None, batch_size: int | None = None, rng=None):
  """Student samples from first inputs `z` in batches of `batch_size` (all at once if None).

  One step: `g(z) = D(mu + z, sigma_init)` (`mu = 0` unless `generator.latent_mean`). A few-step
  student runs its N steps (`diffusion.student_sample`), re-noising with noise drawn from `rng`.
  """
  grid = setup.step_cfg.gen_sigmas or (setup.step_cfg.sigma_init, 0.0)

  def sample(p, x, noise, lab):
    return student_sample(lambda xx, s, lb: setup.net_apply(p, xx, s, lb), x, grid, noise, lab)

  run = jax.jit(sample)
  batch_size = batch_size or z.shape[0]
  out = []
  for i in range(0, z.shape[0], batch_size):
    lab = None if labels is None else labels[i : i + batch_size]
    zi = z[i : i + batch_size]
    noise = None
    if len(grid) > 2:
      noise = jax.random.normal(jax.random.fold_in(rng, i), (len(grid) - 2, *zi.shape))
    out.append(run(params, step_lib.first_input(setup.step_cfg, zi), noise, lab))
  return out[0] if len(out) == 1 else jnp.concatenate(out)


def export(
  config, setup: DistillSetup, state: DistillState, workdir: str, ema: str = "ema", directory: str | None = None
) -> str:
  """Writes `workdir/export` (or `directory`) from the generator parameters `ema` (`generator_params`).

  For the default `ema`, image teachers also get the final grid `samples_step{N}.png`.
  """
  params = generator_params(state, ema)
  path = export_lib.write_export(
    directory or os.path.join(workdir, "export"),
    net_spec=setup.net_spec,
    params=params,
    data_shape=setup.teacher.data_shape,
    sigma_init=setup.step_cfg.sigma_init,
    sigmas=setup.step_cfg.gen_sigmas or None,
    num_classes=setup.teacher.num_classes,
    latent_mean=latent_mean.shift_array(setup.step_cfg.latent_shift, setup.teacher.data_shape),
    config=config.to_dict(),
    extra={"step": int(state.step), "method": config.method, **({} if ema == "ema" else {"ema": ema})},
  )
  if ema == "ema" and len(setup.teacher.data_shape) == 3:
    from emd_jax.evaluators import images as image_eval

    step = int(state.step)
    if not paths.exists(os.path.join(workdir, f"samples_step{step}.png")):  # evaluate() may have written it
      x, _ = _image_samples(
        config, setup, state.gen_ema, jax.random.PRNGKey(config.seed), _eval_cfg(config)["grid_size"]
      )
      image_eval.write_grid(workdir, step, x, num=len(x))
  return path


def abstract_state(setup: DistillSetup, key) -> DistillState:
  """The state's shapes and dtypes, without computing anything."""
  return jax.eval_shape(lambda p: initial_state(setup, key, p), _abstract_params(setup))


def initial_state(setup: DistillSetup, key, params) -> DistillState:
  """The initial state (`create_state`, and the discriminator head when the adversarial term is on)."""
  return with_disc(
    setup, create_state(key, params, setup.tx_gen, setup.tx_fake, track_names(setup)), jax.random.fold_in(key, 1)
  )


def sharded_step(setup: DistillSetup, mesh, abstract: DistillState):
  """The jitted step with explicit shardings and a donated state.

  Returns `(step_fn, state_shardings, teacher_shardings)`. With the adversarial term on, the step
  also takes the real batch, split over the mesh's batch axes: `step_fn(state, teacher_params, batch)`.
  """
  state_sh = parallel.tree_shardings(abstract, mesh)
  teacher_sh = parallel.tree_shardings(setup.teacher.params, mesh)
  batch_sh = parallel.batch_sharding(mesh) if setup.step_cfg.adv.on else None
  step = runner.jit_step(_make_step(setup, mesh), state_sh, (teacher_sh,), batch_sh, mesh=mesh, gather=setup.gather)
  return step, state_sh, teacher_sh


def _make_step(setup: DistillSetup, mesh):
  """The pure step `(state, teacher_params) -> (state, metrics)`, its batch split over `mesh`."""
  return make_train_step(
    setup.step_cfg,
    setup.net_apply,
    setup.teacher.apply,
    setup.tx_gen,
    setup.tx_fake,
    parallel.batch_sharding(mesh),
    setup.disc_apply(),
    setup.tx_disc,
  )


def make_job(config, setup: DistillSetup, workdir: str) -> runner.Job:
  """Distillation as a `runner.Job`: the teacher's parameters are the step's one extra argument."""
  k_state, k_init, k_eval = jax.random.split(jax.random.PRNGKey(config.seed), 3)

  def evaluate_fn(st, step):
    rng = jax.random.fold_in(k_eval, step)
    scalars, images = evaluate(config, setup, st.gen_ema, rng, step=step, workdir=workdir)
    # The same inputs for every track: scalars `eval_<name>/...` and a grid `samples_<name>` each.
    for name in track_names(setup):
      track, track_images = evaluate(config, setup, st.gen_ema_tracks[name], rng)
      scalars = {**scalars, **{f"eval_{name}/{k}": v for k, v in track.items()}}
      images = {**images, **{f"{k}_{name}": v for k, v in track_images.items()}}
    return scalars, images

  def export_fn(st, _last_eval):
    path = export(config, setup, st, workdir)
    metrics_lib.log_line(f"exported generator to {path}")
    return {}

  return runner.Job(
    abstract_state=abstract_state(setup, k_state),
    init=lambda params: initial_state(setup, k_state, params),
    init_inputs=lambda: (initial_student_params(config, setup, k_init),),  # the surrogate fit runs only here
    make_step=lambda mesh: _make_step(setup, mesh),
    fingerprint=config_fingerprint(config, setup),
    args=(setup.teacher.params,),
    batches=(lambda start: real_batches(config, setup, start)) if setup.step_cfg.adv.on else None,
    make_evaluate=lambda mesh, args: evaluate_fn,
    export=export_fn if config.export_at_end else None,
    console_keys=("loss/generator", "loss/fake_dsm", "grad_norm/generator")
    + (("loss/disc", "loss/adv_generator") if setup.step_cfg.adv.on else ()),
    nan_injection=True,  # debug.nan_at_steps: those updates see a NaN teacher
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, teacher: Teacher | None = None) -> dict:
  """Distils the configured teacher; resumes from `workdir` if it holds checkpoints.

  `teacher` overrides the config's teacher section (notebooks, tests).
  Returns the last evaluation's scalars, `step`, and the final `state`.
  """
  config = ml_collections.ConfigDict(config)  # private, unlocked copy
  validate_distill(config)
  setup = build_setup(config, teacher, workdir=workdir)  # loads and checks the teacher first
  if setup.teacher.spec.get("kind") == "network" and not setup.teacher.spec.get("mean_correction"):
    gap = init_score_gap(setup)  # with the mean correction fake and teacher differ at step 0 by design
    metrics_lib.log_line(f"health/score_gap at step 0 (fake = teacher, {config.compute_dtype}): {gap:.3g}")
    if gap != 0.0:
      logging.warning("teacher and fake denoiser disagree at step 0 (score gap %.3g): different compute dtypes?", gap)
  return runner.run_job(make_job(config, setup, workdir), config, workdir)


def _abstract_params(setup: DistillSetup):
  teacher = setup.teacher
  if teacher.spec.get("kind") == "network":
    return teacher.params
  x = jnp.zeros((1, *teacher.data_shape))
  labels = jnp.zeros((1, teacher.num_classes)) if teacher.num_classes else None
  return jax.eval_shape(setup.module.init, jax.random.PRNGKey(0), x, jnp.ones((1,)), labels)["params"]


# ----------------------------------------------------------------------------
# Image evaluation (helpers of `evaluate` and `export`).


def _eval_cfg(config) -> dict:
  """`config.eval` with defaults (configs without an eval section use these)."""
  out = {"evaluator": "digits", "batch_size": 1000, "grid_size": 100}
  out.update(dict(config.get("eval", {}) or {}))
  return out


def _image_samples(config, setup: DistillSetup, params, rng, num: int) -> tuple[np.ndarray, np.ndarray | None]:
  """`num` student images `[num, H, W, C]` and their class labels `[num]` (balanced; None if unconditional)."""
  k = setup.teacher.num_classes
  z = setup.step_cfg.sigma_init * jax.random.normal(rng, (num, *setup.teacher.data_shape))
  labels = np.arange(num) % k if k else None
  onehot = None if labels is None else jax.nn.one_hot(labels, k)
  x = _generate(setup, params, z, onehot, _eval_cfg(config)["batch_size"], jax.random.fold_in(rng, 1))
  return np.asarray(x, np.float32), labels


def _evaluate_images(
  config, setup: DistillSetup, params, rng, step: int | None, workdir: str | None
) -> tuple[dict, dict]:
  from emd_jax.evaluators import images as image_eval

  ecfg = _eval_cfg(config)
  x, labels = _image_samples(config, setup, params, rng, config.eval_num_samples)
  png_dir = workdir if step is not None else None
  return image_eval.evaluate_and_grid(png_dir, step or 0, x, labels, setup.evaluator, ecfg["grid_size"])

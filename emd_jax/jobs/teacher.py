"""Teacher pre-training: an EDM denoiser trained on image data, saved as a teacher.

`train_and_evaluate(config, workdir)` is what `python -m emd_jax.main` runs
for `config.job == "teacher"` (see `configs/teacher_digits.py`):

  * EDM denoising loss (`diffusion.dsm_loss`, lognormal noise levels), Adam,
    an EMA of the weights; class-conditional nets learn the unconditional
    model too through the spec's `label_dropout` (classifier-free guidance);
  * batches from `data.pipeline.make_train_iterator`, resumable: the batches
    from step `s` on equal those of an uninterrupted run, the step key is
    `fold_in(rng, step)`, so a resumed run is bit-identical;
  * one pure jitted step with explicit shardings and a donated state, and the
    non-finite guard of the distillation step (skip, count, `nonfinite/streak`);
  * evaluation every `eval_every` steps: Heun samples of the EMA net scored by
    the configured image evaluator, grids in TensorBoard and `samples_step{N}.png`;
  * at the end the EMA net is written as a teacher directory `workdir/teacher`
    (`teachers.network.save`) with its quality figures in teacher.json.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emd_jax import nets
from emd_jax.config.validation import ConfigError, validate_common
from emd_jax.diffusion import dsm_loss, heun_sample, noise_dist_from_config
from emd_jax.evaluators import registry
from emd_jax.runtime import logs as metrics_lib
from emd_jax.runtime import runner
from emd_jax.teachers.guidance import guided_apply
from emd_jax.training.ema import ema_update, warmup_decay
from emd_jax.training.guard import all_finite, guarded_update
from emd_jax.training.optimizer import make_optimizer, tree_norm

Array = jax.Array


@flax.struct.dataclass
class TeacherState:
  """Everything that changes during teacher training (`rng`: raw base key, uint32 [2])."""

  step: Array  # int32 []
  rng: Array  # uint32 [2]
  params: Any
  opt_state: Any
  ema: Any
  nonfinite_count: Array  # int32 []
  nonfinite_streak: Array  # int32 []


def net_spec(config) -> dict:
  """The denoiser spec from `config.net` (JSON-able; lists, not tuples)."""
  spec = config.net.to_dict()
  for k, v in spec.items():
    if isinstance(v, tuple):
      spec[k] = list(v)
  return spec


def validate_teacher(config) -> None:
  validate_common(config)
  if config.net.get("label_dim", 0) not in (0, config.data.num_classes):
    raise ConfigError("net.label_dim", f"must be 0 or data.num_classes={config.data.num_classes}")
  if not 0 <= config.ema_decay < 1:
    raise ConfigError("ema_decay", f"must be in [0, 1), got {config.ema_decay}")
  if config.guidance < 0:
    raise ConfigError("guidance", f"must be >= 0, got {config.guidance}")
  if config.eval.num_samples < 4:
    raise ConfigError("eval.num_samples", "must be >= 4 (precision/recall need neighbours)")


def create_state(rng: Array, params, tx: optax.GradientTransformation) -> TeacherState:
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731  (distinct buffers: the state is donated)
  return TeacherState(
    step=jnp.zeros((), jnp.int32),
    rng=jnp.array(rng, jnp.uint32),
    params=copy(params),
    opt_state=tx.init(params),
    ema=copy(params),
    nonfinite_count=jnp.zeros((), jnp.int32),
    nonfinite_streak=jnp.zeros((), jnp.int32),
  )


def init_params(module, rng: Array, data_shape: tuple[int, ...], label_dim: int):
  x = jnp.zeros((1, *data_shape))
  labels = jnp.zeros((1, label_dim)) if label_dim else None
  return module.init({"params": rng, "dropout": rng}, x, jnp.ones((1,)), labels)["params"]


def make_train_step(
  module, tx: optax.GradientTransformation, dist, ema_decay: float, sigma_data: float, conditional: bool
):
  """`train_step(state, batch) -> (state, metrics)`: one EDM denoising update (not jitted).

  `batch`: {'image': [B, H, W, C] in [-1, 1], 'label': [B, K] one-hot}.
  """

  def train_step(state: TeacherState, batch: dict) -> tuple[TeacherState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
    k_loss, k_drop = jax.random.split(key)
    labels = batch["label"] if conditional else None

    def loss_fn(p):
      def denoise(x, sigma, lab):
        return module.apply({"params": p}, x, sigma, lab, train=True, rngs={"dropout": k_drop})

      per_example, sigma = dsm_loss(denoise, batch["image"], k_loss, dist, labels, sigma_data)  # [B], [B]
      return jnp.mean(per_example), sigma

    (loss, sigma), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema, params, warmup_decay(ema_decay, state.step))
    ok = jnp.isfinite(loss) & all_finite(grads)
    kept, guard_metrics = guarded_update(ok, state.replace(params=params, opt_state=opt_state, ema=ema), state)
    metrics = {
      "loss/dsm": loss,
      "grad_norm": tree_norm(grads),
      "param_norm": tree_norm(params),
      "update_norm": tree_norm(updates),
      "sigma/mean_log": jnp.mean(jnp.log(sigma)),
      **guard_metrics,
    }
    return kept, metrics

  return train_step


def make_sampler(module, num_steps: int, guidance: float = 1.0):
  """Jitted Heun sampler `(params, noise [B, ...], labels [B, K] or None) -> [B, ...]` (2 * num_steps - 1 NFE)."""
  apply = guided_apply(lambda p, x, s, lab: module.apply({"params": p}, x, s, lab), guidance)

  @jax.jit
  def run(params, noise, labels):
    return heun_sample(lambda x, s, lab: apply(params, x, s, lab), noise, labels, num_steps=num_steps)

  return run


def generate(sampler, params, rng: Array, num: int, data_shape, num_classes: int, batch_size: int):
  """`num` Heun samples `[num, *data_shape]` (numpy) and their labels `[num]` (or None)."""
  k_noise, k_lab = jax.random.split(rng)
  noise = jax.random.normal(k_noise, (num, *data_shape))
  labels = np.asarray(jnp.arange(num) % num_classes) if num_classes else None  # balanced classes
  out = []
  for i in range(0, num, batch_size):
    lab = None if labels is None else jax.nn.one_hot(labels[i : i + batch_size], num_classes)
    out.append(np.asarray(sampler(params, noise[i : i + batch_size], lab)))
  return np.concatenate(out), labels


def make_job(config, workdir: str) -> runner.Job:
  """Teacher pre-training as a `runner.Job`: batches from the data pipeline, no extra step arguments."""
  from emd_jax.data import pipeline
  from emd_jax.evaluators import images as image_eval

  spec = net_spec(config)
  module = nets.build(spec)
  label_dim = int(spec.get("label_dim", 0))
  data_shape = (config.data.resolution, config.data.resolution, spec["in_channels"])
  tx = make_optimizer(config.optimizer, config.total_steps)
  dist = noise_dist_from_config(config.noise)
  sigma_data = float(spec.get("sigma_data", 0.5))
  k_state, k_init, k_eval = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  init = lambda: create_state(k_state, init_params(module, k_init, data_shape, label_dim), tx)  # noqa: E731
  step = make_train_step(module, tx, dist, config.ema_decay, sigma_data, label_dim > 0)
  sampler = make_sampler(module, config.eval.num_steps, config.guidance if label_dim else 1.0)
  evaluator = registry.build(config.eval)  # once, its files checked before any compute

  def batches(start: int):
    return pipeline.make_train_iterator(
      config.data, config.seed, start, config.batch_size, jax.process_index(), jax.process_count()
    )

  def evaluate_fn(st: TeacherState, step: int, num: int | None = None) -> tuple[dict, dict]:
    num = num or config.eval.num_samples
    rng = jax.random.fold_in(k_eval, step)
    t0 = time.perf_counter()
    x, labels = generate(sampler, st.ema, rng, num, data_shape, label_dim, config.eval.batch_size)
    scalars, images = image_eval.evaluate_and_grid(workdir, step, x, labels, evaluator, config.eval.grid_size)
    scalars["eval_seconds"] = time.perf_counter() - t0
    return scalars, images

  def export_fn(st: TeacherState, last_eval: dict) -> dict:
    """The final evaluation (at `eval.final_num_samples`) and the saved teacher directory."""
    out = {}
    final = config.eval.final_num_samples or config.eval.num_samples
    if final != config.eval.num_samples or "fd" not in last_eval:  # e.g. resumed at total_steps: no eval ran
      scalars, _ = evaluate_fn(st, int(st.step), final)
      out = {**scalars, "step": int(st.step)}
      metrics_lib.log_line("final eval: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if "/" not in k))
    out["teacher_dir"] = save_teacher(config, spec, st, {**last_eval, **out}, os.path.join(workdir, "teacher"))
    metrics_lib.log_line(f"saved teacher to {out['teacher_dir']}")
    return out

  return runner.Job(
    abstract_state=jax.eval_shape(init),
    init=init,
    make_step=lambda mesh: step,
    fingerprint={"net": spec, "data": config.data.to_dict(), "data_shape": list(data_shape)},
    batches=batches,
    make_evaluate=lambda mesh, args: evaluate_fn,
    export=export_fn if config.save_teacher else None,
    console_keys=("loss/dsm", "grad_norm"),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured denoiser; resumes from `workdir`; saves `workdir/teacher` at the end.

  Returns the last evaluation's scalars, `step`, `state` and `teacher_dir` (None when not saved).
  """
  config = ml_collections.ConfigDict(config)
  validate_teacher(config)
  out = runner.run_job(make_job(config, workdir), config, workdir)
  out.setdefault("teacher_dir", None)
  return out


def save_teacher(config, spec: dict, state: TeacherState, quality: dict, path: str) -> str:
  """Writes the EMA denoiser as a teacher directory with its provenance and quality."""
  from emd_jax.teachers import network

  keys = ("fd", "fd_real_split", "precision", "recall", "coverage", "class_tv", "label_accuracy")
  meta = {
    "source": f"emd_jax.jobs.teacher (config {config.get('name', '?')}, step {int(state.step)}, seed {config.seed})",
    "quality": {
      **{k: float(quality[k]) for k in keys if k in quality},
      "sampler": f"heun {config.eval.num_steps} steps ({2 * config.eval.num_steps - 1} NFE)",
      "num_samples": int(config.eval.final_num_samples or config.eval.num_samples),
      "evaluator": config.eval.evaluator,
    },
    "data": config.data.to_dict(),
    "steps": int(state.step),
  }
  if spec.get("label_dim"):
    meta["guidance"] = float(config.guidance)
  return network.save(path, spec, state.ema, meta=meta)

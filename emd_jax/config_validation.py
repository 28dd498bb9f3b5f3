"""Semantic checks of a config, run before any compute.

`config_flags` (with a locked config) already rejects unknown keys and values
of the wrong type on the command line; this module checks what types cannot:
names, ranges and combinations. Every error names the field.
"""

from __future__ import annotations

from emd_jax.distill import methods
from emd_jax.distill.distances import DISTANCES
from emd_jax.distill.losses import LOSSES, WEIGHTS


class ConfigError(ValueError):
  """A config field has a bad value; the message starts with the field name."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(field, message)


def _check_noise(cfg, prefix: str) -> None:
  _require(
    cfg.kind in ("lognormal", "loguniform", "edm_steps"), f"{prefix}.kind", f"unknown noise distribution {cfg.kind!r}"
  )
  _require(cfg.sigma_min > 0, f"{prefix}.sigma_min", f"must be > 0, got {cfg.sigma_min}")
  _require(cfg.sigma_max >= cfg.sigma_min, f"{prefix}.sigma_max", f"must be >= sigma_min, got {cfg.sigma_max}")
  _require(cfg.p_std >= 0, f"{prefix}.p_std", f"must be >= 0, got {cfg.p_std}")


def _check_optimizer(cfg, prefix: str) -> None:
  _require(cfg.lr > 0, f"{prefix}.lr", f"must be > 0, got {cfg.lr}")
  _require(0 <= cfg.b1 < 1, f"{prefix}.b1", f"must be in [0, 1), got {cfg.b1}")
  _require(0 <= cfg.b2 < 1, f"{prefix}.b2", f"must be in [0, 1), got {cfg.b2}")
  _require(cfg.get("grad_clip", 0) >= 0, f"{prefix}.grad_clip", "must be >= 0")


def validate_common(config) -> None:
  _require(config.total_steps >= 0, "total_steps", f"must be >= 0, got {config.total_steps}")
  _require(config.batch_size > 0, "batch_size", f"must be > 0, got {config.batch_size}")
  for name in ("log_every", "eval_every", "checkpoint_every"):
    if name in config:
      _require(config[name] > 0, name, f"must be > 0, got {config[name]}")
  if "max_checkpoints" in config:
    _require(config.max_checkpoints >= 1, "max_checkpoints", "must be >= 1")


def validate_distill(config) -> None:
  """Checks a distillation config and resolves its method preset in place."""
  validate_common(config)
  _require(
    config.method in methods.PRESETS, "method", f"unknown method {config.method!r}; known: {sorted(methods.PRESETS)}"
  )
  methods.resolve(config)
  _require(config.loss.name in LOSSES, "loss.name", f"unknown loss {config.loss.name!r}; known: {LOSSES}")
  _require(
    config.loss.distance in DISTANCES, "loss.distance", f"unknown distance {config.loss.distance!r}; known: {DISTANCES}"
  )
  _require(config.loss.weight in WEIGHTS, "loss.weight", f"unknown weight {config.loss.weight!r}; known: {WEIGHTS}")
  _require(config.loss.huber_c > 0, "loss.huber_c", f"must be > 0, got {config.loss.huber_c}")
  _require(
    config.loss.power >= 2 and config.loss.power % 2 == 0,
    "loss.power",
    f"must be an even integer >= 2, got {config.loss.power}",
  )
  _require(config.estep.num_steps >= 0, "estep.num_steps", f"must be >= 0, got {config.estep.num_steps}")
  if config.loss.name == "emd":
    _require(config.estep.num_steps >= 1, "estep.num_steps", "loss 'emd' needs an E-step: must be >= 1")
  if config.estep.num_steps > 0:
    _require(0 < config.estep.gamma_eps <= 1, "estep.gamma_eps", f"must be in (0, 1], got {config.estep.gamma_eps}")
    _require(config.estep.gamma_z >= 0, "estep.gamma_z", f"must be >= 0, got {config.estep.gamma_z}")
    _require(
      config.estep.gamma_z_scaling in ("constant", "sigma2"), "estep.gamma_z_scaling", "must be 'constant' or 'sigma2'"
    )
  _require(config.schedule in ("ve", "vp"), "schedule", f"must be 've' or 'vp', got {config.schedule!r}")
  _require(config.generator.sigma_init > 0, "generator.sigma_init", f"must be > 0, got {config.generator.sigma_init}")
  _require(0 <= config.generator.ema_decay < 1, "generator.ema_decay", "must be in [0, 1)")
  _require(config.fake.steps_per_gen_step >= 1, "fake.steps_per_gen_step", "must be >= 1")
  _check_optimizer(config.generator, "generator")
  _check_optimizer(config.fake, "fake")
  _check_noise(config.fake.noise, "fake.noise")
  _check_noise(config.loss.noise, "loss.noise")
  t = config.teacher
  _require(
    t.kind in ("gmm", "checkpoint"), "teacher.kind", f"unknown teacher kind {t.kind!r}; known: 'gmm', 'checkpoint'"
  )
  if t.kind == "gmm":
    _require(t.dim >= 1, "teacher.dim", f"must be >= 1, got {t.dim}")
    _require(t.num_modes >= 1, "teacher.num_modes", f"must be >= 1, got {t.num_modes}")
    _require(t.std > 0, "teacher.std", f"must be > 0, got {t.std}")
    if t.weights:
      _require(
        len(t.weights) == t.num_modes, "teacher.weights", f"has {len(t.weights)} entries for {t.num_modes} modes"
      )
      _require(all(w > 0 for w in t.weights), "teacher.weights", "must all be > 0")
  else:
    import os

    _require(bool(t.checkpoint), "teacher.checkpoint", "no teacher checkpoint directory given")
    from emd_jax.teachers import resolve_path

    path = resolve_path(t.checkpoint)
    _require(os.path.isdir(path), "teacher.checkpoint", f"teacher checkpoint not found: {t.checkpoint} ({path})")

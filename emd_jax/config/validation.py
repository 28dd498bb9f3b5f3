"""Semantic checks of a config, run before any compute.

`config_flags` (with a locked config) already rejects unknown keys and values
of the wrong type on the command line; this module checks what types cannot:
names, ranges and combinations. Every error names the field.

This is the one place that checks a rule on a distillation config's values:
`methods.resolve` and the typed step settings built from the checked config
(`emd_jax.distill.step.StepConfig`) trust them.
"""

from __future__ import annotations

from emd_jax.distill import adversarial, methods
from emd_jax.distill.losses import unknown_name
from emd_jax.distill.step import DRAWS, FAKE_LOOPS, GAMMA_Z_SCALINGS, GEN_TRAIN_STEPS, REMAT_POLICIES
from emd_jax.errors import UserInputError
from emd_jax.runtime.fsdp import GATHER_MODES, gather_mode
from emd_jax.training.ema import parse_ema_tracks


class ConfigError(UserInputError):
  """A config field has a bad value; the message starts with the field name."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(field, message)


def _check_mean_correction(config) -> None:
  from emd_jax.teachers.mean_correction import MODES, levels_problem

  mc = config.get("mean_correction")
  if mc is None:
    return
  _require(mc.mode in MODES, "mean_correction.mode", f"unknown mode {mc.mode!r}; known: {list(MODES)}")
  if mc.mode == "none":
    return
  _require(
    config.teacher.kind == "checkpoint",
    "mean_correction.mode",
    "measures a network teacher's error; an analytic (gmm) teacher is exact: use 'none'",
  )
  _require(mc.num_samples >= 2, "mean_correction.num_samples", f"must be >= 2, got {mc.num_samples}")
  _require(mc.heun_steps >= 1, "mean_correction.heun_steps", f"must be >= 1, got {mc.heun_steps}")
  problem = levels_problem(mc.sigmas)
  _require(problem is None, "mean_correction.sigmas", problem or "")


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
  decay = cfg.get("decay", "none")
  _require(decay in ("none", "cosine", "linear"), f"{prefix}.decay", f"unknown {decay!r}; known: none, cosine, linear")
  _require(0 <= cfg.get("end_factor", 0.0) <= 1, f"{prefix}.end_factor", "must be in [0, 1]")


def _check_student_grid(g) -> None:
  """`generator.num_steps`, `sigmas` (or `sigma_min` for the default grid) of a few-step student."""
  n = g.get("num_steps", 1)
  _require(isinstance(n, int) and n >= 1, "generator.num_steps", f"must be an integer >= 1, got {n!r}")
  which = g.get("train_step", "last")
  _require(which in GEN_TRAIN_STEPS, "generator.train_step", f"must be one of {GEN_TRAIN_STEPS}, got {which!r}")
  sigmas = tuple(g.get("sigmas", ()) or ())
  if not sigmas:
    if n > 1:
      lo = g.get("sigma_min", 0.2)
      _require(0 < lo < g.sigma_init, "generator.sigma_min", f"must be in (0, sigma_init={g.sigma_init}), got {lo}")
    return
  where = "generator.sigmas"
  _require(
    len(sigmas) == n + 1,
    where,
    f"needs num_steps + 1 = {n + 1} levels (the last 0, the clean image), got {len(sigmas)}: {sigmas}",
  )
  try:
    values = [float(s) for s in sigmas]
  except (TypeError, ValueError):
    raise ConfigError(where, f"must be numbers, got {sigmas}") from None
  _require(all(v == v and abs(v) != float("inf") for v in values), where, f"must be finite, got {sigmas}")
  _require(values[-1] == 0, where, f"must end at 0 (the clean image), got {values[-1]}; append 0")
  _require(all(v > 0 for v in values[:-1]), where, f"levels before the last must be > 0, got {sigmas}")
  descending = all(a > b for a, b in zip(values[:-1], values[1:], strict=True))
  _require(descending, where, f"must be strictly descending, got {sigmas}")
  _require(
    values[0] == g.sigma_init,
    where,
    f"starts at {values[0]} but generator.sigma_init is {g.sigma_init} (the first input is sigma_init * N(0, I))",
  )


def _check_latent_mean(g) -> None:
  from emd_jax.distill.latent_mean import MODES

  mode = g.get("latent_mean", "zero")
  _require(mode in MODES, "generator.latent_mean", f"unknown mode {mode!r}; known: {list(MODES)}")
  n, iters = g.get("latent_mean_samples", 2048), g.get("latent_mean_iters", 4)
  _require(isinstance(n, int) and n >= 2, "generator.latent_mean_samples", f"must be an integer >= 2, got {n!r}")
  ok = isinstance(iters, int) and iters >= 1
  _require(ok, "generator.latent_mean_iters", f"must be an integer >= 1, got {iters!r}")


def validate_common(config) -> None:
  _require(config.total_steps >= 0, "total_steps", f"must be >= 0, got {config.total_steps}")
  _require(config.batch_size > 0, "batch_size", f"must be > 0, got {config.batch_size}")
  for name in ("log_every", "eval_every", "checkpoint_every"):
    if name in config:
      _require(config[name] > 0, name, f"must be > 0, got {config[name]}")
  if "max_checkpoints" in config:
    _require(config.max_checkpoints >= 1, "max_checkpoints", f"must be >= 1, got {config.max_checkpoints}")
  if "nonfinite_limit" in config:
    _require(config.nonfinite_limit >= 1, "nonfinite_limit", f"must be >= 1, got {config.nonfinite_limit}")
  if "spike_factor" in config:
    _require(config.spike_factor >= 0, "spike_factor", f"must be >= 0 (0: off), got {config.spike_factor}")
  if "eval_num_samples" in config:
    _require(config.eval_num_samples > 0, "eval_num_samples", f"must be > 0, got {config.eval_num_samples}")
  if "seed" in config:
    _require(0 <= config.seed < 2**31, "seed", f"must be in [0, 2^31), got {config.seed}")
  if "mesh" in config:
    _check_mesh(config)
  if "eval" in config and config.eval is not None:
    from emd_jax.evaluators import registry

    registry.check_config(config.eval)  # names, arguments and files of the evaluator, before any compute
  if config.get("debug") is not None:
    _check_debug(config.debug)


def _check_mesh(config) -> None:
  """The mesh must fit the devices, and the batch must split over it."""
  import jax

  n = jax.device_count()
  fsdp, data = config.mesh.get("fsdp", 1), config.mesh.get("data", -1)
  _require(fsdp >= 1, "mesh.fsdp", f"must be >= 1, got {fsdp}")
  gather = gather_mode(config)
  _require(gather in GATHER_MODES, "mesh.gather", f"must be one of {GATHER_MODES}, got {gather!r}")
  _require(data == -1 or data >= 1, "mesh.data", f"must be >= 1 or -1 (all remaining devices), got {data}")
  if data == -1:
    _require(n % fsdp == 0, "mesh.fsdp", f"{fsdp} does not divide the {n} available devices")
    data = n // fsdp
  _require(data * fsdp == n, "mesh.data", f"data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available")
  _require(
    config.batch_size % (data * fsdp) == 0,
    "batch_size",
    f"{config.batch_size} is not divisible by the {data * fsdp} data-parallel devices of the mesh",
  )


def _check_debug(debug) -> None:
  from emd_jax.runtime.faults import KILL_PHASES

  steps = debug.get("nan_at_steps") or ()
  _require(all(int(s) >= 1 for s in steps), "debug.nan_at_steps", f"step numbers must be >= 1, got {tuple(steps)}")
  _require(
    debug.get("kill_phase", "step") in KILL_PHASES,
    "debug.kill_phase",
    f"must be one of {KILL_PHASES}, got {debug.get('kill_phase')!r}",
  )


def validate_distill(config) -> None:
  """Checks a distillation config and resolves its method preset in place."""
  validate_common(config)
  _require(
    config.method in methods.PRESETS, "method", f"unknown method {config.method!r}; known: {sorted(methods.PRESETS)}"
  )
  methods.resolve(config)
  problem = unknown_name(config.loss.name, config.loss.distance, config.loss.weight)
  if problem:
    raise ConfigError(*problem)
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
  scaling = config.estep.gamma_z_scaling
  _require(scaling in GAMMA_Z_SCALINGS, "estep.gamma_z_scaling", f"must be 'constant' or 'sigma2', got {scaling!r}")
  _require(config.schedule in ("ve", "vp"), "schedule", f"must be 've' or 'vp', got {config.schedule!r}")
  draws = config.get("draws", "iid")
  _require(draws in DRAWS, "draws", f"must be one of {DRAWS}, got {draws!r}")
  _require(config.generator.sigma_init > 0, "generator.sigma_init", f"must be > 0, got {config.generator.sigma_init}")
  _require(0 <= config.generator.ema_decay < 1, "generator.ema_decay", "must be in [0, 1)")
  try:
    parse_ema_tracks(config.generator.get("ema_tracks", ""))
  except ValueError as e:
    raise ConfigError("generator.ema_tracks", str(e)) from None
  _check_student_grid(config.generator)
  _check_latent_mean(config.generator)
  _require(config.fake.steps_per_gen_step >= 1, "fake.steps_per_gen_step", "must be >= 1")
  loop = config.fake.get("loop", "auto")
  _require(loop in FAKE_LOOPS, "fake.loop", f"must be 'auto', 'unroll' or 'scan', got {loop!r}")
  accum = config.get("grad_accum_steps", 1)
  _require(accum >= 1, "grad_accum_steps", f"must be >= 1, got {accum}")
  _require(
    config.batch_size % accum == 0,
    "grad_accum_steps",
    f"{accum} does not divide batch_size={config.batch_size} into equal micro-batches",
  )
  remat = config.get("remat", "none")
  _require(remat in REMAT_POLICIES, "remat", f"must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  _check_optimizer(config.generator, "generator")
  _check_optimizer(config.fake, "fake")
  _check_noise(config.fake.noise, "fake.noise")
  _check_noise(config.loss.noise, "loss.noise")
  _check_net(config)
  _check_mean_correction(config)
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

    from emd_jax.formats import paths

    _require(bool(t.checkpoint), "teacher.checkpoint", "no teacher checkpoint directory given")
    from emd_jax.teachers import resolve_path

    path = resolve_path(t.checkpoint)
    _require(paths.isdir(path), "teacher.checkpoint", f"teacher checkpoint not found: {t.checkpoint} ({path})")
    _check_complete(path)
    for name in ("teacher.json", "params.msgpack"):
      _require(
        paths.isfile(os.path.join(path, name)),
        "teacher.checkpoint",
        f"{t.checkpoint} is not a teacher checkpoint: {name} is missing",
      )
    _check_teacher_checkpoint(path)
  _check_adversarial(config)


def _check_adversarial(config) -> None:
  """The adversarial term: weights, its noise levels, and real data that fit the teacher."""
  gen_w = config.loss.get("adv_weight") or 0.0
  disc_w = config.fake.get("adv_weight") or 0.0
  _require(gen_w >= 0, "loss.adv_weight", f"must be >= 0 (0: off), got {gen_w}")
  _require(disc_w >= 0, "fake.adv_weight", f"must be >= 0 (0: off), got {disc_w}")
  if not (gen_w or disc_w):
    return
  _require(
    disc_w > 0,
    "fake.adv_weight",
    f"must be > 0 when loss.adv_weight={gen_w} > 0: the discriminator is trained only by the fake update",
  )
  adv = config.get("adv")
  _require(adv is not None, "adv", "the adversarial term needs an adv section (config.defaults.distill_config)")
  _check_noise(adv.sigma, "adv.sigma")
  _require(adv.r1_weight >= 0, "adv.r1_weight", f"must be >= 0, got {adv.r1_weight}")
  _require(adv.head_hidden >= 1, "adv.head_hidden", f"must be >= 1, got {adv.head_hidden}")
  readout = adv.get("head_readout") or "mean"
  _require(
    readout in adversarial.READOUTS, "adv.head_readout", f"must be one of {adversarial.READOUTS}, got {readout!r}"
  )
  feats = adv.get("features") or "shared"
  _require(feats in adversarial.FEATURES, "adv.features", f"must be one of {adversarial.FEATURES}, got {feats!r}")
  head_lr = adv.get("head_lr")
  _require(head_lr is None or head_lr > 0, "adv.head_lr", f"must be > 0 (unset: fake.lr), got {head_lr}")
  start = adv.get("start_step") or 0
  _require(
    isinstance(start, int) and start >= 0,
    "adv.start_step",
    f"must be an integer >= 0 (0: from the start), got {start!r}",
  )
  _require(
    start == 0 or start < config.total_steps,
    "adv.start_step",
    f"is {start} but the run has total_steps={config.total_steps}: the term would never switch on",
  )
  data = config.get("data")
  has_data = data is not None and bool(data.get("name") or data.get("image_folder"))
  _require(
    has_data,
    "data.name",
    f"loss.adv_weight={gen_w} / fake.adv_weight={disc_w} (method {config.method!r}) need real data, and no data "
    "is configured: set data.name ('digits', a TFDS name, or 'gmm' for samples of the analytic teacher) or "
    "data.image_folder, or set both weights to 0",
  )
  t = config.teacher
  if t.kind == "gmm":
    _require(
      data.name == "gmm" and not data.get("image_folder"),
      "data.name",
      f"the gmm teacher's data are vectors of dimension {t.dim}: use data.name='gmm', got {data.name!r}",
    )
    _require(data.num_examples >= 1, "data.num_examples", f"must be >= 1, got {data.num_examples}")
    return
  _require(data.name != "gmm", "data.name", "'gmm' samples the analytic teacher; this teacher is a checkpoint")
  from emd_jax.teachers import network, resolve_path

  info = network.read_info(resolve_path(t.checkpoint))
  h, w, c = info["data_shape"]
  _require(
    data.get("resolution") == h and h == w,
    "data.resolution",
    f"must equal the teacher's resolution {h} (data shape {info['data_shape']}), got {data.get('resolution')}",
  )
  if data.get("channels") is not None:
    _require(data.channels == c, "data.channels", f"must equal the teacher's {c} channels, got {data.channels}")
  k = int(info.get("num_classes", 0))
  if k:
    _require(data.num_classes == k, "data.num_classes", f"must equal the teacher's {k} classes, got {data.num_classes}")


def _check_net(config) -> None:
  """The student network must fit the teacher's data (analytic teachers: vectors, hence an MLP)."""
  if "net" not in config:
    return
  from emd_jax import nets

  arch = config.net.get("arch")
  _require(arch in nets._BUILDERS, "net.arch", f"unknown network arch {arch!r}; known: {sorted(nets._BUILDERS)}")
  if config.teacher.kind == "gmm":
    _require(
      arch == "mlp",
      "net.arch",
      f"{arch!r} needs image data [H, W, C]; the gmm teacher's data are vectors of dimension {config.teacher.dim} "
      "(use 'mlp')",
    )
  if arch == "mlp":
    for name in ("hidden", "depth", "emb_dim"):
      if name in config.net:
        _require(config.net[name] >= 1, f"net.{name}", f"must be >= 1, got {config.net[name]}")
  if "dtype" in config.net:
    _require(
      config.net.dtype in ("float32", "bfloat16", "float16"),
      "net.dtype",
      f"must be 'float32', 'bfloat16' or 'float16', got {config.net.dtype!r}",
    )


_MAX_CHECKED_PARAMS_BYTES = 1 << 30  # larger teachers are checked when they are loaded


def _check_complete(path: str) -> None:
  """The teacher directory's completion marker (`fileio.require_complete`) before its files are looked at."""
  from emd_jax.errors import UserInputError
  from emd_jax.formats import fileio

  try:
    fileio.require_complete(path, "teacher checkpoint")
  except UserInputError as e:
    raise ConfigError("teacher.checkpoint", str(e)) from e


def _check_teacher_checkpoint(path: str) -> None:
  """teacher.json parses and names a known net whose parameters match params.msgpack (`network.read_params`)."""
  import os

  from emd_jax.errors import UserInputError
  from emd_jax.formats import paths
  from emd_jax.teachers import network

  try:
    info = network.read_info(path)
    if paths.getsize(os.path.join(path, network.PARAMS_FILE)) <= _MAX_CHECKED_PARAMS_BYTES:
      network.read_params(path, info)
  except UserInputError as e:
    raise ConfigError("teacher.checkpoint", str(e)) from e

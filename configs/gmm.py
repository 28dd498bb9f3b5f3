"""Distil the analytic 2-D Gaussian mixture into a one-step MLP generator.

The README's main job (no download, a few minutes on 2 CPU cores):

  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm

Other methods (ALGORITHMS.md section 6) from the command line:

  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm_sim --config.method=sim
  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm_emd16 \
      --config.method=emd --config.estep.num_steps=16

`configs/gmm.py:tiny` is a seconds-long variant used by the tests.
Expected compute: 4000 steps of the default method; about 40-50 steps/s for a
lone job on 2 CPU cores (under 2 minutes), 10-25 steps/s when the cores are shared.
Measured quality and the tuning behind these values: docs/gmm_results.md.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "distill"
  c.seed = 0
  c.total_steps = 4000
  c.batch_size = 512
  c.method = "emd_sim"

  # Teacher: 8 isotropic modes at radius 1.0, std 0.05, weights (k+1)/36.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.kind = "gmm"
  c.teacher.checkpoint = ""
  c.teacher.dim = 2
  c.teacher.num_modes = 8
  c.teacher.radius = 1.0
  c.teacher.std = 0.05
  c.teacher.weights = tuple((k + 1) / 36 for k in range(8))
  c.teacher.sigma_data = 0.5
  # Analytic teachers have no weights: the student starts from a surrogate
  # (the student net regressed on the exact denoiser), see distill/state.py.
  c.teacher.surrogate_steps = 1500
  c.teacher.surrogate_lr = 2e-3
  c.teacher.surrogate_batch_size = 512

  # Student architecture (generator and fake denoiser).
  c.net = ml_collections.ConfigDict()
  c.net.arch = "mlp"
  c.net.hidden = 128
  c.net.depth = 3
  c.net.emb_dim = 64
  c.net.dtype = "float32"

  c.schedule = "ve"

  c.generator = ml_collections.ConfigDict()
  c.generator.sigma_init = 2.5
  c.generator.lr = 1e-4
  c.generator.b1 = 0.0
  c.generator.b2 = 0.999
  c.generator.eps = 1e-8
  c.generator.grad_clip = 0.0
  c.generator.warmup_steps = 0
  c.generator.ema_decay = 0.999

  c.fake = ml_collections.ConfigDict()
  c.fake.lr = 1e-3
  c.fake.b1 = 0.0
  c.fake.b2 = 0.999
  c.fake.eps = 1e-8
  c.fake.grad_clip = 0.0
  c.fake.warmup_steps = 0
  c.fake.steps_per_gen_step = 1
  c.fake.noise = noise(-1.2, 1.2)

  c.estep = ml_collections.ConfigDict()
  c.estep.num_steps = config_dict.placeholder(int)  # None: from the method preset
  c.estep.gamma_eps = 0.3
  c.estep.gamma_z = 0.0
  c.estep.gamma_z_scaling = "sigma2"
  c.estep.noise_cancellation = True

  c.loss = ml_collections.ConfigDict()
  c.loss.name = config_dict.placeholder(str)
  c.loss.distance = config_dict.placeholder(str)
  c.loss.weight = config_dict.placeholder(str)
  c.loss.huber_c = 0.1
  c.loss.huber_delta = 0.1
  c.loss.power = 4
  c.loss.sid_alpha = 1.2
  c.loss.noise = noise(-1.2, 1.2)  # generator noise levels

  # Scale: activation dtype (params and optimizer stay float32), rematerialisation of
  # network passes ("none", "dots", "full"), gradient accumulation over micro-batches.
  c.compute_dtype = "float32"
  c.remat = "none"
  c.grad_accum_steps = 1

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by other axes
  c.mesh.fsdp = 1

  c.log_every = 100
  c.eval_every = 500
  c.eval_num_samples = 20000
  c.checkpoint_every = 500
  c.max_checkpoints = 3
  c.export_at_end = True
  c.nonfinite_limit = 20
  c.spike_factor = 10.0  # warn when a loss/* value exceeds 10x its running mean (0: off)

  # Fault injection (tests, benchmarks/faults.py; docs/reliability.md). All off by default.
  c.debug = ml_collections.ConfigDict()
  c.debug.nan_at_steps = ()  # e.g. (5, 6): these updates see a NaN teacher
  c.debug.kill_at_step = -1  # SIGKILL the process at this step ...
  c.debug.kill_phase = "step"  # ... after the update ("step") or while its checkpoint is written ("save")
  c.debug.sigterm_at_step = -1  # SIGTERM the process after this step (preemption drill)

  if arg == "tiny":
    c.total_steps = 40
    c.batch_size = 64
    c.teacher.surrogate_steps = 50
    c.net.hidden = 32
    c.net.depth = 1
    c.net.emb_dim = 16
    c.log_every = 10
    c.eval_every = 20
    c.eval_num_samples = 2000
    c.checkpoint_every = 20
  elif arg:
    raise ValueError(f"configs/gmm.py: unknown variant {arg!r}; known: '', 'tiny'")
  return c


def noise(p_mean: float, p_std: float) -> ml_collections.ConfigDict:
  n = ml_collections.ConfigDict()
  n.kind = "lognormal"
  n.p_mean = p_mean
  n.p_std = p_std
  n.sigma_min = 0.002
  n.sigma_max = 80.0
  return n

"""Defaults shared by every distillation config (the fields `train.py` reads).

Config files in `configs/` start from `distill_config()` and change what
their setting needs, so a new field is added in one place. Placeholder fields
(None) in `estep` and `loss` take the value of the `method` preset
(`emd_jax.distill.methods`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def noise(p_mean: float, p_std: float, sigma_min: float = 0.002, sigma_max: float = 80.0) -> ml_collections.ConfigDict:
  """A lognormal noise-level distribution section (see `diffusion.NoiseDist`)."""
  n = ml_collections.ConfigDict()
  n.kind = "lognormal"
  n.p_mean = p_mean
  n.p_std = p_std
  n.sigma_min = sigma_min
  n.sigma_max = sigma_max
  return n


def checkpoint_teacher(path: str = "") -> ml_collections.ConfigDict:
  """A teacher section naming a checkpoint directory (converted EDM pickle or trained here)."""
  t = ml_collections.ConfigDict()
  t.kind = "checkpoint"
  t.checkpoint = path
  return t


def distill_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "distill"
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256
  c.method = "emd_simloss"  # EMD E-step + SIM's loss at its samples (docs/algorithms.md 6.1)
  # How each step's latents, forward noises and noise levels are drawn: "iid", or "stratified"
  # (randomised low-discrepancy batches, every draw exact: emd_jax/qmc.py, docs/algorithms.md
  # "Stratified draws"). E-step chains, labels, few-step and adversarial draws are always i.i.d.
  c.draws = "iid"
  c.teacher = checkpoint_teacher()

  # Student architecture when the teacher is analytic; network teachers give their own.
  c.net = ml_collections.ConfigDict()
  c.net.arch = "mlp"
  c.net.hidden = 128
  c.net.depth = 3
  c.net.emb_dim = 64
  c.net.dtype = "float32"

  c.schedule = "ve"

  c.generator = ml_collections.ConfigDict()
  c.generator.sigma_init = 2.5
  c.generator.lr = 1e-5
  c.generator.b1 = 0.0
  c.generator.b2 = 0.999
  c.generator.eps = 1e-8
  c.generator.grad_clip = 0.0
  c.generator.warmup_steps = 0
  c.generator.decay = "none"  # or "cosine" / "linear": from lr after warm-up to lr * end_factor at total_steps
  c.generator.end_factor = 0.0
  c.generator.ema_decay = 0.999
  # The centre of the generator's first input: "zero", g(z) = D(z, sigma_init); "tweedie", g(z) =
  # D(mu + z, sigma_init) with mu the teacher's Tweedie fixed point mu = E[D_T(mu + z, sigma_init)],
  # z ~ N(0, sigma_init^2 I) (emd_jax/distill/latent_mean.py; data that are not centred, e.g. the
  # digits' black canvas). Computed at setup on `latent_mean_samples` draws, kept in the workdir.
  c.generator.latent_mean = "zero"
  c.generator.latent_mean_samples = 2048
  c.generator.latent_mean_iters = 4
  # Few-step students (docs/algorithms.md "Few-step students"): N denoiser passes at the levels
  # `sigmas` (descending, starting at sigma_init, ending at 0: N + 1 values). Empty `sigmas`: N
  # Karras levels (rho 7) from sigma_init down to sigma_min. Each training example trains one step
  # n ~ U{0..N-1} on the student's own earlier steps (backward simulation); `backprop_steps` also
  # differentiates through those earlier steps (N passes fwd + bwd instead of one).
  c.generator.num_steps = 1
  c.generator.sigmas = ()
  c.generator.sigma_min = 0.2
  c.generator.backprop_steps = False
  # Which step an example trains: "last" (the sampler's final output) or "uniform" (n ~ U{0..N-1},
  # DMD2's recipe). docs/algorithms.md 6.2: with one fake score for all steps, "uniform" matches
  # only the MIXTURE of the steps' outputs to the teacher (GMM: mode-mass TV 0.28 against 0.03).
  c.generator.train_step = "last"
  # True: the EMA averages only the trained iterates (bias-corrected, like Adam's moments), so a
  # short run's EMA holds none of the initial weights; False: the EMA starts at the initial weights.
  c.generator.ema_debias = False
  # Extra named EMAs of the generator, each checkpointed, evaluated (`eval_<name>/...`) and exportable
  # (`python -m emd_jax.sample --workdir W --ema NAME`): "name:decay,..." e.g. "ema9999:0.9999,deb:0.999d"
  # (a trailing `d`: debiased as above). "" (default): only the `ema` above.
  c.generator.ema_tracks = ""

  c.fake = ml_collections.ConfigDict()
  c.fake.lr = 1e-5
  c.fake.b1 = 0.0
  c.fake.b2 = 0.999
  c.fake.eps = 1e-8
  c.fake.grad_clip = 0.0
  c.fake.warmup_steps = 0
  c.fake.decay = "none"  # or "cosine" / "linear": from lr after warm-up to lr * end_factor at total_steps
  c.fake.end_factor = 0.0
  c.fake.steps_per_gen_step = 1
  c.fake.loop = "auto"  # several fake updates: "auto" (unrolled up to 8, else a scan), "unroll", "scan"
  c.fake.noise = noise(-1.2, 1.2)
  # Adversarial term (docs/algorithms.md "Adversarial term"): the discriminator's loss weight in the
  # fake update. None: from the method preset (0 = off for the data-free rows; sida, dmd2, emd_sim_adv).
  c.fake.adv_weight = config_dict.placeholder(float)

  # The teacher's first-moment (Tweedie) error, measured once before training on its own Heun samples
  # and subtracted from its denoiser (emd_jax/teachers/mean_correction.py, docs/algorithms.md 6.5):
  # "none" or "teacher_samples". Unconditional network teachers; costs one sampling run at setup.
  c.mean_correction = ml_collections.ConfigDict()
  c.mean_correction.mode = "none"
  c.mean_correction.num_samples = 2000
  c.mean_correction.heun_steps = 18
  c.mean_correction.sigmas = (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 5.0, 20.0, 80.0)
  # A table measured before (a run's `W/mean_correction.npz`): used as is, nothing measured. "": measure
  # at the first start and keep it in the workdir (a resume reads it back: exact resume).
  c.mean_correction.table = ""

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
  c.loss.huber_c = 0.03
  c.loss.huber_delta = 0.1
  c.loss.power = 4
  c.loss.sid_alpha = 1.2
  c.loss.noise = noise(-1.2, 1.2)  # generator noise levels
  # The generator's non-saturating GAN term on real data; None: from the method preset (0 = off).
  c.loss.adv_weight = config_dict.placeholder(float)

  # The adversarial term's discriminator (distill/adversarial.py): a head on the fake score's encoder
  # features, fed real images and generator samples noised x + sigma n with sigma ~ `sigma` (a noise
  # section as above: lognormal, loguniform or the EDM grid 'edm_steps').
  c.adv = ml_collections.ConfigDict()
  c.adv.sigma = noise(-1.2, 1.2)
  c.adv.r1_weight = 0.0  # R1 penalty r1_weight / 2 * ||grad_x D(real_t)||^2 in the fake update
  c.adv.head_hidden = 64
  # How the head's per-position outputs become one logit: "mean" over positions (a patch discriminator,
  # blind to where a feature is) or "dense" (a learnt weight per position: it sees spatial statistics
  # such as the mean image; DMD2's bottleneck classifier ends in a convolution over the whole map).
  c.adv.head_readout = "mean"
  # Whose encoder the head reads: "shared" (the fake score network's own, as SiDA and DMD2: the
  # discriminator's loss then reshapes the features the fake denoiser uses) or "own" (a copy of the fake
  # network, started as the teacher and trained by the discriminator's loss alone: the same passes, one
  # more set of weights, and a fake denoiser left to its denoising loss; docs/digits.md).
  c.adv.features = "shared"
  # The head's learning rate (its own Adam state, the fake optimizer's other settings); None: fake.lr.
  # The head is trained only by the discriminator loss, so its weight (fake.adv_weight) does not
  # scale its steps under Adam: this is what sets how fast the discriminator learns.
  c.adv.head_lr = config_dict.placeholder(float)
  # The term is on from this step (state.step >= start_step); before it the step is the data-free one
  # (no adversarial gradient, the head kept as initialised), with the discriminator's passes still run.
  c.adv.start_step = 0

  # Real data, read only by the adversarial term (name '' = none: the data-free default). The fields
  # of `emd_jax.data.pipeline` (as the teacher-training job's `data`), or name 'gmm': `num_examples`
  # exact samples of the analytic teacher, drawn once from `seed`.
  c.data = ml_collections.ConfigDict()
  c.data.name = ""
  c.data.image_folder = ""
  c.data.resolution = config_dict.placeholder(int)  # must equal the teacher's H
  c.data.preprocess = "auto"
  c.data.channels = config_dict.placeholder(int)  # None: the source's
  c.data.split = "train"
  c.data.data_dir = config_dict.placeholder(str)
  c.data.num_classes = 10
  c.data.in_memory = config_dict.placeholder(bool)
  c.data.shuffle_buffer = 10000
  c.data.num_examples = 4096  # data.name 'gmm' only

  # Scale: activation dtype (params and optimizer stay float32), rematerialisation of
  # network passes ("none", "dots", "full"), gradient accumulation over micro-batches.
  c.compute_dtype = "float32"
  c.remat = "none"
  c.grad_accum_steps = 1
  # Keep the generator pass's activations from the fake updates to the M-step (one generator
  # forward fewer per step); False recomputes it in the M-step and frees them meanwhile
  # (the per-device peak of large networks; docs/scaling.md "Where the memory goes").
  c.keep_generator_pass = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by other axes
  c.mesh.fsdp = 1
  # FSDP weights gathered one layer at a time in the forward and again in the backward pass
  # ("per_layer", runtime.fsdp), or wherever XLA's partitioner puts the gathers ("auto").
  c.mesh.gather = "per_layer"
  c.mesh.devices = -1  # -1: every device; N: the first N (debugging, tests)

  # Evaluation: evaluator "" writes sample grids only; "inception_fid" needs user-supplied
  # weights (docs/convert.md); "digits" is for the digits data set.
  c.eval = ml_collections.ConfigDict()
  c.eval.evaluator = ""
  c.eval.batch_size = 256
  c.eval.grid_size = 64
  # The files of `inception_fid` (README "Inception FID"): converted npz or jax-fid pickle, mu/sigma npz.
  c.eval.inception_fid = ml_collections.ConfigDict({"weights": "", "reference_stats": "", "batch_size": 64})

  c.log_every = 100
  c.eval_every = 5000
  c.eval_num_samples = 1024
  c.checkpoint_every = 1000
  c.max_checkpoints = 3
  # Synchronous by default: each save returns once its write is committed, so a SIGKILL at any
  # moment loses at most `checkpoint_every` steps. True overlaps the write with the next updates
  # (worth it when a save is GBs, as in the paper configs) and bounds a kill's loss by 2 intervals.
  c.checkpoint_async = False
  c.export_at_end = True
  c.nonfinite_limit = 20
  c.spike_factor = 10.0  # warn when a loss/* value exceeds 10x its running mean (0: off)

  # Fault injection (tests, benchmarks/faults.py; docs/reliability.md). All off by default.
  c.debug = ml_collections.ConfigDict()
  c.debug.nan_at_steps = ()
  c.debug.kill_at_step = -1
  c.debug.kill_phase = "step"
  c.debug.sigterm_at_step = -1
  return c


def shrink_for_tests(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `tiny` variant of a paper config: 2 steps, a small batch, no periodic work."""
  c.total_steps = 2
  c.batch_size = 8
  c.log_every = 1
  c.eval_every = 1000
  c.eval_num_samples = 8
  c.checkpoint_every = 1000
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.devices = 1  # one device compiles fastest; sharding is tested separately
  return c


def sim64_config(dataset: str, arg: str = "") -> ml_collections.ConfigDict:
  """SIM at 64x64 (FFHQ, AFHQv2) with SIM's CIFAR-10 recipe; `arg` "tiny" for tests."""
  c = distill_config()
  c.method = "sim"
  c.teacher.checkpoint = ""  # required
  c.total_steps = 400_000
  c.batch_size = 256
  c.generator.lr = 1e-5
  c.fake.lr = 1e-5
  c.loss.noise = noise(-3.5, 2.5)
  c.compute_dtype = "bfloat16"
  c.eval_every = 10_000
  c.eval_num_samples = 10_000
  c.checkpoint_every = 5_000
  c.checkpoint_async = True  # pod-scale state: do not stall the step on each save (docs/reliability.md)
  if arg == "tiny":
    shrink_for_tests(c)
    c.compute_dtype = "float32"
  elif arg:
    raise ValueError(f"configs/{dataset}_sim.py: unknown variant {arg!r}; known: tiny")
  return c


def emd_imagenet_config(resolution: int, total_steps: int, fsdp: int, remat: str, arg: str = ""):
  """EMD on class-conditional ImageNet (EMD-8, bf16, FSDP); `arg` "tiny" for tests.

  Values the EMD paper's available text does not state are this project's choices.
  """
  c = distill_config()
  c.method = "emd"  # EMD's own linear M-step; `--config.method=emd_sim` for the default combination
  c.teacher.checkpoint = ""  # required
  c.total_steps = total_steps
  c.batch_size = 512  # project choice
  c.estep.num_steps = 8  # EMD-8
  c.estep.gamma_eps = 0.1  # project choice
  c.generator.lr = 2e-6  # project choice
  c.fake.lr = 2e-6
  c.loss.noise = noise(-1.2, 1.2, sigma_min=0.02, sigma_max=80.0)  # project choice
  c.compute_dtype = "bfloat16"
  c.remat = remat
  # Recompute the generator pass in the M-step rather than hold its activations over the fake
  # update: the 8-device ImageNet-64 peak falls from 13.1 to 9.8 GiB for one generator forward more
  # (docs/scaling.md, "Where the memory goes").
  c.keep_generator_pass = False
  c.mesh.fsdp = fsdp
  c.eval_every = 10_000
  c.eval_num_samples = 10_000
  c.checkpoint_every = 2_000
  c.checkpoint_async = True  # pod-scale state: do not stall the step on each save (docs/reliability.md)
  if arg == "tiny":
    shrink_for_tests(c)
    c.compute_dtype = "float32"
    c.remat = "none"
  elif arg:
    raise ValueError(f"configs/imagenet{resolution}_emd.py: unknown variant {arg!r}; known: tiny")
  return c

"""UD2M on the shipped digits teacher: Gaussian deblurring, 3 x 3 = 9 NFE.

Trains a rank-5 LoRA adapter of `builtin:digits_uncond` (on every layer: see
`lora.targets`) plus the 9 per-block step sizes and re-noising levels, on (x, y)
pairs made on the fly from the digits train split; PSNR/SSIM on held-out
(test split) digits every `eval_every` steps; the sampler is exported to
WORKDIR/export at the end:

  python -m emd_jax.main --config configs/ud2m_digits_deblur.py --workdir runs/ud2m_deblur
  python -m emd_jax.restore --sampler runs/ud2m_deblur/export --task deblur \
      --input clean.npz --seed 0 --out restored.npz

Expected compute: ~1.5 steps/s at batch 32 on 2 CPU cores (about 7 minutes for
the default 600 steps). `:tiny` is the 2-step variant the tests run.
"""

import ml_collections
from ml_collections import config_dict

from emd_jax.nets.lora import ALL_TARGETS


def base_config(task: str) -> ml_collections.ConfigDict:
  """The fields every UD2M config has (digits defaults); `task` picks the operator."""
  c = ml_collections.ConfigDict()
  c.job = "ud2m"
  c.seed = 0
  c.total_steps = 600
  c.batch_size = 32

  c.teacher = ml_collections.ConfigDict()
  c.teacher.kind = "checkpoint"
  c.teacher.checkpoint = "builtin:digits_uncond"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.resolution = 16
  c.data.preprocess = "auto"
  c.data.channels = 1
  c.data.split = "train"
  c.data.data_dir = config_dict.placeholder(str)

  # The measurement: a task (emd_jax.formats.ud2m_export.TASKS) and its operator settings;
  # only the settings the task's operator takes are used.
  c.task = task
  c.sigma_y = 0.05  # measurement noise std, [-1, 1] image units
  c.operator = ml_collections.ConfigDict()
  c.operator.kernel_size = 15  # blur (clipped to the image side)
  c.operator.std = 1.5  # Gaussian blur std, pixels
  c.operator.intensity = 0.5  # motion blur
  c.operator.missing = 0.7  # random inpainting: fraction of pixels dropped
  c.operator.seed = 0  # mask / motion kernel seed
  c.operator.factor = 4  # super-resolution
  c.operator.box_size = config_dict.placeholder(int)  # box inpainting (None: half the side)

  # The N x K unfolded sampler (ALGORITHMS.md section 7).
  c.sampler = ml_collections.ConfigDict()
  c.sampler.num_outer = 3
  c.sampler.num_inner = 3
  c.sampler.timesteps = (999, 444, 111)  # DDPM times of the outer steps
  c.sampler.eta = 0.8
  c.sampler.xt_likelihood = True
  c.sampler.init = "backproject"  # matches the teacher-forced training of each outer step
  c.sampler.t_delta_max = 1.0  # initial re-noise levels, log-spaced max -> min over the N*K blocks
  c.sampler.t_delta_min = 0.05
  c.sampler.lam_over_t_delta_sq = 1.0  # initial lam = this * t_delta^2

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 5
  c.lora.scale = 1.0
  # Regexes over parameter paths. UD2M's choice, attention + output layers (DEFAULT_TARGETS, the
  # ImageNet config), is 3k adapter parameters on this 317k-parameter teacher (attention at 8x8
  # only); every layer (ALL_TARGETS, 63k) gained +0.95 dB deblurring PSNR at 400 steps (docs/ud2m.md).
  c.lora.targets = ALL_TARGETS

  # AdamW for LoRA (lr) and the block parameters (lr * unfolded_lr_mult); base weights frozen.
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3  # the paper's 1e-4 (configs/ud2m_imagenet_deblur.py) barely moves LoRA in a CPU-minutes run
  c.optim.unfolded_lr_mult = 10.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0  # global norm; 0: off

  c.loss = ml_collections.ConfigDict()
  c.loss.mse_weight = 1.0
  c.loss.weighting = "eps"  # noise-prediction MSE ("eps") or clean-image MSE ("x0")
  c.loss.perceptual_weight = 0.1
  c.loss.adversarial_weight = 0.01

  # Perceptual features: "digits_classifier" (the shipped classifier's penultimate layer),
  # "none", or a name registered in emd_jax.jobs.ud2m.PERCEPTUAL (e.g. "lpips", see docs/ud2m.md).
  c.perceptual = ml_collections.ConfigDict()
  c.perceptual.kind = "digits_classifier"
  c.perceptual.weights = ""  # weights file for registered features (LPIPS); unused by the classifier

  c.disc = ml_collections.ConfigDict()
  c.disc.width = 32
  c.disc.levels = 2
  c.disc.conditional = True  # the critic sees [x, backproject(y)]
  c.disc.lr = 1e-4
  c.disc.b1 = 0.5
  c.disc.b2 = 0.999
  c.disc.weight_decay = 0.01
  c.disc.r1_gamma = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  c.log_every = 50
  c.eval_every = 200
  c.eval_num_samples = 128  # held-out images restored at each evaluation
  c.eval_split = "test"
  c.eval_batch_size = 128
  c.checkpoint_every = 200
  c.max_checkpoints = 2
  c.checkpoint_async = False  # small state: a save blocks for milliseconds; a kill loses <= one interval
  c.export_at_end = True
  c.copy_teacher = True  # export a copy of the teacher (False: reference it by path)
  c.nonfinite_limit = 20
  c.spike_factor = 0.0
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Seconds-long variant for tests (the teacher must be overridden with a tiny one)."""
  c.total_steps = 2
  c.batch_size = 8
  c.log_every = 1
  c.eval_every = 2
  c.eval_num_samples = 8
  c.eval_batch_size = 8
  c.checkpoint_every = 2
  c.disc.width = 8
  c.disc.levels = 1
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base_config("deblur")
  if arg == "tiny":
    return tiny(c)
  if arg:
    raise ValueError(f"configs/ud2m_digits_deblur.py: unknown variant {arg!r}; known: '', 'tiny'")
  return c

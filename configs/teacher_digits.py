"""Pre-train the digits teacher: a small EDM SongUNet on 8x8 digits padded to 16x16.

The shipped teachers (`emd_jax/assets/teachers/digits_uncond`, `digits_cond`)
were made with (see docs/digits.md for the measured time and quality):

  python -m emd_jax.main --config configs/teacher_digits.py --workdir runs/teacher_digits
  python -m emd_jax.main --config configs/teacher_digits.py:cond --workdir runs/teacher_digits_cond

and the EMA net is then in `<workdir>/teacher` (copy it into the assets).

Variants (`get_config(arg)`):
  ''      unconditional (the default teacher of configs/digits.py)
  'cond'  class-conditional, label dropout 0.1 (classifier-free guidance at `guidance`)
  'tiny'  a seconds-long run for the tests ('tiny,cond' for its conditional form)

Expected compute: ~0.45 CPU-seconds per step at batch 64 (317k parameters);
each evaluation draws `eval.num_samples` 35-NFE Heun samples (~70 ms each).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = set(filter(None, arg.split(",")))
  unknown = variants - {"cond", "tiny"}
  if unknown:
    raise ValueError(f"configs/teacher_digits.py: unknown variant(s) {sorted(unknown)}; known: '', 'cond', 'tiny'")
  cond = "cond" in variants
  c = ml_collections.ConfigDict()
  c.job = "teacher"
  c.name = "teacher_digits" + (":" + arg if arg else "")
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.resolution = 16
  c.data.preprocess = "pad"
  c.data.split = "train"
  c.data.num_classes = 10

  # EDM SongUNet (DDPM++), shrunk to 317k parameters (1.3 MB of float32).
  c.net = ml_collections.ConfigDict()
  c.net.arch = "song_unet"
  c.net.precond = "edm"
  c.net.sigma_data = 0.5
  c.net.img_resolution = 16
  c.net.in_channels = 1
  c.net.out_channels = 1
  c.net.model_channels = 16
  c.net.channel_mult = (1, 2, 2)
  c.net.num_blocks = 1
  c.net.attn_resolutions = (8,)
  c.net.dropout = 0.1
  c.net.label_dim = 10 if cond else 0
  c.net.label_dropout = 0.1 if cond else 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip = 1.0
  c.optimizer.warmup_steps = 200
  c.ema_decay = 0.998

  c.noise = ml_collections.ConfigDict()  # EDM training noise levels
  c.noise.kind = "lognormal"
  c.noise.p_mean = -1.2
  c.noise.p_std = 1.2
  c.noise.sigma_min = 0.002
  c.noise.sigma_max = 80.0

  c.guidance = 1.5 if cond else 1.0  # CFG scale of the saved conditional teacher (1 = none)

  c.eval = ml_collections.ConfigDict()
  c.eval.evaluator = "digits"
  c.eval.num_samples = 1000
  c.eval.final_num_samples = 1000  # the quality written into teacher.json
  c.eval.num_steps = 18  # Heun: 35 NFE
  c.eval.batch_size = 500
  c.eval.grid_size = 100

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.max_checkpoints = 2
  c.checkpoint_async = False  # small state: a save blocks for milliseconds; a kill loses <= one interval
  c.nonfinite_limit = 20
  c.save_teacher = True

  if "tiny" in variants:
    c.total_steps = 4
    c.batch_size = 8
    c.net.model_channels = 8
    c.net.channel_mult = (1, 2)
    c.net.attn_resolutions = (8,)
    c.eval.num_samples = 16
    c.eval.final_num_samples = 0
    c.eval.num_steps = 2
    c.eval.batch_size = 16
    c.eval.grid_size = 16
    c.log_every = 2
    c.eval_every = 4
    c.checkpoint_every = 2
  return c

"""EMD on class-conditional ImageNet 128x128 from a user-supplied teacher.

EDM publishes no 128x128 network; convert any EDM-format network (`python -m emd_jax.convert
--edm FILE --out DIR`, e.g. a DhariwalUNet or SongUNet trained at 128x128 with EDM's code) or
train one with `configs/teacher_*.py`, then:

  python -m emd_jax.main --config configs/imagenet128_emd.py --workdir gs://BUCKET/in128_emd \
      --config.teacher.checkpoint=DIR

EMD paper: one-step FID 6.0 on ImageNet-128 after 200k steps on 128 TPU-v5p (~10 days).

Expected compute (per step, batch 512, K = 8): as ImageNet-64 with 4x the pixels: ~4 PFLOP
per step; ~3 steps/s on 128 TPU-v5p at ~40% MFU. bf16, remat and FSDP are on.
"""

from emd_jax.config_defaults import distill_config, noise, shrink_for_tests


def get_config(arg: str = ""):
  c = distill_config()
  c.method = "emd"
  c.teacher.checkpoint = ""  # required
  c.total_steps = 200_000
  c.batch_size = 512  # project choice
  c.estep.num_steps = 8
  c.estep.gamma_eps = 0.1  # project choice
  c.generator.lr = 2e-6  # project choice
  c.fake.lr = 2e-6
  c.loss.noise = noise(-1.2, 1.2, sigma_min=0.02, sigma_max=80.0)
  c.compute_dtype = "bfloat16"
  c.remat = "full"
  c.mesh.fsdp = 16
  c.eval_every = 10_000
  c.eval_num_samples = 10_000
  c.checkpoint_every = 2_000
  if arg == "tiny":
    shrink_for_tests(c)
    c.compute_dtype = "float32"
    c.remat = "none"
  elif arg:
    raise ValueError(f"configs/imagenet128_emd.py: unknown variant {arg!r}; known: tiny")
  return c

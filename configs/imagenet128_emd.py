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

from emd_jax.config.defaults import emd_imagenet_config


def get_config(arg: str = ""):
  return emd_imagenet_config(128, total_steps=200_000, fsdp=16, remat="full", arg=arg)

"""EMD on class-conditional ImageNet 64x64 from EDM's ADM teacher.

Teacher: EDM's `edm-imagenet-64x64-cond-adm.pkl` (DhariwalUNet, 295.9M parameters):

  python -m emd_jax.convert --edm edm-imagenet-64x64-cond-adm.pkl --out teachers/imagenet64
  python -m emd_jax.main --config configs/imagenet64_emd.py --workdir gs://BUCKET/in64_emd \
      --config.teacher.checkpoint=teachers/imagenet64

EMD paper: one-step FID 2.20 on ImageNet-64 after 300k steps on 64 TPU-v4 (~8 days). The EMD
paper's hyper-parameter tables are not in our copy of the paper; values not stated there are
this project's choices (marked below).

Expected compute (per step, batch 512, K = 8): K x (teacher fwd + fake fwd) for the E-step
plus generator fwd+bwd and fake fwd+bwd: ~20 network passes of ~100 GFLOP per 64x64 image
(ADM) -> ~1 PFLOP per step; on 64 TPU-v4 chips at ~40% MFU, ~7 steps/s. Use bf16 compute
(`compute_dtype`, set below) and FSDP (`mesh.fsdp`) for the 296M-parameter networks.
"""

from emd_jax.config.defaults import emd_imagenet_config


def get_config(arg: str = ""):
  return emd_imagenet_config(64, total_steps=300_000, fsdp=8, remat="dots", arg=arg)

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

from emd_jax.config_defaults import distill_config, noise, shrink_for_tests


def get_config(arg: str = ""):
  c = distill_config()
  c.method = "emd"  # EMD's own linear M-step; `--config.method=emd_sim` for the default combination
  c.teacher.checkpoint = ""  # required: a converted EDM ImageNet-64 teacher
  c.total_steps = 300_000
  c.batch_size = 512  # project choice
  c.estep.num_steps = 8  # EMD-8
  c.estep.gamma_eps = 0.1  # project choice
  c.generator.lr = 2e-6  # project choice
  c.fake.lr = 2e-6
  c.loss.noise = noise(-1.2, 1.2, sigma_min=0.02, sigma_max=80.0)  # project choice
  c.compute_dtype = "bfloat16"
  c.remat = "dots"
  c.mesh.fsdp = 8
  c.eval_every = 10_000
  c.eval_num_samples = 10_000
  c.checkpoint_every = 2_000
  if arg == "tiny":
    shrink_for_tests(c)
    c.compute_dtype = "float32"
    c.remat = "none"
  elif arg:
    raise ValueError(f"configs/imagenet64_emd.py: unknown variant {arg!r}; known: tiny")
  return c

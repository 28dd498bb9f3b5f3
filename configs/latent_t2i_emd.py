"""Skeleton: EMD on a latent (text-to-image style) diffusion teacher supplied by the user.

The EMD paper distils Stable Diffusion 1.5 (COCO FID-30k 9.66 after 5000 steps, EMD-8, on
256 TPU-v5e); SIM distils PixArt-alpha (bf16, batch 1024, lognormal(-2, 2), lr 5e-6,
sigma in [0.01, 156.6]). emd_jax distils any denoiser it can load as a teacher checkpoint:
convert or export your latent-space network into the EDM-format teacher directory
(`emd_jax.teachers.network.save`; its `data_shape` is the latent shape, e.g. [64, 64, 4]),
then:

  python -m emd_jax.main --config configs/latent_t2i_emd.py --workdir gs://BUCKET/t2i \
      --config.teacher.checkpoint=DIR

What this skeleton does not do (yet): text conditioning (prompts and their embeddings are not
part of the teacher interface; class labels are), the VAE decoder (samples stay latents; decode
them with your own VAE), and classifier-free guidance beyond class labels.

Expected compute: with a ~600M-parameter latent U-Net/DiT at 64x64x4, K = 8 and batch 1024,
~10 PFLOP per step; ~1 step/s on 256 TPU-v5e at 40% MFU (EMD reports 5 hours for 5000 steps).
"""

from emd_jax.config.defaults import distill_config, noise, shrink_for_tests


def get_config(arg: str = ""):
  c = distill_config()
  c.method = "emd_sim"
  c.teacher.checkpoint = ""  # required: a latent-space teacher directory
  c.total_steps = 5_000
  c.batch_size = 1024
  c.estep.num_steps = 8
  c.generator.lr = 5e-6
  c.fake.lr = 5e-6
  c.fake.noise = noise(-2.0, 2.0, sigma_min=0.01, sigma_max=156.6)
  c.loss.noise = noise(-2.0, 2.0, sigma_min=0.01, sigma_max=156.6)
  c.compute_dtype = "bfloat16"
  c.remat = "full"
  c.keep_generator_pass = False  # less memory for one generator forward more (docs/scaling.md)
  c.grad_accum_steps = 8
  c.mesh.fsdp = 8
  c.eval_every = 1_000
  c.eval_num_samples = 1_024
  c.checkpoint_every = 500
  c.checkpoint_async = True  # pod-scale state: do not stall the step on each save (docs/reliability.md)
  if arg == "tiny":
    shrink_for_tests(c)
    c.compute_dtype = "float32"
    c.remat = "none"
    c.grad_accum_steps = 2
  elif arg:
    raise ValueError(f"configs/latent_t2i_emd.py: unknown variant {arg!r}; known: tiny")
  return c

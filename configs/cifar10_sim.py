"""SIM on CIFAR-10 (unconditional), the settings of the SIM paper's Table 5.

Teacher: EDM's `edm-cifar10-32x32-uncond-vp.pkl` (DDPM++, 55.7M parameters), converted once:

  python -m emd_jax.convert --edm edm-cifar10-32x32-uncond-vp.pkl --out teachers/cifar10_uncond
  python -m emd_jax.main --config configs/cifar10_sim.py --workdir runs/cifar10_sim \
      --config.teacher.checkpoint=teachers/cifar10_uncond

Class-conditional: `configs/cifar10_sim.py:cond` with `edm-cifar10-32x32-cond-vp.pkl`.
Paper: one-step FID 2.06 (uncond) / 1.96 (cond) vs the teacher's 1.97 / 1.82 at 35 NFE.

Expected compute (per step, batch 256): SIM backpropagates through both denoisers, so one
step is about 1 generator fwd+bwd, 1 fake fwd+bwd (DSM) and 1 teacher + 1 fake forward with
backward to the input: ~6 network passes of 56M parameters at 32x32, ~12 GFLOP per image per
pass-equivalent -> ~18 TFLOP per step. On a v4-8 (8 chips, ~275 bf16 TFLOP/s each, ~40% MFU)
that is roughly 20 steps/s; the paper reports convergence within a few hundred thousand steps.
"""

from emd_jax.config.defaults import distill_config, noise, shrink_for_tests


def get_config(arg: str = ""):
  c = distill_config()
  c.method = "sim"  # pseudo-Huber SIM
  c.teacher.checkpoint = ""  # required: a converted EDM CIFAR-10 teacher
  c.total_steps = 400_000
  c.batch_size = 256
  c.generator.sigma_init = 2.5
  c.generator.lr = 1e-5
  c.fake.lr = 1e-5
  c.generator.b1 = c.fake.b1 = 0.0
  c.generator.b2 = c.fake.b2 = 0.999
  c.fake.noise = noise(-1.2, 1.2)  # EDM lognormal, EDM weight (the DSM loss)
  c.loss.noise = noise(-3.5, 2.5)  # SIM's generator noise distribution (B.9-B.10)
  c.loss.weight = "one"
  c.eval_every = 10_000
  c.eval_num_samples = 10_000
  c.checkpoint_every = 5_000
  c.checkpoint_async = True  # pod-scale state: do not stall the step on each save (docs/reliability.md)
  variants = arg.split(",") if arg else []
  for v in variants:
    if v == "cond":
      pass  # the class-conditional teacher brings its label dimension; nothing else changes
    elif v == "tiny":
      shrink_for_tests(c)
    else:
      raise ValueError(f"configs/cifar10_sim.py: unknown variant {v!r}; known: cond, tiny")
  return c

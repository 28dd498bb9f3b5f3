"""SIM on FFHQ 64x64 (unconditional) from EDM's teacher `edm-ffhq-64x64-uncond-vp.pkl`.

  python -m emd_jax.convert --edm edm-ffhq-64x64-uncond-vp.pkl --out teachers/ffhq64
  python -m emd_jax.main --config configs/ffhq64_sim.py --workdir runs/ffhq64_sim \
      --config.teacher.checkpoint=teachers/ffhq64

Settings follow SIM's CIFAR-10 recipe (Table 5); the SIM paper reports no 64x64 face results,
so these are this project's starting point. Expected compute: the DDPM++ 64x64 network has
~62M parameters and 4x CIFAR-10's pixels: ~70 TFLOP per step at batch 256 (~6 network
passes), ~5 steps/s on a v4-8 at 40% MFU.
"""

from emd_jax.config.defaults import sim64_config


def get_config(arg: str = ""):
  return sim64_config("ffhq64", arg)

"""SIM on AFHQV2 64x64 (unconditional) from EDM's teacher `edm-afhqv2-64x64-uncond-vp.pkl`.

  python -m emd_jax.convert --edm edm-afhqv2-64x64-uncond-vp.pkl --out teachers/afhqv264
  python -m emd_jax.main --config configs/afhqv2_64_sim.py --workdir runs/afhqv264_sim \
      --config.teacher.checkpoint=teachers/afhqv264

Settings follow SIM's CIFAR-10 recipe (Table 5); the SIM paper reports no 64x64 face results,
so these are this project's starting point. Expected compute: the DDPM++ 64x64 network has
~62M parameters and 4x CIFAR-10's pixels: ~70 TFLOP per step at batch 256 (~6 network
passes), ~5 steps/s on a v4-8 at 40% MFU.
"""

from emd_jax.config.defaults import sim64_config


def get_config(arg: str = ""):
  return sim64_config("afhqv2_64", arg)

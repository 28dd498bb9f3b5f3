"""UD2M on the shipped digits teacher: random inpainting (70% of pixels missing), 9 NFE.

  python -m emd_jax.main --config configs/ud2m_digits_inpaint.py --workdir runs/ud2m_inpaint
  python -m emd_jax.restore --sampler runs/ud2m_inpaint/export --task inpaint \
      --input clean.npz --seed 0 --out restored.npz

Same settings as configs/ud2m_digits_deblur.py otherwise (expected compute: a
few minutes on 2 CPU cores). `:tiny` is the 2-step test variant.
"""

import importlib.util
import os

import ml_collections


def _deblur_module():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ud2m_digits_deblur.py")
  spec = importlib.util.spec_from_file_location("ud2m_digits_deblur", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  base = _deblur_module()
  c = base.base_config("inpaint")
  if arg == "tiny":
    return base.tiny(c)
  if arg:
    raise ValueError(f"configs/ud2m_digits_inpaint.py: unknown variant {arg!r}; known: '', 'tiny'")
  return c

"""UD2M with the paper's ImageNet settings: Gaussian deblurring at 256x256, 9 NFE.

Paper (Mbakam, Spence, Pereyra, TMLR 2025; ALGORITHMS.md section 7): ADM
teacher, N = 3 outer steps at DDPM times [999, 444, 111], eta = 0.8, K = 3
unfolded blocks, LoRA rank 5 on attention and the output layer, AdamW lr 1e-4,
weight decay 0.01, batch 2. The teacher is user-supplied: an EDM/ADM network
converted with `python -m emd_jax.convert` (see docs/convert.md):

  python -m emd_jax.main --config configs/ud2m_imagenet_deblur.py --workdir runs/ud2m_imagenet \
      --config.teacher.checkpoint=/path/to/converted_adm_256 --config.data.data_dir=/path/to/tfds

Gaussian blur 61 x 61, std 3.0, sigma_y = 0.05. Perceptual term: none by
default; with an LPIPS implementation registered (docs/ud2m.md) use
`--config.perceptual.kind=lpips --config.perceptual.weights=/path/to/lpips.npz`.
Expected compute: accelerator-scale (the paper reports days on one GPU).
"""

import importlib.util
import os

import ml_collections

from emd_jax.nets.lora import DEFAULT_TARGETS


def _deblur_module():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ud2m_digits_deblur.py")
  spec = importlib.util.spec_from_file_location("ud2m_digits_deblur", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  base = _deblur_module()
  c = base.base_config("deblur")
  c.total_steps = 100_000
  c.batch_size = 2
  c.optim.lr = 1e-4
  c.lora.targets = DEFAULT_TARGETS  # the paper's: attention projections + output layer
  c.teacher.checkpoint = ""  # required: a converted 256x256 EDM/ADM teacher directory
  c.data.name = "imagenet2012"
  c.data.resolution = 256
  c.data.preprocess = "resize"
  c.data.channels = 3
  c.eval_split = "validation[:64]"
  c.eval_num_samples = 16
  c.eval_batch_size = 4
  c.operator.kernel_size = 61
  c.operator.std = 3.0
  c.sigma_y = 0.05
  c.perceptual.kind = "none"
  c.disc.width = 64
  c.disc.levels = 4
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 5000
  c.checkpoint_async = True  # pod-scale state: do not stall the step on each save (docs/reliability.md)
  c.copy_teacher = False  # reference the (large) teacher by path
  if arg == "tiny":
    return base.tiny(c)
  if arg:
    raise ValueError(f"configs/ud2m_imagenet_deblur.py: unknown variant {arg!r}; known: '', 'tiny'")
  return c

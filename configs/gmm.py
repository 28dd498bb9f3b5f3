"""Distil the analytic 2-D Gaussian mixture into a one-step MLP generator.

The README's main job (no download, a few minutes on 2 CPU cores):

  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm

Other methods (ALGORITHMS.md section 6) from the command line:

  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm_sim --config.method=sim
  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm_emd16 \
      --config.method=emd --config.estep.num_steps=16

`configs/gmm.py:tiny` is a seconds-long variant used by the tests.
Expected compute: 4000 steps of the default method; about 40-50 steps/s for a
lone job on 2 CPU cores (under 2 minutes), 10-25 steps/s when the cores are shared.
Measured quality and the tuning behind these values: docs/gmm_results.md.
"""

import ml_collections

from emd_jax.config_defaults import distill_config, noise


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = distill_config()  # every distillation field, shared with the other configs
  c.total_steps = 4000
  c.batch_size = 512
  c.method = "emd_sim"

  # Teacher: 8 isotropic modes at radius 1.0, std 0.05, weights (k+1)/36.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.kind = "gmm"
  c.teacher.checkpoint = ""
  c.teacher.dim = 2
  c.teacher.num_modes = 8
  c.teacher.radius = 1.0
  c.teacher.std = 0.05
  c.teacher.weights = tuple((k + 1) / 36 for k in range(8))
  c.teacher.sigma_data = 0.5
  # Analytic teachers have no weights: the student starts from a surrogate
  # (the student net regressed on the exact denoiser), see distill/state.py.
  c.teacher.surrogate_steps = 1500
  c.teacher.surrogate_lr = 2e-3
  c.teacher.surrogate_batch_size = 512

  c.generator.lr = 1e-4
  c.fake.lr = 1e-3
  c.fake.noise = noise(-1.2, 1.2)
  c.loss.huber_c = 0.1
  c.loss.noise = noise(-1.2, 1.2)  # generator noise levels

  c.eval_every = 500
  c.eval_num_samples = 20000
  c.checkpoint_every = 500

  if arg == "tiny":
    c.total_steps = 40
    c.batch_size = 64
    c.teacher.surrogate_steps = 50
    c.net.hidden = 32
    c.net.depth = 1
    c.net.emb_dim = 16
    c.log_every = 10
    c.eval_every = 20
    c.eval_num_samples = 2000
    c.checkpoint_every = 20
  elif arg:
    raise ValueError(f"configs/gmm.py: unknown variant {arg!r}; known: '', 'tiny'")
  return c


__all__ = ["get_config", "noise"]

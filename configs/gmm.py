"""Distil the analytic 2-D Gaussian mixture into a one-step MLP generator.

The README's main job (no download, a few minutes on 2 CPU cores):

  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm

Other methods (ALGORITHMS.md section 6) from the command line:

  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm_sim --config.method=sim
  python -m emd_jax.main --config configs/gmm.py --workdir runs/gmm_emd16 \
      --config.method=emd --config.estep.num_steps=16

`configs/gmm.py:tiny` is a seconds-long variant used by the tests.
Expected compute: 4000 steps of the default method (EMD E-step K = 1 + SIM's loss);
1 min 43 s end to end on 2 idle CPU cores (measured 2026-12-06, docs/gmm_results.md).
Measured quality and the tuning behind these values: docs/gmm_results.md.
"""

import ml_collections

from emd_jax.config.defaults import distill_config, noise


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = distill_config()  # every distillation field, shared with the other configs
  c.total_steps = 4000
  c.batch_size = 512
  c.method = "emd_simloss_k1"

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

  # Diversity figures (docs/gmm_results.md "Diversity"): at lr 1e-4 the bridges between modes
  # empty too slowly (13% of samples off-mode after 4000 steps); 1e-3 with a cosine decay to 1e-4
  # calms the raw generator's jitter so that the EMA does not average maps apart, and lower
  # generator noise levels empty the bridges faster. Where the student starts (docs/gmm_results.md
  # "Where the student starts"): g(z) = D(z, sigma_init) begins as the teacher's denoiser, whose
  # output at 2.5 is a blend of all modes (mode-mass TV 0.38), at 1.0 already near the right modes
  # (TV 0.09): the bridges empty in fewer steps. A cosine decay of the fake lr calms the fake
  # denoiser's noise, which narrowed the cores, and a 0.998 EMA follows the decayed generator
  # closely. Over 3 seeds, 4000 steps of K = 1: off-mode 2.0%, basin spread 1.03, TV 0.016 (0.013-0.022).
  c.generator.sigma_init = 1.0
  c.generator.lr = 1e-3
  c.generator.decay = "cosine"
  c.generator.end_factor = 0.1
  c.generator.ema_decay = 0.998
  c.fake.lr = 1e-3
  c.fake.decay = "cosine"
  c.fake.end_factor = 0.1
  c.fake.noise = noise(-1.2, 1.2)
  c.loss.huber_c = 0.1
  c.loss.noise = noise(-2.0, 1.5)  # generator noise levels
  # Few-step students (N > 1 only): the default grid's last level. At 0.2 the last step cannot move
  # mass between modes 0.77 apart (2 steps: TV 0.028); at 0.5 it can (one seed: TV 0.0125, off-mode 1.6%, ahead
  # of the one-step student; docs/gmm_results.md "Few-step students"). Measured from sigma_init 2.5: from
  # today's 1.0 a 2-step student is behind the one-step one on the masses (TV 0.029 vs 0.014, one seed).
  c.generator.sigma_min = 0.5

  c.eval_every = 500
  c.eval_num_samples = 20000
  c.checkpoint_every = 500

  if arg == "tiny":
    c.total_steps = 40
    c.batch_size = 64
    # Tests stop and extend runs by changing total_steps; a decay would tie the schedule to it.
    c.generator.decay = "none"
    c.fake.decay = "none"
    # The library's sigma_init: the tests' grids and export checks are written against it.
    c.generator.sigma_init = 2.5
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

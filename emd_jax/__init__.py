"""emd_jax: score-based distillation of diffusion models in JAX.

EM Distillation (EMD), Score Implicit Matching (SIM) and its special cases
(SiD, Diff-Instruct, DMD), and UD2M posterior samplers, as one framework.
The mathematics is specified in ALGORITHMS.md (shipped as docs/algorithms.md).
"""

__version__ = "0.1.0"

"""Teachers: frozen denoisers, analytic (exact) or network checkpoints."""

from emd_jax.teachers.base import Teacher


def load(path: str) -> Teacher:
  """Loads a teacher checkpoint directory (see `emd_jax.teachers.network`)."""
  from emd_jax.teachers import network

  return network.load(path)


__all__ = ["Teacher", "load"]

"""Teachers: frozen denoisers, analytic (exact) or network checkpoints."""

from emd_jax.teachers.base import Teacher

BUILTIN_PREFIX = "builtin:"


def resolve_path(path: str) -> str:
  """`builtin:NAME` -> the teacher shipped in `emd_jax/assets/teachers/NAME`; other paths unchanged."""
  import os

  from emd_jax.formats import paths

  if path.startswith(BUILTIN_PREFIX):
    name = path[len(BUILTIN_PREFIX) :]
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "teachers", name)
  return paths.expanduser(path)


def load(path: str) -> Teacher:
  """Loads a teacher checkpoint directory (see `emd_jax.teachers.network`); `builtin:NAME` for shipped ones."""
  from emd_jax.teachers import network

  return network.load(resolve_path(path))


__all__ = ["Teacher", "load"]


def from_config(cfg) -> Teacher:
  """Builds the teacher a config's `teacher` section names.

  kind "gmm": the analytic mixture (fields dim, num_modes, radius, std, weights).
  kind "checkpoint": a teacher checkpoint directory (`teacher.checkpoint`).
  """
  kind = cfg.kind
  if kind == "gmm":
    from emd_jax.teachers.gmm import gmm_teacher

    weights = cfg.get("weights") or None
    return gmm_teacher(
      dim=cfg.dim,
      num_modes=cfg.num_modes,
      radius=cfg.radius,
      std=cfg.std,
      weights=weights,
      sigma_data=cfg.get("sigma_data", 0.5),
    )
  if kind == "checkpoint":
    if not cfg.get("checkpoint"):
      raise ValueError("teacher.checkpoint: no teacher checkpoint directory given (teacher.kind='checkpoint')")
    return load(cfg.checkpoint)
  raise ValueError(f"teacher.kind: unknown teacher kind {kind!r}; known: 'gmm', 'checkpoint'")

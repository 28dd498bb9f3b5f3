"""Orbax checkpoints: atomic, asynchronous, resumed exactly.

Each checkpoint step directory holds two items: `state` (the train-state
pytree) and `meta` (JSON: the config, a fingerprint of the shapes, the
version). Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-write leaves the previous checkpoint intact and
the partial one is ignored on restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with named items."""

  def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    saved = self._mngr.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=force,
    )
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores `step` into the shardings/dtypes of `abstract_state`."""
    out = self._mngr.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    return out["state"], dict(out["meta"])

  def restore_meta(self, step: int) -> dict:
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) that Orbax restores into."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

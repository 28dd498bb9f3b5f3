"""Orbax checkpoints: atomic, asynchronous, verified on restore, resumed exactly.

Each checkpoint step directory holds two items: `state` (the train-state
pytree) and `meta` (JSON: the config, a fingerprint of the shapes, the
version, and a checksum of every state array). Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-write leaves the
previous checkpoint intact; the partial one is deleted when the next run
opens the directory.

A finished step can still be unusable (a truncated or overwritten array file,
a missing item, arrays of other shapes). Orbax raises on most of these, but
not all: zeroed bytes inside a data file restore silently. `restore` therefore
recomputes the checksums and raises `CorruptCheckpointError` on any mismatch;
`quarantine` renames such a step directory aside (never deletes it), so the
run falls back to an older step and its later saves of the same step number
do not collide with the bad one.

Checkpoint directories may be local or on an object store Orbax supports
(`gs://`, `s3://`: TensorStore has drivers for them); there Orbax marks a
finished step with its own commit file instead of a rename. Other URIs
(`ram://`, ...) are refused with a clear error: TensorStore cannot write them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from emd_jax.errors import UserError
from emd_jax.formats import paths

QUARANTINE_PREFIX = "corrupt-step"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint step exists but cannot be restored faithfully."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint step {step} is unusable: {reason}")
    self.step = step
    self.reason = reason


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (any dtype)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size < 4:
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types: a trailing axis of 2 words


@jax.jit
def _checksums(tree) -> list[jax.Array]:
  """Per leaf: (sum of words, position-weighted sum of words), both mod 2^32."""

  def leaf(x):
    w = _words(x).reshape(-1)
    pos = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * pos, dtype=jnp.uint32)])

  return [leaf(x) for x in jax.tree.leaves(tree)]


def checksums(tree) -> list[list[int]]:
  """JSON-ready checksums of every array of `tree` (one host sync; used at checkpoint steps only)."""
  return [[int(a), int(b)] for a, b in (np.asarray(c) for c in jax.device_get(_checksums(tree)))]


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
  return text if len(text) <= limit else text[:limit] + " ..."


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with named items and verified restores."""

  def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = False, read_only: bool = False):
    """`read_only`: for readers of another run's checkpoints (`emd_jax.evaluate`): creates and deletes nothing."""
    self.directory = paths.abspath(directory)
    if paths.is_remote(self.directory) and not self.directory.startswith(paths.ORBAX_SCHEMES):
      raise UserError(
        f"checkpoint directory {self.directory}: Orbax checkpoints need a local path or one of "
        f"{', '.join(paths.ORBAX_SCHEMES)} (TensorStore cannot write {self.directory.split('://')[0]}://)"
      )
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=not read_only,
      enable_async_checkpointing=asynchronous,
      cleanup_tmp_directories=not read_only,
      **({"read_only": True} if read_only else {}),
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  @classmethod
  def for_run(cls, workdir: str, config) -> Checkpointer:
    """The run's checkpointer in `<workdir>/checkpoints`: `max_checkpoints` kept, `checkpoint_async` writes.

    `checkpoint_async=False` (the default) blocks until each write is committed, so a SIGKILL
    loses at most `checkpoint_every` steps. Asynchronous writes overlap the next steps; a kill
    during one loses the steps since the previous complete checkpoint, at most
    `checkpoint_every` plus the steps run while the write was in flight.
    """
    return cls(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.get("max_checkpoints", 3),
      asynchronous=bool(config.get("checkpoint_async", False)),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """Orbax/JAX preemption sync point (multi-process runs); False when the service is off."""
    return self._mngr.reached_preemption(step)

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves `state` and `meta` (plus the state's checksums) asynchronously; returns whether it saved."""
    meta = {**meta, "checksums": checksums(state)}
    saved = self._mngr.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=force,
    )
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state, verify: bool = True) -> tuple[Any, dict]:
    """Restores `step` into the shardings/dtypes of `abstract_state`.

    Raises `CorruptCheckpointError` (with the reason) when the step cannot be
    read, its arrays have other shapes, or their checksums do not match.
    """
    try:
      out = self._mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
      )
    except Exception as e:  # noqa: BLE001  (Orbax/TensorStore raise many types; all mean "unusable")
      raise CorruptCheckpointError(step, _first_line(e)) from e
    state, meta = out["state"], dict(out["meta"] or {})
    if verify:
      expected = meta.get("checksums")
      if expected is None:
        logging.warning("checkpoint step %d has no checksums (written by an older version); not verified", step)
      else:
        got = checksums(state)
        if len(got) != len(expected):
          raise CorruptCheckpointError(step, f"{len(got)} arrays restored, {len(expected)} were saved")
        bad = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if list(a) != list(b)]
        if bad:
          paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
          names = ", ".join(paths[i] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
          raise CorruptCheckpointError(step, f"checksum mismatch in {len(bad)} array(s): {names}")
    return state, meta

  def restore_meta(self, step: int) -> dict:
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpointError(step, _first_line(e)) from e
    if out["meta"] is None:
      raise CorruptCheckpointError(step, "the 'meta' item is empty")
    return dict(out["meta"])

  def quarantine(self, step: int, reason: str) -> str:
    """Moves an unusable step directory aside (kept for inspection) and forgets the step.

    Local: one rename. Object store: a copy, then the step deleted (`paths.move_tree`); a crash
    in between leaves the step in place, found unusable and moved again by the next run.
    """
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"{QUARANTINE_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    if jax.process_index() == 0 and paths.exists(src):
      paths.move_tree(src, dst)
      paths.write_text(os.path.join(dst, "WHY_QUARANTINED.txt"), reason + "\n")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"emd_jax_quarantine_{step}")
    self._mngr.reload()
    return dst

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

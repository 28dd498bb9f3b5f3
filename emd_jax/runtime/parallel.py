"""Device mesh, sharding rules and multi-host set-up.

One code path from one CPU to a pod: a `jax.make_mesh` mesh with axes
`("data", "fsdp")`; per-example arrays are split over both axes, parameters
and optimizer state FSDP-style along their largest dimension divisible by the
`fsdp` axis size (small leaves stay replicated). Shardings are derived from
shapes (`jax.eval_shape`), never from values.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
  """Resolves `mesh.data` (-1: the rest) and `mesh.fsdp` against the device count."""
  fsdp = int(mesh_cfg.get("fsdp", 1))
  data = int(mesh_cfg.get("data", -1))
  if fsdp < 1:
    raise ValueError(f"mesh.fsdp must be >= 1, got {fsdp}")
  if data == -1:
    if num_devices % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
    data = num_devices // fsdp
  if data < 1 or data * fsdp != num_devices:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but {num_devices} are available")
  return data, fsdp


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The ("data", "fsdp") mesh; `mesh.devices` (default -1: all) limits it to the first N devices."""
  if devices is None:
    devices = jax.devices()
    n = int(mesh_cfg.get("devices", -1))
    if n > len(devices):
      raise ValueError(f"mesh.devices={n}, but only {len(devices)} devices are available")
    if n > 0:
      devices = devices[:n]
  data, fsdp = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 2  # shardings propagate from in/out specs + constraints
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) dimension split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**14) -> P:
  """Shards the largest dimension divisible by `fsdp`; replicates small leaves."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, min_size: int = 2**14):
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (FSDP rules)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size)), tree)


def check_batch(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {n} data-parallel devices of the mesh")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """`jax.distributed.initialize`: explicit coordinator when given, automatic on TPU pods.

  On CPU, the gloo collectives are selected so multi-process CPU runs work.
  """
  if coordinator_address:
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  elif _on_tpu_pod():
    jax.distributed.initialize()
  logging.info(
    "process %d/%d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _on_tpu_pod() -> bool:
  import os

  return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))

"""FSDP weights gathered one layer at a time, in the forward pass and again in the backward pass.

With parameters sharded over the mesh's `fsdp` axis (`parallel.fsdp_spec`), XLA's partitioner
gathers each weight where a layer uses it. Left to itself, XLA:CPU schedules every gather (and
the compute-dtype cast of the gathered weight) at the start of the program, since they depend
only on the parameters, and keeps each gathered copy until the layer's backward pass reads it:
a whole network's weights, unsharded, alive at once (docs/scaling.md, "Where the memory goes").

`layer_op(op, x, w)` computes `op(x, w)` (a layer's product with its weight) so that

- in the forward pass the weight is read through a value that depends on `x`, so it cannot be
  gathered before the layer's input exists, and is constrained to its shard until then;
- the backward pass does not keep the forward's gathered weight: a custom VJP saves `x` and the
  *sharded* `w`, and re-derives the weight through a value that depends on the output
  cotangent, so it is gathered again when the layer's gradient is computed.

The dependence is `w + 0 * v[0]` (`v` the input or the cotangent), which XLA does not fold for
floating point; the result is numerically `w`, so gradients equal plain autodiff's (tested). The
layer's weight gradient is the gradient of `op` at the re-derived weight, reduced to the shard by
the partitioner. Active only while the step is traced under the mesh
(`jax.sharding.use_abstract_mesh`, which `runtime.runner.jit_step` enters when `mesh.gather` is
`"per_layer"`), with an `fsdp` axis larger than 1, and for weights `parallel.fsdp_spec` shards;
otherwise exactly `op(x, w)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from emd_jax.runtime.parallel import fsdp_spec

GATHER_MODES = ("auto", "per_layer")


def gather_mode(config) -> str:
  """`config.mesh.gather`, "per_layer" when unset (configs written before the field existed)."""
  return config.mesh.get("gather", "per_layer")


def traced_under(mesh, fn: Callable) -> Callable:
  """`fn`, traced under `mesh` (`jax.sharding.use_abstract_mesh`): `layer_op` then gathers per layer.

  Wrap the function before `jax.jit` (`runtime.runner.jit_step` does for `mesh.gather="per_layer"`);
  the wrapper keeps `fn`'s name, so the jitted program keeps it in XLA's dumps.
  """

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return traced


def _spec(w) -> P | None:
  """The shard spec of `w` on the current mesh, or None when per-layer gathering does not apply."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "fsdp" not in mesh.axis_names:
    return None
  n = mesh.shape["fsdp"]
  spec = fsdp_spec(tuple(w.shape), n)
  return spec if n > 1 and spec != P() else None


def _after(w, v, spec: P):
  """`w`, read no earlier than `v` exists and kept to its shard until then."""
  dep = jax.lax.stop_gradient(v.ravel()[0]).astype(w.dtype) * 0
  return jax.lax.with_sharding_constraint(w + dep, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _late(op: Callable, spec: P, x, w):
  return op(x, _after(w, x, spec))


def _late_fwd(op, spec, x, w):
  return op(x, _after(w, x, spec)), (x, w)


def _late_bwd(op, spec, res, g):
  x, w = res
  _, vjp = jax.vjp(op, x, _after(w, g, spec))
  return vjp(g)


_late.defvjp(_late_fwd, _late_bwd)


def layer_op(op: Callable, x, w):
  """`op(x, w)`, with `w` gathered per layer under an FSDP mesh (module docstring)."""
  spec = _spec(w)
  if spec is None or not jnp.issubdtype(w.dtype, jnp.floating):
    return op(x, w)
  return _late(op, spec, x, w)

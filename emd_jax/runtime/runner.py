"""One runner for every training job (distillation, teacher pre-training, UD2M).

A job is a `Job`: only what differs between jobs (its state, its pure step and
the arguments the step reads besides the state, where batches come from, how it
evaluates and exports). `run_job` does everything else, once: the workdir, the
mesh, the checkpointer, a state created already sharded (or resumed from the
newest usable checkpoint), TensorBoard, `loop.run_loop` (checkpoints,
preemption, the non-finite stop), the export on process 0, and closing the
checkpointer and writer whatever happens.

The step is jitted here with explicit shardings and a donated state:

  step(state, *args)          -> (state, metrics)   without `batches`
  step(state, *args, batch)   -> (state, metrics)   with `batches`

`args` (teacher parameters, the frozen base, feature-network weights...) are a
separate, sharded, never-donated input, never a closure constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh

from emd_jax.formats import paths
from emd_jax.runtime import checkpoint as ckpt_lib
from emd_jax.runtime import faults, fsdp, loop, parallel
from emd_jax.runtime import logs as metrics_lib

StepFn = Callable[..., tuple[Any, dict]]
EvalFn = Callable[[Any, int], tuple[dict, dict]]


@dataclasses.dataclass(frozen=True)
class Job:
  """What one training job supplies to `run_job`.

  abstract_state  the state's ShapeDtypeStructs (`jax.eval_shape` of `init`); its shardings follow
                  `parallel.tree_shardings`
  init            pure `(*init_inputs()) -> state`, run as `jit(init, out_shardings=...)`, so the state is
                  created sharded; `init_inputs()` (host work such as fitting a surrogate) runs only for a
                  fresh run, its arrays are placed by the FSDP rules first
  make_step       `mesh -> step`, the pure step above (the mesh for sharding constraints inside it)
  fingerprint     what a checkpoint in the workdir must match
  args            the step's extra arguments; `arg_shardings(mesh)` their shardings (default: FSDP rules)
  batches         `start_step -> iterator` of this process' host batches for steps start_step + 1, ...
                  (split over the mesh's data axes; the step's last argument)
  make_evaluate   `(mesh, placed args) -> evaluate(state, step) -> (scalars, images)`, run at eval steps and
                  the last one
  export          `(state, last evaluation) -> entries added to the result`, on process 0 after the last
                  step (None: nothing to export)
  console_keys    the metrics shown on the console line
  nan_injection   whether `debug.nan_at_steps` is supported: those updates see NaN `args`
  """

  abstract_state: Any
  init: Callable[..., Any]
  make_step: Callable[[Mesh], StepFn]
  fingerprint: dict
  init_inputs: Callable[[], tuple] = tuple
  args: tuple = ()
  arg_shardings: Callable[[Mesh], tuple] | None = None
  batches: Callable[[int], Iterator[Any]] | None = None
  make_evaluate: Callable[[Mesh, tuple], EvalFn] | None = None
  export: Callable[[Any, dict], dict] | None = None
  console_keys: tuple[str, ...] = ()
  nan_injection: bool = False


def fsdp_shardings(trees: tuple, mesh: Mesh) -> tuple:
  """The FSDP shardings (`parallel.tree_shardings`) of each tree in `trees`."""
  return tuple(parallel.tree_shardings(t, mesh) for t in trees)


def jit_step(
  step: StepFn, state_shardings, arg_shardings: tuple, batch_sharding=None, *, mesh: Mesh, gather: str = "per_layer"
) -> StepFn:
  """`step` jitted with explicit in/out shardings (metrics replicated) and the state donated.

  `gather="per_layer"` traces the step under the mesh (`jax.sharding.use_abstract_mesh`), which
  switches on `runtime.fsdp.layer_op`'s per-layer weight gathering in the networks' layers;
  `"auto"` leaves every gather to XLA's partitioner.
  """
  if gather not in fsdp.GATHER_MODES:
    raise ValueError(f"mesh.gather must be one of {fsdp.GATHER_MODES}, got {gather!r}")
  if gather == "per_layer":
    step = fsdp.traced_under(mesh, step)
  in_shardings = (state_shardings, *arg_shardings) + (() if batch_sharding is None else (batch_sharding,))
  return jax.jit(
    step, in_shardings=in_shardings, out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0
  )


def sharded_init(init: Callable[..., Any], state_shardings, inputs: tuple, mesh: Mesh):
  """`init(*inputs)` computed under jit straight into `state_shardings` (never whole on one device)."""
  placed = jax.device_put(inputs, fsdp_shardings(inputs, mesh))
  return jax.jit(init, out_shardings=state_shardings)(*placed)


def hparams(config) -> dict:
  """The config's scalar leaves with dotted names (TensorBoard's hparams)."""

  return {k: v for k, v in loop.flatten_dotted(config.to_dict()).items() if isinstance(v, (int, float, str, bool))}


def run_job(job: Job, config, workdir: str) -> dict:
  """Trains `job` to `config.total_steps`, resuming from `workdir` if it holds checkpoints.

  Reads `config.mesh`, `config.batch_size`, the loop settings (`loop.LoopConfig.from_config`) and the
  checkpoint settings. Returns the last evaluation's scalars, `step`, what `job.export` added, and the
  final `state`.
  """
  paths.makedirs(workdir)
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_batch(config.batch_size, mesh)
  state_sh = parallel.tree_shardings(job.abstract_state, mesh)
  arg_sh = job.arg_shardings(mesh) if job.arg_shardings is not None else fsdp_shardings(job.args, mesh)
  batch_sh = parallel.batch_sharding(mesh) if job.batches is not None else None
  step_fn = jit_step(job.make_step(mesh), state_sh, arg_sh, batch_sh, mesh=mesh, gather=fsdp.gather_mode(config))
  args = jax.device_put(job.args, arg_sh)
  meta = {"config": config.to_dict(), "fingerprint": job.fingerprint}

  checkpointer = ckpt_lib.Checkpointer.for_run(workdir, config)
  writer = None
  try:
    state, resumed = loop.resume_or_init(
      checkpointer,
      job.abstract_state,
      state_sh,
      job.fingerprint,
      lambda: sharded_init(job.init, state_sh, job.init_inputs(), mesh),
    )
    writer = metrics_lib.create_writer(workdir)
    if resumed is None:
      writer.write_hparams(hparams(config))

    if job.batches is None:
      next_batch = tuple
    else:
      from emd_jax.data import pipeline

      batches = job.batches(int(jax.device_get(state.step)))
      next_batch = lambda: (pipeline.to_global_array(next(batches), mesh, batch_sh),)  # noqa: E731
    train_step = lambda st: step_fn(st, *args, *next_batch())  # noqa: E731
    nan_step = lambda st: step_fn(st, *faults.poisoned(args), *next_batch())  # noqa: E731  (debug.nan_at_steps)

    state, last_eval = loop.run_loop(
      loop.LoopConfig.from_config(config),
      state,
      train_step,
      checkpointer=checkpointer,
      writer=writer,
      meta=meta,
      evaluate=None if job.make_evaluate is None else job.make_evaluate(mesh, args),
      console_keys=list(job.console_keys),
      nan_step_fn=nan_step if job.nan_injection else None,
    )
    if job.export is not None and jax.process_index() == 0:
      last_eval = {**last_eval, **job.export(state, last_eval)}
  finally:
    checkpointer.close()
    if writer is not None:
      writer.close()
  return {**last_eval, "state": state}

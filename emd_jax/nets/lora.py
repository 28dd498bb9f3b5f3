"""LoRA for any Flax parameter tree (UD2M's denoiser adaptation, ALGORITHMS.md section 7).

A selected weight `W` gets a low-rank update, `W_eff = W + scale * reshape(A @ B)`:

  Dense kernels `[in, out]`            A `[in, r]`,          B `[r, out]`
  Conv kernels `[kh, kw, in, out]`     A `[kh*kw*in, r]`,    B `[r, out]`   (HWIO, flattened fan-in)

`A` starts random (`N(0, 1/fan_in)`), `B` at zero, so a fresh adapter changes
nothing. The adapter tree mirrors the base tree but holds, at every selected
weight, `{"lora_a": A, "lora_b": B}`; `merge(base, lora, scale)` is pure and
jittable, so any module is used as `module.apply({"params": merge(base, lora)}, ...)`.

Which weights are adapted: a weight leaf is a leaf named `kernel` (Flax) or
`weight` (the EDM port) with 2 or 4 dimensions; among those, `target` picks by
path (names joined with "/"), either a callable `(path, leaf) -> bool` or a list
of regexes searched in the path (case-insensitive). `DEFAULT_TARGETS` covers UD2M's choice,
attention and the output layer:

  r"attn|attention"                     any module with attention in its name
  r"(^|/)(qkv|q|k|v|proj|to_q|to_k|to_v|to_out)/"   attention projections (EDM `qkv`, `proj`)
  r"(^|/)(out_conv|proj_out|conv_out|final|final_conv)/"   the output layer (Dhariwal `out_conv`)
  r"aux_conv/"                          EDM SongUNet's per-resolution output convs

`ALL_TARGETS` adapts every Dense and conv kernel: for a small network (the digits
teacher has attention at one resolution only) the default leaves too little to adapt.

The base weights stay frozen: keep them out of the differentiated arguments,
or put them in the same tree as the adapter and use `frozen_base_optimizer`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

Array = jax.Array
Target = Callable[[str, Array], bool] | Sequence[str]

DEFAULT_TARGETS: tuple[str, ...] = (
  r"attn|attention",
  r"(^|/)(qkv|q|k|v|proj|to_q|to_k|to_v|to_out)/",
  r"(^|/)(out_conv|proj_out|conv_out|final|final_conv)/",
  r"aux_conv/",
)
ALL_TARGETS: tuple[str, ...] = (r".*",)  # every kernel/weight leaf
_WEIGHT_NAMES = ("kernel", "weight")
_A, _B = "lora_a", "lora_b"


def _as_dict(tree: Any) -> dict:
  return unfreeze(tree) if isinstance(tree, FrozenDict) else tree


def is_weight(path: str, leaf: Array) -> bool:
  """A Dense (`[in, out]`) or Conv (`[kh, kw, in, out]`) weight leaf."""
  return path.rsplit("/", 1)[-1] in _WEIGHT_NAMES and getattr(leaf, "ndim", 0) in (2, 4)


def select_targets(base_params: Any, target: Target | None = None) -> list[str]:
  """The "/"-joined paths of the weights LoRA adapts, in flattening order."""
  target = DEFAULT_TARGETS if target is None else target
  if callable(target):
    rule = target
  else:
    patterns = [re.compile(p, re.IGNORECASE) for p in target]
    rule = lambda path, leaf: any(p.search(path) for p in patterns)
  flat = traverse_util.flatten_dict(_as_dict(base_params), sep="/")
  return [k for k, v in flat.items() if is_weight(k, v) and rule(k, v)]


def init_lora(rng: Array, base_params: Any, rank: int = 5, target: Target | None = None) -> dict:
  """Adapter factors for the selected weights: `A ~ N(0, 1/fan_in)`, `B = 0`.

  Returns a nested dict mirroring `base_params` with `{"lora_a", "lora_b"}` at
  every selected weight; raises if nothing is selected.
  """
  paths = select_targets(base_params, target)
  if not paths:
    raise ValueError("LoRA target rule selected no weights")
  flat = traverse_util.flatten_dict(_as_dict(base_params), sep="/")
  out = {}
  for i, path in enumerate(paths):
    w = flat[path]
    fan_in, fan_out = int(w.size // w.shape[-1]), int(w.shape[-1])
    r = min(rank, fan_in, fan_out)
    a = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, r), jnp.float32) / jnp.sqrt(fan_in)
    out[f"{path}/{_A}"] = a.astype(w.dtype)
    out[f"{path}/{_B}"] = jnp.zeros((r, fan_out), w.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def lora_delta(factors: dict, shape: tuple[int, ...], scale: float | Array = 1.0) -> Array:
  """`scale * A @ B` reshaped to the weight's `shape`."""
  return (scale * (factors[_A] @ factors[_B])).reshape(shape)


def merge(base_params: Any, lora_params: dict, scale: float | Array = 1.0, stop_base_grad: bool = False):
  """Effective parameters `W + scale * A B` at the adapted weights, `W` elsewhere.

  Pure and jittable; returns the same container type as `base_params`.
  `stop_base_grad` wraps the base weights in `stop_gradient` (no work is spent
  on their gradients when the whole tree is differentiated).
  """
  flat_base = traverse_util.flatten_dict(_as_dict(base_params), sep="/")
  flat_lora = traverse_util.flatten_dict(_as_dict(lora_params), sep="/")
  merged = {}
  for path, w in flat_base.items():
    merged[path] = jax.lax.stop_gradient(w) if stop_base_grad else w
  for path in {k.rsplit("/", 1)[0] for k in flat_lora}:
    if path not in flat_base:
      raise KeyError(f"LoRA factors at {path!r} have no base weight")
    factors = {_A: flat_lora[f"{path}/{_A}"], _B: flat_lora[f"{path}/{_B}"]}
    w = merged[path]
    merged[path] = w + lora_delta(factors, w.shape, scale).astype(w.dtype)
  out = traverse_util.unflatten_dict(merged, sep="/")
  return freeze(out) if isinstance(base_params, FrozenDict) else out


def lora_param_count(lora_params: Any) -> int:
  """Number of trainable adapter parameters."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(lora_params)))


def trainable_labels(params: dict, frozen: Sequence[str] = ("base",)) -> dict:
  """Labels `"frozen"` / `"trainable"` for a dict of top-level parameter groups.

  E.g. `{"base": base, "lora": lora, "unfolded": {...}}` -> base frozen, the rest trained.
  """
  return {
    k: jax.tree_util.tree_map(lambda _, k=k: "frozen" if k in frozen else "trainable", v) for k, v in params.items()
  }


def frozen_base_optimizer(tx: optax.GradientTransformation, params_tree_labels: Any) -> optax.GradientTransformation:
  """`tx` on the leaves labelled `"trainable"`, exactly zero updates on `"frozen"` ones.

  `params_tree_labels` is a label pytree (see `trainable_labels`) or a callable
  from params to one. Frozen leaves keep no optimizer state and, since their
  update is `set_to_zero`, weight decay does not touch them either.
  """
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, params_tree_labels)

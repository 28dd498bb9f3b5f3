"""Networks, built from JSON-serialisable specs.

A spec is a dict with an "arch" key and that architecture's constructor
arguments; `build(spec)` returns the Flax module. Every denoiser module is
EDM-preconditioned and is called as `module.apply(params, x, sigma, labels,
train=False)`, returning `D(x, sigma)` in data space.
"""

from __future__ import annotations

import importlib

# arch name -> "module:function" that takes the spec dict and returns a module.
_BUILDERS = {
  "mlp": "emd_jax.nets.mlp:build",
  "song_unet": "emd_jax.nets.edm_unet:build",
  "dhariwal_unet": "emd_jax.nets.edm_unet:build",
}


def build(spec: dict):
  """Builds the Flax module a spec describes; unknown archs raise a clear error."""
  arch = spec.get("arch")
  if arch not in _BUILDERS:
    raise ValueError(f"unknown network arch {arch!r}; known: {sorted(_BUILDERS)}")
  module_name, fn = _BUILDERS[arch].split(":")
  return getattr(importlib.import_module(module_name), fn)(spec)


def abstract_params(spec: dict, data_shape, num_classes: int = 0):
  """The parameter tree `build(spec)` initialises for data of `data_shape`, as shapes only (`jax.eval_shape`)."""
  import jax
  import jax.numpy as jnp

  module = build(spec)
  labels = jnp.zeros((1, num_classes)) if num_classes else None
  init = lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, *data_shape)), jnp.ones((1,)), labels)["params"]
  return jax.eval_shape(init)


def features_apply(module, params, x, sigma, labels=None):
  """The encoder features of one forward pass of a denoiser `module` built here: `[B, ..., C]`.

  The MLP's last hidden layer `[B, hidden]`; the EDM U-Nets' encoder output (the bottleneck)
  `[B, h, w, C]`. Each module `sow`s them into the `intermediates` collection, which a plain
  `apply` does not keep (so ordinary passes are unchanged); the decoder's work, unused here,
  is dropped by XLA under jit.
  """
  import jax

  _, state = module.apply({"params": params}, x, sigma, labels, mutable=["intermediates"])
  found = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    if any(getattr(k, "key", None) == "features" for k in path)
  ]
  if len(found) != 1:
    raise ValueError(f"features_apply: expected one 'features' entry from {type(module).__name__}, got {len(found)}")
  return found[0]

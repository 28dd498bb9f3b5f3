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

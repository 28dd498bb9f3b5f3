"""The teacher interface.

A teacher is a frozen denoiser `D_T(x, sigma, labels)` in the EDM frame
(data in `[-1, 1]` for images, `sigma` the EDM noise level). Its parameters are
a pytree kept apart from the function, so that the train step receives them as
a sharded, never-donated argument instead of closing over them as constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen denoiser: `apply(params, x, sigma, labels) -> D(x, sigma)`.

  Attributes:
    apply: pure function; `x` is `[B, *data_shape]`, `sigma` a scalar or `[B]`,
      `labels` `[B, num_classes]` one-hot (or None). Returns `[B, *data_shape]`.
    params: the pytree `apply` takes first.
    data_shape: shape of one example, e.g. `(2,)` or `(32, 32, 3)` (NHWC).
    num_classes: 0 for unconditional teachers.
    sigma_data: the data standard deviation of EDM preconditioning.
    spec: a JSON-serialisable description (kind, architecture) for checkpoints
      and exports.
  """

  apply: Callable[..., Array]
  params: Any
  data_shape: tuple[int, ...]
  num_classes: int = 0
  sigma_data: float = 0.5
  spec: dict = dataclasses.field(default_factory=dict)

  def denoise(self, x: Array, sigma: Array, label: Array | None = None) -> Array:
    """`D_T(x, sigma, label)` with the teacher's own parameters."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
    return self.apply(self.params, x, sigma, label)

  def bind(self, params=None) -> Callable[[Array, Array, Any], Array]:
    """A denoise closure over `params` (default: the teacher's own)."""
    params = self.params if params is None else params
    return lambda x, sigma, labels=None: self.apply(params, x, sigma, labels)

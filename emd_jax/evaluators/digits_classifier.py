"""A small CNN classifier for the 8x8 digits, shipped trained, used as a feature space.

The classifier sees digits zero-padded to 16x16 (the `digits` pipeline's
default layout, values in `[-1, 1]`, black = -1). Its penultimate activations
(`FEATURE_DIM`-d) are the feature space of the digits Frechet distance and of
precision/recall (`emd_jax.evaluators.digits`); its predictions give class
coverage. Images at other layouts are brought to this one by
`to_classifier_input`.

The shipped weights live in `emd_jax/assets/digits_classifier/` (params
msgpack + `meta.json` with the resolution, layout and test accuracy) and are
rebuilt deterministically with

  python -m emd_jax.evaluators.digits_classifier

(about a minute on one CPU core).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from emd_jax.data import digits_tfds
from emd_jax.formats import paths

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_classifier")
RESOLUTION = 16
FEATURE_DIM = 64
NUM_CLASSES = 10


class DigitsCNN(nn.Module):
  """conv32-conv32-pool-conv64-conv64-pool-dense(FEATURE_DIM)-dense(10)."""

  feature_dim: int = FEATURE_DIM
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: `[B, 16, 16, 1]` in `[-1, 1]` -> (logits `[B, 10]`, features `[B, feature_dim]`)."""
    for width in (32, 64):
      x = nn.gelu(nn.Conv(width, (3, 3))(x))
      x = nn.gelu(nn.Conv(width, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)  # [B, 4*4*64]
    features = nn.gelu(nn.Dense(self.feature_dim)(x))  # [B, F]
    logits = nn.Dense(self.num_classes)(features)
    return logits, features


def _pad_to(x: jax.Array, resolution: int) -> jax.Array:
  side = x.shape[1]
  if side == resolution:
    return x
  if side > resolution:  # centre crop
    lo = (side - resolution) // 2
    return x[:, lo : lo + resolution, lo : lo + resolution]
  lo = (resolution - side) // 2
  hi = resolution - side - lo
  return jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)), constant_values=-1.0)


def to_classifier_input(images: jax.Array, layout: str = "pad") -> jax.Array:
  """`[B, R, R, C]` in `[-1, 1]` -> `[B, 16, 16, 1]`, the classifier's layout.

  layout 'pad': the 8x8 digit sits centred on a black canvas of side R (the
  pipeline's `preprocess='pad'`): crop or pad to 16. layout 'resize': the
  digit was resized to R: resize back to 8x8, then pad to 16. Channels are
  averaged to grey.
  """
  images = jnp.asarray(images, jnp.float32)
  if images.shape[-1] != 1:
    images = images.mean(axis=-1, keepdims=True)
  side = images.shape[1]
  if layout == "resize" and side != 8:
    if side % 8 == 0:  # box filter: the least blur for an integer factor
      f = side // 8
      images = images.reshape(images.shape[0], 8, f, 8, f, 1).mean(axis=(2, 4))
    else:
      images = jax.image.resize(images, (images.shape[0], 8, 8, 1), "linear", antialias=True)
  elif layout not in ("pad", "resize"):
    raise ValueError(f"layout must be 'pad' or 'resize', got {layout!r}")
  return _pad_to(images, RESOLUTION)


def digits_images(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The real digits of `split` in the classifier's layout: `([N,16,16,1] in [-1,1], [N])`."""
  images, labels = digits_tfds.digits_arrays(split)
  x = images.astype(np.float32) / 127.5 - 1.0
  x = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), constant_values=-1.0)
  return x, labels


@functools.partial(jax.jit, static_argnames=("model",))
def _apply(model: DigitsCNN, params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return model.apply({"params": params}, x)


def predict(model: DigitsCNN, params: Any, images: jax.Array, batch_size: int = 512):
  """(logits `[N, 10]`, features `[N, F]`) as numpy, computed in batches."""
  logits, feats = [], []
  for i in range(0, len(images), batch_size):
    lg, ft = _apply(model, params, jnp.asarray(images[i : i + batch_size]))
    logits.append(np.asarray(lg))
    feats.append(np.asarray(ft))
  return np.concatenate(logits), np.concatenate(feats)


def accuracy(model: DigitsCNN, params: Any, images: np.ndarray, labels: np.ndarray) -> float:
  logits, _ = predict(model, params, images)
  return float((logits.argmax(-1) == labels).mean())


def _shift(rng: np.random.Generator, x: np.ndarray, max_shift: int) -> np.ndarray:
  """Random integer translations (black fill), a light augmentation."""
  out = np.full_like(x, -1.0)
  r = x.shape[1]
  for i, (dy, dx) in enumerate(rng.integers(-max_shift, max_shift + 1, size=(len(x), 2))):
    src = x[i, max(0, -dy) : r - max(0, dy), max(0, -dx) : r - max(0, dx)]
    out[i, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
  return out


def train_classifier(
  seed: int = 0, steps: int = 600, batch_size: int = 128, lr: float = 2e-3, max_shift: int = 1
) -> tuple[DigitsCNN, Any, dict]:
  """Trains on the train split (1,500 images); returns (model, params, meta with test accuracy)."""
  x_train, y_train = digits_images("train")
  x_test, y_test = digits_images("test")
  model = DigitsCNN()
  params = model.init(jax.random.key(seed), jnp.zeros((1, RESOLUTION, RESOLUTION, 1)))["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  t0 = time.time()
  for _ in range(steps):
    idx = rng.integers(0, len(x_train), size=batch_size)
    x = _shift(rng, x_train[idx], max_shift)
    params, opt_state, loss = step(params, opt_state, x, y_train[idx])
  meta = {
    "resolution": RESOLUTION,
    "layout": "8x8 digit zero-padded (black, -1) to 16x16, values in [-1, 1], NHWC grey",
    "feature_dim": FEATURE_DIM,
    "num_classes": NUM_CLASSES,
    "train_split": "emd_digits train (1500)",
    "test_split": "emd_digits test (297)",
    "train_accuracy": accuracy(model, params, x_train, y_train),
    "test_accuracy": accuracy(model, params, x_test, y_test),
    "final_loss": float(loss),
    "steps": steps,
    "batch_size": batch_size,
    "seed": seed,
    "train_seconds": round(time.time() - t0, 1),
  }
  return model, params, meta


def save_classifier(params: Any, meta: dict, directory: str = ASSET_DIR) -> None:
  paths.makedirs(directory)
  paths.write_bytes(os.path.join(directory, "params.msgpack"), serialization.to_bytes(params))
  paths.write_text(os.path.join(directory, "meta.json"), json.dumps(meta, indent=2, sort_keys=True))


@functools.lru_cache(maxsize=2)
def load_classifier(directory: str = ASSET_DIR) -> tuple[DigitsCNN, Any, dict]:
  """Loads the shipped classifier: (model, params, meta)."""
  model = DigitsCNN()
  meta = json.loads(paths.read_text(os.path.join(directory, "meta.json")))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, RESOLUTION, RESOLUTION, 1)))["params"])
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  params = serialization.from_bytes(template, paths.read_bytes(os.path.join(directory, "params.msgpack")))
  return model, params, meta


if __name__ == "__main__":
  _, trained, info = train_classifier()
  save_classifier(trained, info)
  print(json.dumps(info, indent=2))

"""Input pipelines: TFDS / image folders -> per-process batches -> global `jax.Array`s.

Every batch is a dict of numpy arrays for this process:
  `image`: float32 `[B_local, R, R, C]` in `[-1, 1]` (NHWC),
  `label`: float32 `[B_local, num_classes]` one-hot (all zeros when the source
           has no labels).

Config fields read (an ml_collections `data` section; missing fields take the
defaults in brackets):
  name           TFDS name; `digits` is the local scikit-learn builder
                 (`emd_jax.data.digits_tfds`), anything else (`cifar10`,
                 `imagenet2012`, ...) goes through `tfds.load`. Ignored when
                 `image_folder` is set. ['digits']
  image_folder   a folder of PNG/JPEG images (class subfolders give labels),
                 see `emd_jax.data.image_folder`. [None]
  resolution     output side length R. [16]
  preprocess     'pad' (zero-pad, i.e. black, to R; the image must not be larger),
                 'resize' (antialiased bilinear) or 'auto' (pad when the source
                 is smaller than R and R - side is even, else resize). ['auto']
  channels       output channels; 1 <-> 3 converted by averaging / repeating.
                 [source channels]
  split          default split for training. ['train']
  data_dir       TFDS data dir. [~/.cache/emd_jax/tfds]
  shuffle_buffer tf.data shuffle buffer for streamed sources. [10000]
  num_classes    one-hot width. [10]
  in_memory      True: load the whole split into host memory and sample by
                 index; False: stream it; None: True for digits and image
                 folders, False for other TFDS names. [None]

Two ways to read:
  * `make_dataset(...)`: a plain tf.data pipeline (per-process shard, shuffle,
    repeat, batch, prefetch) for evaluation or ad-hoc use.
  * `make_train_iterator(...)`: the training iterator, exactly resumable: the
    batches it yields from `start_step` on equal bit for bit those of an
    uninterrupted iterator started at step 0.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from emd_jax.data import digits_tfds, image_folder
from emd_jax.formats import paths

Batch = dict[str, np.ndarray]
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "emd_jax", "tfds")


def _get(cfg: Any, key: str, default: Any) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def data_dir(cfg: Any) -> str:
  """The TFDS data dir the config names, `~` expanded."""
  return paths.expanduser(_get(cfg, "data_dir", DEFAULT_DATA_DIR))


def seed_for(*parts: int | str) -> int:
  """A 31-bit seed derived from `parts` (stable across runs and platforms)."""
  digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------
# Preprocessing (shared by every source, so in-memory and streamed agree).


def _pad_or_resize(side: int, resolution: int, mode: str) -> str:
  if mode == "auto":
    return "pad" if side <= resolution and (resolution - side) % 2 == 0 else "resize"
  if mode not in ("pad", "resize"):
    raise ValueError(f"data.preprocess must be 'auto', 'pad' or 'resize', got {mode!r}")
  if mode == "pad" and side > resolution:
    raise ValueError(f"cannot pad a {side}px image to {resolution}px; use preprocess='resize'")
  return mode


def preprocess_images(
  images: tf.Tensor | np.ndarray, resolution: int, mode: str = "auto", channels: int | None = None
) -> tf.Tensor:
  """uint8 `[N, H, W, C]` (square) -> float32 `[N, R, R, C']` in `[-1, 1]`.

  Padding is centred (extra pixel, if any, at the bottom/right) with the black
  value, which is -1 after scaling.
  """
  images = tf.convert_to_tensor(images)
  side = int(images.shape[1])
  x = tf.cast(images, tf.float32)
  how = _pad_or_resize(side, resolution, mode)
  if how == "pad" and side != resolution:
    lo = (resolution - side) // 2
    hi = resolution - side - lo
    x = tf.pad(x, [[0, 0], [lo, hi], [lo, hi], [0, 0]])
  elif how == "resize" and side != resolution:
    x = tf.image.resize(x, (resolution, resolution), method="bilinear", antialias=True)
    x = tf.clip_by_value(x, 0.0, 255.0)
  c_in = int(images.shape[-1])
  if channels is not None and channels != c_in:
    if c_in == 1:
      x = tf.repeat(x, channels, axis=-1)
    elif channels == 1:
      x = tf.reduce_mean(x, axis=-1, keepdims=True)
    else:
      raise ValueError(f"cannot convert {c_in} channels to {channels}")
  return x / 127.5 - 1.0


def one_hot(labels: tf.Tensor | np.ndarray, num_classes: int) -> tf.Tensor:
  """int labels `[N]` -> float32 `[N, num_classes]`; negative labels give zeros."""
  return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)


def _preprocess_fn(cfg: Any):
  resolution = int(_get(cfg, "resolution", 16))
  mode = _get(cfg, "preprocess", "auto")
  channels = cfg.get("channels", None) if hasattr(cfg, "get") else None
  num_classes = int(_get(cfg, "num_classes", 10))

  def fn(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    # Works on a batch: image [N, H, W, C] uint8, label [N].
    image = preprocess_images(example["image"], resolution, mode, channels)
    label = example.get("label", -tf.ones(tf.shape(example["image"])[:1], tf.int64))
    return {"image": image, "label": one_hot(label, num_classes)}

  return fn


# ----------------------------------------------------------------------------
# Sources.


def _is_digits(cfg: Any) -> bool:
  return not _get(cfg, "image_folder", "") and _get(cfg, "name", "digits") in (
    "digits",
    digits_tfds.NAME,
  )


def _in_memory(cfg: Any) -> bool:
  flag = _get(cfg, "in_memory", "auto")
  if flag in ("auto", None):
    return _is_digits(cfg) or bool(_get(cfg, "image_folder", ""))
  return bool(flag)


def _tfds_source(cfg: Any, split: str, shuffle_files_seed: int | None) -> tf.data.Dataset:
  """Raw examples {'image': uint8 [H, W, C], 'label': int} from TFDS (prepared if needed)."""
  if _is_digits(cfg):
    builder = digits_tfds.prepare_digits(data_dir(cfg))
    ds = builder.as_dataset(split=split, shuffle_files=False)
  else:
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_files_seed)
    ds = tfds.load(
      _get(cfg, "name", "digits"),
      split=split,
      data_dir=data_dir(cfg),
      shuffle_files=shuffle_files_seed is not None,
      read_config=read_config,
    )
  return ds.map(lambda e: {"image": e["image"], "label": e.get("label", tf.constant(-1, tf.int64))})


def _raw_source(cfg: Any, split: str, shuffle_files_seed: int | None = None) -> tf.data.Dataset:
  folder = _get(cfg, "image_folder", "")
  if folder:
    return image_folder.folder_dataset(
      folder, int(_get(cfg, "resolution", 16)), channels=cfg.get("channels", None) or 3
    )
  return _tfds_source(cfg, split, shuffle_files_seed)


def _process_split(split: str, process_index: int, process_count: int) -> str:
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]


def load_arrays(cfg: Any, split: str | None = None) -> Batch:
  """The whole (preprocessed) split in host memory: {'image' [N,R,R,C], 'label' [N,K]}."""
  split = split or _get(cfg, "split", "train")
  ds = _raw_source(cfg, split).batch(4096).map(_preprocess_fn(cfg))
  parts = list(ds.as_numpy_iterator())
  return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}


def make_dataset(
  cfg: Any,
  split: str | None = None,
  *,
  batch_size: int,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  shuffle: bool = True,
  repeat: bool = True,
  drop_remainder: bool = True,
  prefetch: int = 2,
) -> tf.data.Dataset:
  """A deterministic tf.data pipeline of this process' batches (`batch_size` per process).

  The split is divided evenly between processes (`tfds.even_splits`) so shards
  are disjoint; the shuffle is seeded; the order is deterministic.
  """
  split = split or _get(cfg, "split", "train")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if _get(cfg, "image_folder", ""):
    ds = _raw_source(cfg, split).shard(process_count, process_index)
  else:
    sub = _process_split(split, process_index, process_count)
    ds = _tfds_source(cfg, sub, seed_for(seed, "files", process_index) if shuffle else None)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  if shuffle:
    buffer = int(_get(cfg, "shuffle_buffer", 10000))
    ds = ds.shuffle(buffer, seed=seed_for(seed, process_index), reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.map(_preprocess_fn(cfg), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(prefetch)


# ----------------------------------------------------------------------------
# The exactly resumable training iterator.


def global_batch_indices(seed: int, step: int, global_batch_size: int, num_examples: int):
  """Indices `[global_batch_size]` of step `step`'s global batch.

  The data are read as a sequence of epochs, epoch `e` being the permutation
  `default_rng([seed, e])`; step `s` takes positions `s*B .. (s+1)*B - 1` of
  that sequence. Any step is computed directly, so resume needs no state.
  """
  start = step * global_batch_size
  out = []
  pos = start
  while pos < start + global_batch_size:
    epoch, offset = divmod(pos, num_examples)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    take = min(num_examples - offset, start + global_batch_size - pos)
    out.append(perm[offset : offset + take])
    pos += take
  return np.concatenate(out)


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} processes")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _in_memory_iterator(
  arrays: Batch, seed: int, start_step: int, global_batch_size: int, local: slice
) -> Iterator[Batch]:
  n = len(arrays["image"])
  for step in itertools.count(start_step):
    idx = global_batch_indices(seed, step, global_batch_size, n)[local]
    yield {k: v[idx] for k, v in arrays.items()}


def _streaming_iterator(
  cfg: Any, split: str, seed: int, start_step: int, local_batch: int, pi: int, pc: int
) -> Iterator[Batch]:
  """Per-process streamed epochs, epoch `e` shuffled with seed (seed, e, process).

  TFDS file order (for multi-file data sets) is shuffled per epoch with its
  own derived seed, then examples go through the shuffle buffer.
  """
  sub = _process_split(split, pi, pc)
  source = lambda e: _raw_source(cfg, sub, seed_for(seed, "files", e, pi))
  n = int(source(0).cardinality().numpy())
  if n < 0:
    n = int(source(0).reduce(0, lambda c, _: c + 1).numpy())
  buffer = int(_get(cfg, "shuffle_buffer", 10000))
  prep = _preprocess_fn(cfg)
  epoch, offset = divmod(start_step * local_batch, n)

  def examples() -> Iterator[Batch]:
    e, skip = epoch, offset
    while True:
      ds = source(e).shuffle(buffer, seed=seed_for(seed, e, pi), reshuffle_each_iteration=False)
      ds = ds.skip(skip).batch(1024).map(prep).prefetch(2)
      yield from ds.as_numpy_iterator()
      e, skip = e + 1, 0

  pending: list[Batch] = []
  have = 0
  for chunk in examples():
    pending.append(chunk)
    have += len(chunk["image"])
    while have >= local_batch:
      cat = {k: np.concatenate([p[k] for p in pending]) for k in ("image", "label")}
      yield {k: v[:local_batch] for k, v in cat.items()}
      rest = {k: v[local_batch:] for k, v in cat.items()}
      have -= local_batch
      pending = [rest] if have else []


def make_train_iterator(
  cfg: Any,
  seed: int,
  start_step: int,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Yields this process' part `[global_batch_size / process_count, ...]` of steps start_step, ...

  In-memory sources (digits, image folders; `data.in_memory`) sample global
  batches by index (`global_batch_indices`) and give each process its
  contiguous slice, so the global batch does not depend on the process count.
  Streamed sources shuffle each process' shard per epoch with a seed derived
  from (seed, epoch, process) and skip to the resume position within the epoch
  (exact for a fixed process count).
  """
  split = _get(cfg, "split", "train")
  local = _local_slice(global_batch_size, process_index, process_count)
  if _in_memory(cfg):
    arrays = load_arrays(cfg, split)
    return _in_memory_iterator(arrays, seed, start_step, global_batch_size, local)
  local_batch = local.stop - local.start
  return _streaming_iterator(cfg, split, seed, start_step, local_batch, process_index, process_count)


# ----------------------------------------------------------------------------
# Host -> devices.


def to_global_array(
  batch: Batch, mesh: jax.sharding.Mesh, sharding: jax.sharding.NamedSharding | None = None
) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global `jax.Array`s.

  `sharding` defaults to the leading (batch) axis split over all mesh axes.
  """
  if sharding is None:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_mesh(
  iterator: Iterator[Batch],
  mesh: jax.sharding.Mesh,
  sharding: jax.sharding.NamedSharding | None = None,
  size: int = 2,
) -> Iterator[dict[str, jax.Array]]:
  """Keeps `size` batches already transferred to the devices ahead of the consumer."""
  queue: list[dict[str, jax.Array]] = []
  for batch in iterator:
    queue.append(to_global_array(batch, mesh, sharding))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue

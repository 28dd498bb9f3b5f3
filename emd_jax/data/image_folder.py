"""Users' own images: a folder of PNG/JPEG files as a data set.

Layout:
  folder/*.png                       -> unlabelled (label -1, one-hot all zeros)
  folder/<class_name>/*.png|jpg|...  -> label = index of class_name in sorted order

Every image is centre-cropped to a square and resized (antialiased) to the
requested resolution, giving uint8 `[R, R, C]`; the input pipeline then scales
to `[-1, 1]` exactly as for TFDS sources. Two readers with the same output:
`folder_dataset` (tf.data, streams; used by `emd_jax.data.pipeline`) and
`load_folder` (PIL, numpy arrays; handy in notebooks).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from emd_jax.formats import paths as fs

EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(folder: str) -> tuple[list[str], list[int], list[str]]:
  """Returns `(paths, labels, class_names)`, sorted, deterministic.

  Class subfolders give labels 0..K-1 (sorted names); images directly in
  `folder` get label -1 when there are no class subfolders.
  """
  folder = fs.expanduser(folder)
  if not fs.isdir(folder):
    raise FileNotFoundError(f"image folder {folder!r} does not exist")
  is_image = lambda name: name.lower().endswith(EXTENSIONS)
  classes = sorted(
    d
    for d in fs.listdir(folder)
    if fs.isdir(os.path.join(folder, d)) and any(is_image(f) for f in fs.listdir(os.path.join(folder, d)))
  )
  paths, labels = [], []
  if classes:
    for k, name in enumerate(classes):
      files = sorted(f for f in fs.listdir(os.path.join(folder, name)) if is_image(f))
      paths += [os.path.join(folder, name, f) for f in files]
      labels += [k] * len(files)
  else:
    files = sorted(f for f in fs.listdir(folder) if is_image(f))
    paths = [os.path.join(folder, f) for f in files]
    labels = [-1] * len(files)
  if not paths:
    raise ValueError(f"no {EXTENSIONS} images in {folder!r}")
  return paths, labels, classes


def _decode(path: tf.Tensor, resolution: int, channels: int) -> tf.Tensor:
  image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(h, w)
  image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
  image = tf.image.resize(tf.cast(image, tf.float32), (resolution, resolution), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)  # [R, R, C]


def folder_dataset(folder: str, resolution: int, channels: int = 3) -> tf.data.Dataset:
  """tf.data of `{'image': uint8 [R, R, C], 'label': int64}` in sorted file order."""
  paths, labels, _ = list_images(folder)
  ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int64)))
  return ds.map(
    lambda p, y: {"image": _decode(p, resolution, channels), "label": y},
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )


def load_folder(folder: str, resolution: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """PIL reader: `(images uint8 [N, R, R, C], labels int64 [N])`."""
  from PIL import Image

  paths, labels, _ = list_images(folder)
  out = []
  for path in paths:
    with fs.open(path, "rb") as fh, Image.open(fh) as im:
      im = im.convert("L" if channels == 1 else "RGB")
      w, h = im.size
      side = min(w, h)
      left, top = (w - side) // 2, (h - side) // 2
      im = im.crop((left, top, left + side, top + side))
      im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
      arr = np.asarray(im, np.uint8)
    out.append(arr.reshape(resolution, resolution, channels))
  return np.stack(out), np.asarray(labels, np.int64)

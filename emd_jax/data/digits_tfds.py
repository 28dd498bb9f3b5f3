"""A local, offline TFDS builder for scikit-learn's bundled 8x8 digits.

scikit-learn ships `load_digits` (1,797 grey 8x8 images, values 0..16, labels
0..9) inside its wheel, so this builder prepares without any network access:

  builder = EmdDigits(data_dir="~/.cache/emd_jax/tfds")
  builder.download_and_prepare()
  ds = builder.as_dataset(split="train")

or, once prepared, `tfds.load("emd_digits", data_dir=...)` (importing this
module registers the name). Images are stored at their native 8x8x1 as uint8
(`round(v * 255 / 16)`); resizing or padding to a model's resolution is the
input pipeline's job (`emd_jax.data.pipeline`).

The train/test split is deterministic: a fixed permutation (numpy seed 0) of
all 1,797 images, the first 1,500 for `train` and the remaining 297 for `test`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

NAME = "emd_digits"
NUM_TRAIN = 1500
NUM_EXAMPLES = 1797
SPLIT_SEED = 0


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images [N, 8, 8, 1] uint8, labels [N] int64)` for `train`/`test`/`all`.

  This is the exact content the TFDS builder writes, computed straight from
  scikit-learn; the evaluators use it to build reference statistics without
  going through TFDS.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = np.round(digits.images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
  images = images[..., None]  # [1797, 8, 8, 1]
  labels = digits.target.astype(np.int64)
  perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  if split == "train":
    idx = perm[:NUM_TRAIN]
  elif split == "test":
    idx = perm[NUM_TRAIN:]
  elif split == "all":
    idx = np.arange(len(labels))
  else:
    raise ValueError(f"unknown digits split {split!r}; expected train, test or all")
  return images[idx], labels[idx]


class EmdDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits (8x8 grey, 10 classes) as a TFDS data set, built offline."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: 1,500 train / 297 test, uint8 8x8x1."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description="scikit-learn load_digits: 8x8 grey handwritten digits, values scaled to 0..255.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # everything is local
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    images, labels = digits_arrays(split)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": image, "label": int(label)}


def prepare_digits(data_dir: str) -> EmdDigits:
  """Prepares the digits data set into `data_dir` (a no-op if already there)."""
  builder = EmdDigits(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder

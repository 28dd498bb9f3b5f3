"""Input pipelines: the offline digits builder, image folders, resumable iterators, TFDS mock."""

import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from emd_jax.data import digits_tfds, image_folder, pipeline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  digits_tfds.prepare_digits(path)
  return path


def _cfg(data_dir, **overrides):
  cfg = ml_collections.ConfigDict(
    dict(
      name="digits",
      resolution=16,
      split="train",
      data_dir=data_dir,
      image_folder=None,
      shuffle_buffer=10000,
      num_classes=10,
      preprocess="auto",
      in_memory=None,
    )
  )
  cfg.update(overrides)
  return cfg


def test_builder_prepares_offline_and_matches_sklearn(data_dir):
  builder = digits_tfds.EmdDigits(data_dir=data_dir)
  assert builder.info.splits["train"].num_examples == 1500
  assert builder.info.splits["test"].num_examples == 297
  ds = tfds.load("emd_digits", split="test", data_dir=data_dir)
  examples = list(ds.as_numpy_iterator())
  images = np.stack([e["image"] for e in examples])
  labels = np.array([e["label"] for e in examples])
  assert images.shape == (297, 8, 8, 1) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0
  assert set(labels) == set(range(10))
  ref_images, ref_labels = digits_tfds.digits_arrays("test")
  # TFDS shuffles on write (by key hash): compare (image, label) pairs as multisets.
  pairs = lambda xs, ys: sorted(x.tobytes() + bytes([y]) for x, y in zip(xs, ys, strict=True))
  assert pairs(images, labels) == pairs(ref_images, ref_labels)
  # train and test are disjoint and together are all 1,797 images.
  train, _ = digits_tfds.digits_arrays("train")
  all_images, _ = digits_tfds.digits_arrays("all")
  key = lambda a: sorted(x.tobytes() for x in a)
  assert key(np.concatenate([train, images])) == key(all_images)


def test_make_dataset_shapes_ranges_labels(data_dir):
  ds = pipeline.make_dataset(_cfg(data_dir), "train", batch_size=32, seed=0)
  batch = next(ds.as_numpy_iterator())
  assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  # Padding: a 4-pixel black border (-1) around the 8x8 digit.
  assert (batch["image"][:, :4] == -1).all() and (batch["image"][:, :, -4:] == -1).all()
  np.testing.assert_array_equal(batch["label"].sum(-1), np.ones(32))
  resized = pipeline.make_dataset(_cfg(data_dir, resolution=12, preprocess="resize", channels=3), batch_size=4)
  batch = next(resized.as_numpy_iterator())
  assert batch["image"].shape == (4, 12, 12, 3)
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_make_dataset_is_deterministic_and_shards_cover(data_dir):
  cfg = _cfg(data_dir)
  a = next(pipeline.make_dataset(cfg, batch_size=16, seed=3).as_numpy_iterator())
  b = next(pipeline.make_dataset(cfg, batch_size=16, seed=3).as_numpy_iterator())
  np.testing.assert_array_equal(a["image"], b["image"])
  shards = []
  for p in range(3):
    ds = pipeline.make_dataset(
      cfg,
      batch_size=64,
      process_index=p,
      process_count=3,
      shuffle=False,
      repeat=False,
      drop_remainder=False,
    )
    shards.append(np.concatenate([x["image"] for x in ds.as_numpy_iterator()]))
  assert [len(s) for s in shards] == [500, 500, 500]
  # As multisets, the shards together are the split: disjoint and covering.
  whole = pipeline.load_arrays(cfg, "train")["image"]
  assert sorted(x.tobytes() for s in shards for x in s) == sorted(x.tobytes() for x in whole)


def test_global_batch_indices_are_epochs_of_permutations():
  idx = np.concatenate([pipeline.global_batch_indices(7, s, 100, 1500) for s in range(15)])
  np.testing.assert_array_equal(np.sort(idx), np.arange(1500))
  # A batch straddling the epoch boundary: the tail of epoch 0, the head of epoch 1.
  straddle = pipeline.global_batch_indices(7, 1, 1000, 1500)
  assert len(straddle) == 1000 and len(set(straddle[:500])) == 500


@pytest.mark.parametrize("in_memory", [True, False])
def test_train_iterator_exact_resume(data_dir, in_memory):
  cfg = _cfg(data_dir, in_memory=in_memory)
  steps = 28  # 1500 / 64 = 23.4 steps per epoch: crosses an epoch boundary
  full = pipeline.make_train_iterator(cfg, seed=1, start_step=0, global_batch_size=64)
  ref = [next(full) for _ in range(steps)]
  resumed = pipeline.make_train_iterator(cfg, seed=1, start_step=21, global_batch_size=64)
  for step in range(21, steps):
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], ref[step]["image"])
    np.testing.assert_array_equal(got["label"], ref[step]["label"])
  other = next(pipeline.make_train_iterator(cfg, seed=2, start_step=0, global_batch_size=64))
  assert not np.array_equal(other["image"], ref[0]["image"])


def test_train_iterator_process_slices_partition_the_global_batch(data_dir):
  cfg = _cfg(data_dir)
  whole = next(pipeline.make_train_iterator(cfg, 0, 5, 64))
  parts = [next(pipeline.make_train_iterator(cfg, 0, 5, 64, p, 4)) for p in range(4)]
  assert all(p["image"].shape == (16, 16, 16, 1) for p in parts)
  np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
  # Streamed: each process reads its own disjoint shard of the split.
  cfg.in_memory = False
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, 0, 0, 100, p, 2)
    seen.append({x.tobytes() for _ in range(15) for x in next(it)["image"]})  # one epoch of 750
  whole_keys = {x.tobytes() for x in pipeline.load_arrays(cfg)["image"]}
  assert seen[0] | seen[1] == whole_keys


def test_to_global_array_and_prefetch(data_dir):
  mesh = jax.make_mesh((8,), ("data",))
  it = pipeline.make_train_iterator(_cfg(data_dir), 0, 0, 16)
  host = [next(it) for _ in range(3)]
  it = pipeline.make_train_iterator(_cfg(data_dir), 0, 0, 16)
  out = list(pipeline.prefetch_to_mesh((next(it) for _ in range(3)), mesh))
  assert len(out) == 3
  for h, g in zip(host, out, strict=True):
    assert g["image"].shape == (16, 16, 16, 1)
    assert len(g["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g["image"]), h["image"])


def _write_folder(root, sizes, classes=("cat", "dog")):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i, (h, w) in enumerate(sizes):
      arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
      ext = "png" if i % 2 == 0 else "jpg"
      Image.fromarray(arr).save(os.path.join(root, c, f"{i}.{ext}"))


def test_image_folder(tmp_path):
  root = str(tmp_path / "imgs")
  _write_folder(root, [(12, 12), (20, 24), (30, 18)])
  paths, labels, classes = image_folder.list_images(root)
  assert classes == ["cat", "dog"] and labels == [0, 0, 0, 1, 1, 1] and len(paths) == 6
  images, labels_pil = image_folder.load_folder(root, 12)
  assert images.shape == (6, 12, 12, 3) and images.dtype == np.uint8
  tf_images = np.stack([e["image"] for e in image_folder.folder_dataset(root, 12).as_numpy_iterator()])
  assert tf_images.shape == (6, 12, 12, 3)
  np.testing.assert_array_equal(tf_images[0], images[0])  # same size: no resampling, exact PNG
  cfg = _cfg(None, image_folder=root, resolution=12, num_classes=2)
  batch = next(pipeline.make_train_iterator(cfg, 0, 0, 4))
  assert batch["image"].shape == (4, 12, 12, 3) and batch["label"].shape == (4, 2)
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  np.testing.assert_array_equal(batch["label"].sum(-1), np.ones(4))
  ds = pipeline.make_dataset(cfg, batch_size=3, shuffle=False, repeat=False)
  assert sum(len(b["image"]) for b in ds.as_numpy_iterator()) == 6


def test_image_folder_unlabelled(tmp_path):
  root = tmp_path / "flat"
  root.mkdir()
  for i in range(3):
    Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / f"{i}.png")
  _, labels, classes = image_folder.list_images(str(root))
  assert classes == [] and labels == [-1, -1, -1]
  cfg = _cfg(None, image_folder=str(root), resolution=8, channels=1)
  arrays = pipeline.load_arrays(cfg)
  assert arrays["image"].shape == (3, 8, 8, 1)
  np.testing.assert_array_equal(arrays["label"], np.zeros((3, 10)))
  np.testing.assert_allclose(arrays["image"][1], 40 / 127.5 - 1.0, atol=1e-6)


def test_tfds_cifar10_path_on_mock_data(tmp_path):
  cfg = _cfg(str(tmp_path), name="cifar10", resolution=32, shuffle_buffer=64)
  with tfds.testing.mock_data(num_examples=40):
    batch = next(pipeline.make_dataset(cfg, batch_size=8).as_numpy_iterator())
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8, 10)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    small = _cfg(str(tmp_path), name="cifar10", resolution=16, shuffle_buffer=64)
    it = pipeline.make_train_iterator(small, seed=0, start_step=0, global_batch_size=16)
    ref = [next(it) for _ in range(6)]  # 40 examples: crosses two epochs
    assert ref[0]["image"].shape == (16, 16, 16, 3)
    resumed = pipeline.make_train_iterator(small, seed=0, start_step=4, global_batch_size=16)
    for step in (4, 5):
      np.testing.assert_array_equal(next(resumed)["image"], ref[step]["image"])

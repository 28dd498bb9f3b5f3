"""Image evaluators: Frechet distance, precision/recall, coverage, classifier, Inception, grids."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from emd_jax.data import digits_tfds, pipeline
from emd_jax.evaluators import digits_classifier, diversity, frechet, grids, inception, precision_recall


def _random_spd(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _sqrtm(m):
  w, v = np.linalg.eigh(m)
  return (v * np.sqrt(w)) @ v.T


# ----------------------------------------------------------------------------
# Frechet distance.


def test_frechet_zero_for_identical_sets():
  x = np.random.default_rng(0).standard_normal((500, 16))
  assert frechet.frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_commuting_and_general():
  rng = np.random.default_rng(1)
  d = 6
  mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
  # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
  got = frechet.frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-10)
  # General SPD pair: tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2), computed independently.
  sa, sb = _random_spd(rng, d), _random_spd(rng, d)
  cross = np.trace(_sqrtm(_sqrtm(sb) @ sa @ _sqrtm(sb)))  # the symmetric form from the b side
  expected = ((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross
  assert frechet.frechet_distance(mu_a, sa, mu_b, sb) == pytest.approx(expected, rel=1e-9)
  # Symmetric in its arguments.
  assert frechet.frechet_distance(mu_b, sb, mu_a, sa) == pytest.approx(expected, rel=1e-9)


def test_fid_from_features_is_the_frechet_distance():
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal((200, 32)), rng.standard_normal((300, 32)) + 0.5
  assert inception.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
  assert inception.fid_from_features(a, b) == frechet.frechet_distance_features(a, b)


def test_frechet_from_samples_approaches_gaussian_value():
  rng = np.random.default_rng(2)
  n, d = 40000, 3
  sa, sb = np.diag([1.0, 2.0, 0.5]), np.diag([0.5, 1.0, 1.0])
  x = rng.multivariate_normal(np.zeros(d), sa, n)
  y = rng.multivariate_normal(np.ones(d), sb, n)
  exact = frechet.frechet_distance(np.zeros(d), sa, np.ones(d), sb)
  assert frechet.frechet_distance_features(x, y) == pytest.approx(exact, rel=0.03)
  mu, sigma = frechet.feature_stats(x)
  np.testing.assert_allclose(sigma, sa, atol=0.05)


# ----------------------------------------------------------------------------
# Precision / recall and coverage.


def test_precision_recall_sanity():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((400, 8))
  same = precision_recall.precision_recall(real, real)
  assert same == {"precision": 1.0, "recall": 1.0}
  far = precision_recall.precision_recall(real, real + 100.0)
  assert far == {"precision": 0.0, "recall": 0.0}
  # Fresh samples of the same law: both high.
  fresh = precision_recall.precision_recall(real, rng.standard_normal((400, 8)))
  assert fresh["precision"] > 0.8 and fresh["recall"] > 0.8
  # Mode collapse onto the core of the data: precision stays high, recall drops.
  collapsed = precision_recall.precision_recall(real, 0.2 * rng.standard_normal((400, 8)))
  assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.3


def test_class_coverage():
  eye = np.eye(10) * 10.0
  balanced = frechet.class_coverage(np.tile(eye, (5, 1)))
  assert balanced["coverage"] == 1.0 and balanced["class_tv"] == pytest.approx(0.0)
  one = frechet.class_coverage(np.tile(eye[3], (50, 1)))
  assert one["coverage"] == pytest.approx(0.1) and one["class_tv"] == pytest.approx(0.9)
  np.testing.assert_allclose(one["class_hist"], eye[3] / 10.0)
  assert one["mean_confidence"] > 0.99


# ----------------------------------------------------------------------------
# The shipped digits classifier and evaluate_images.


def test_shipped_classifier_accuracy_and_size():
  model, params, meta = digits_classifier.load_classifier()
  size = sum(
    os.path.getsize(os.path.join(digits_classifier.ASSET_DIR, f)) for f in os.listdir(digits_classifier.ASSET_DIR)
  )
  assert size < 1_000_000
  assert meta["resolution"] == 16 and meta["test_accuracy"] >= 0.97
  x, y = digits_classifier.digits_images("test")
  acc = digits_classifier.accuracy(model, params, x, y)
  assert acc >= meta["test_accuracy"] - 0.005
  _, feats = digits_classifier.predict(model, params, x[:8])
  assert feats.shape == (8, digits_classifier.FEATURE_DIM)


def test_classifier_input_layouts_agree():
  images, _ = digits_tfds.digits_arrays("test")
  x16 = pipeline.preprocess_images(images[:16], 16, "pad").numpy()
  x32 = pipeline.preprocess_images(images[:16], 32, "pad").numpy()
  np.testing.assert_array_equal(
    digits_classifier.to_classifier_input(x32, "pad"), digits_classifier.to_classifier_input(x16)
  )
  r32 = pipeline.preprocess_images(images[:16], 32, "resize", channels=3).numpy()
  assert digits_classifier.to_classifier_input(r32, "resize").shape == (16, 16, 16, 1)


def test_evaluate_images_real_vs_noise():
  images, labels = digits_tfds.digits_arrays("test")
  real = pipeline.preprocess_images(images, 16, "pad").numpy()
  good = frechet.evaluate_images(real, labels)
  # The real test digits are the FD floor by definition, and are well classified.
  assert good["fd"] == pytest.approx(good["fd_real_split"])
  assert good["precision"] > 0.85 and good["recall"] > 0.5  # 297 vs 1500 points, k = 3
  assert good["coverage"] == 1.0 and good["label_accuracy"] > 0.97
  noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
  bad = frechet.evaluate_images(noise)
  assert bad["fd"] > 20 * good["fd"] and bad["precision"] < 0.05
  evaluator = frechet.make_image_evaluator("digits")
  assert evaluator(real)["fd"] == pytest.approx(good["fd"])
  with pytest.raises(ValueError, match="unknown image evaluator"):
    frechet.make_image_evaluator("nope")
  ones = real[labels == 1]
  collapsed = frechet.evaluate_images(ones)
  assert collapsed["coverage"] <= 0.2 and collapsed["recall"] < 0.4 and collapsed["class_tv"] > 0.7


# ----------------------------------------------------------------------------
# Inception-v3 (FID variant).


def test_inception_shapes_by_eval_shape():
  abstract = inception.abstract_params()
  names = inception.torch_names(abstract)
  assert len(names) == 470  # 94 conv + batch-norm layers x 5 tensors
  assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in names
  assert names["Conv2d_1a_3x3.conv.weight"] == ("Conv2d_1a_3x3", "kernel")
  assert abstract["Conv2d_1a_3x3"]["kernel"].shape == (3, 3, 3, 32)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  assert 21_700_000 < n < 21_900_000
  model = inception.InceptionV3FID()  # resizes 32x32 -> 299x299
  out = jax.eval_shape(
    lambda p, x: model.apply({"params": p}, x),
    abstract,
    jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
  )
  assert out.shape == (2, inception.FEATURE_DIM)
  with pytest.raises(ValueError, match="at least 75"):
    jax.eval_shape(
      lambda p, x: inception.InceptionV3FID(resize_to=None).apply({"params": p}, x),
      abstract,
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )


@pytest.fixture(scope="module")
def random_inception_params():
  return inception.init_params(0)


def test_inception_forward_deterministic(random_inception_params):
  params = random_inception_params
  x = np.random.default_rng(0).uniform(-1, 1, (3, 75, 75, 3)).astype(np.float32)
  f1 = inception.inception_features(params, x, batch_size=2, resize_to=None)
  f2 = inception.inception_features(params, x, batch_size=2, resize_to=None)
  assert f1.shape == (3, 2048) and np.isfinite(f1).all() and f1.std() > 0
  np.testing.assert_array_equal(f1, f2)
  # The padded last batch does not change its real rows.
  f_first = inception.inception_features(params, x[2:], batch_size=2, resize_to=None)
  np.testing.assert_allclose(f_first[0], f1[2], rtol=1e-5, atol=1e-6)
  assert (f1 >= 0).all()  # averages of ReLU outputs


def test_inception_npz_round_trip(tmp_path, random_inception_params):
  params = random_inception_params
  path = str(tmp_path / "w.npz")
  np.savez(path, **inception.params_to_torch_dict(params))
  loaded = inception.load_params(path)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  bad = dict(np.load(path))
  del bad["Mixed_6b.branch1x1.bn.weight"]
  np.savez(str(tmp_path / "bad.npz"), **bad)
  with pytest.raises(KeyError, match="lacks 1"):
    inception.load_params(str(tmp_path / "bad.npz"))


def test_inception_torch_conversion_matches_torch_layer(tmp_path, random_inception_params):
  torch = pytest.importorskip("torch")
  params = random_inception_params
  rng = np.random.default_rng(1)
  state = {k: torch.from_numpy(v.copy()) for k, v in inception.params_to_torch_dict(params).items()}
  name = "Mixed_6b.branch7x7_2"  # a (1, 7) kernel with (0, 3) padding: layout-sensitive
  for suffix in ("bn.weight", "bn.bias", "bn.running_mean"):
    state[f"{name}.{suffix}"] = torch.from_numpy(rng.standard_normal(128).astype(np.float32))
  state[f"{name}.bn.running_var"] = torch.from_numpy(rng.uniform(0.5, 2, 128).astype(np.float32))
  state["fc.weight"] = torch.zeros(1008, 2048)  # extra keys are ignored
  state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
  torch.save(state, str(tmp_path / "w.pth"))
  inception.convert_torch_checkpoint(str(tmp_path / "w.pth"), str(tmp_path / "w.npz"))
  loaded = inception.load_params(str(tmp_path / "w.npz"))
  x = rng.standard_normal((2, 9, 11, 128)).astype(np.float32)
  ours = inception.BasicConv(128, (1, 7), padding=(0, 3)).apply(
    {"params": loaded["Mixed_6b"]["branch7x7_2"]}, jnp.asarray(x)
  )
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  y = torch.nn.functional.conv2d(t, state[f"{name}.conv.weight"], padding=(0, 3))
  y = torch.nn.functional.batch_norm(
    y,
    state[f"{name}.bn.running_mean"],
    state[f"{name}.bn.running_var"],
    state[f"{name}.bn.weight"],
    state[f"{name}.bn.bias"],
    eps=1e-3,
  )
  ref = torch.relu(y).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Grids.


def test_grids(tmp_path):
  images = np.linspace(-1, 1, 5 * 4 * 6 * 3).reshape(5, 4, 6, 3).astype(np.float32)
  u8 = grids.to_uint8(images)
  assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
  grid = grids.image_grid(images, ncols=3)
  assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[1:5, 1:7], u8[0])
  np.testing.assert_array_equal(grid[6:10, 8:14], u8[4])
  assert (grid[6:10, 15:21] == 0).all()  # empty cell
  assert grids.image_grid(np.zeros((4, 8, 8, 1), np.uint8)).shape == (19, 19, 1)
  path = str(tmp_path / "out" / "grid.png")
  grids.save_png(path, grid, scale=2)
  with Image.open(path) as im:
    back = np.asarray(im)
  assert back.shape == (2 * grid.shape[0], 2 * grid.shape[1], 3)
  np.testing.assert_array_equal(back[::2, ::2], grid)


# ----------------------------------------------------------------------------
# Pixel-space diversity figures and KID.


def test_kid_is_unbiased_and_matches_a_direct_sum():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((300, 5)), rng.standard_normal((200, 5))
  # Independent computation: explicit double loops over pairs, diagonal excluded.
  k = lambda x, y: (x @ y / 5 + 1.0) ** 3  # noqa: E731
  kaa = np.mean([k(a[i], a[j]) for i in range(300) for j in range(300) if i != j])
  kbb = np.mean([k(b[i], b[j]) for i in range(200) for j in range(200) if i != j])
  kab = np.mean([k(x, y) for x in a for y in b])
  assert diversity.kid(a, b) == pytest.approx(kaa + kbb - 2 * kab, rel=1e-9)
  # Same distribution: the estimate averages to zero (unbiased); a shifted one is clearly positive.
  same = [diversity.kid(rng.standard_normal((100, 5)), rng.standard_normal((100, 5))) for _ in range(200)]
  assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(200)
  assert diversity.kid(a, b + 0.5) > 10 * np.std(same)


def test_pixel_metrics_see_lost_variance_that_the_mean_keeps():
  x, _ = digits_classifier.digits_images("train")
  pca = diversity.PixelPCA(diversity.digit_pixels(x))
  real = diversity.pixel_metrics(x, pca)
  assert real["fd_pixel"] < 1e-9 and real["pixel_std_ratio_real"] == pytest.approx(1.0)
  assert real["mean_image_dist"] < 1e-9
  # Shrink every image halfway towards the mean image: same mean, half the per-pixel std.
  mean = x.mean(axis=0, keepdims=True)
  shrunk = diversity.pixel_metrics(mean + 0.5 * (x - mean), pca)
  assert shrunk["pixel_std_ratio_real"] == pytest.approx(0.5, rel=1e-6)
  assert shrunk["mean_image_dist"] < 1e-5  # float32 images
  assert shrunk["fd_pixel"] > 0.1 and shrunk["kid_pixel"] > 0.01
  # FD in the PCA space equals the closed form for a scaled copy: (1 - s)^2 tr(S_k).
  s_k = np.cov(pca.real_features, rowvar=False)
  assert shrunk["fd_pixel"] == pytest.approx(0.25 * np.trace(s_k), rel=1e-6)

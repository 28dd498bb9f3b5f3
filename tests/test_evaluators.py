"""Evaluators: Frechet distance, precision/recall, coverage, classifier, Inception, grids, the registry."""

import ast
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from emd_jax.config.validation import ConfigError
from emd_jax.data import digits_tfds, pipeline
from emd_jax.errors import UnsafePickleError, UserInputError
from emd_jax.evaluators import (
  digits,
  digits_classifier,
  diversity,
  frechet,
  gmm,
  grids,
  inception,
  precision_recall,
  registry,
  restoration,
)
from emd_jax.evaluators import images as image_eval
from emd_jax.formats import array_pickle
from emd_jax.teachers import gmm as gmm_teacher


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
  balanced = digits.class_coverage(np.tile(eye, (5, 1)))
  assert balanced["coverage"] == 1.0 and balanced["class_tv"] == pytest.approx(0.0)
  one = digits.class_coverage(np.tile(eye[3], (50, 1)))
  assert one["coverage"] == pytest.approx(0.1) and one["class_tv"] == pytest.approx(0.9)
  np.testing.assert_allclose(one["class_hist"], eye[3] / 10.0)
  assert one["mean_confidence"] > 0.99


# ----------------------------------------------------------------------------
# The shipped digits classifier and the digits evaluator.


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
  good = digits.evaluate_images(real, labels)
  # The real test digits are the FD floor by definition, and are well classified.
  assert good["fd"] == pytest.approx(good["fd_real_split"])
  assert good["precision"] > 0.85 and good["recall"] > 0.5  # 297 vs 1500 points, k = 3
  assert good["coverage"] == 1.0 and good["label_accuracy"] > 0.97
  noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
  bad = digits.evaluate_images(noise)
  assert bad["fd"] > 20 * good["fd"] and bad["precision"] < 0.05
  evaluator = registry.build({"evaluator": "digits"})
  assert isinstance(evaluator, digits.DigitsEvaluator)
  assert evaluator(real)["fd"] == pytest.approx(good["fd"])
  assert image_eval.score_images(real, evaluator=evaluator)["fd"] == pytest.approx(good["fd"])
  ones = real[labels == 1]
  collapsed = digits.evaluate_images(ones)
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
  with pytest.raises(UserInputError, match=r"lacks 1 Inception weights.*Mixed_6b\.branch1x1\.bn\.weight"):
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


# ----------------------------------------------------------------------------
# frechet.py is the maths alone.


def test_frechet_imports_nothing_from_the_other_evaluators():
  path = frechet.__file__
  # Every import statement in the file, lazy ones inside functions included.
  imported = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      imported |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module)
  assert imported <= {"__future__", "numpy"}, imported
  # And at run time: with every other evaluator module (and jax) made unimportable, it imports and computes.
  code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    other = name.startswith("emd_jax.evaluators.") and name != "emd_jax.evaluators.frechet"
    if other or name.split(".")[0] in ("jax", "flax"):
      raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import numpy as np
from emd_jax.evaluators import frechet
x = np.random.default_rng(0).standard_normal((50, 3))
print(frechet.frechet_distance_features(x, x + 1.0))
"""
  root = os.path.dirname(os.path.dirname(os.path.dirname(path)))
  env = {**os.environ, "PYTHONPATH": root}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert float(out.stdout) == pytest.approx(3.0)  # a unit shift in 3 coordinates, same covariance


# ----------------------------------------------------------------------------
# Inception weight files: the npz and jax-fid's pickle, read into the same tree.


def _perturbed_inception_params(seed: int = 0) -> dict:
  """Random kernels and non-trivial batch norms, so a leaf mapped to the wrong place changes the features."""
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.8, 1.25, leaf.shape).astype(np.float32))
    if name in ("bias", "mean"):
      return jnp.asarray(0.1 * rng.standard_normal(leaf.shape).astype(np.float32))
    return leaf

  return jax.tree_util.tree_map_with_path(perturb, inception.init_params(seed))


# Written here independently of inception.py: the torch names and layout of pytorch-fid ...
_TORCH_LEAF = {
  "kernel": "conv.weight",
  "scale": "bn.weight",
  "bias": "bn.bias",
  "mean": "bn.running_mean",
  "var": "bn.running_var",
}


def _write_torch_npz(path, params) -> None:
  arrays = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [k.key for k in keys]
    value = np.asarray(leaf)
    if names[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> torch [out, in, kh, kw]
    arrays[".".join(names[:-1]) + "." + _TORCH_LEAF[names[-1]]] = value
  np.savez(path, **arrays)


# ... and jax-fid's pickle: {layer...: {'conv': {'kernel'}, 'bn': {'scale', 'bias', 'mean', 'var'}}} + 'fc'.
def _jax_fid_tree(params) -> dict:
  tree: dict = {"fc": {"kernel": np.zeros((2048, 1008), np.float32), "bias": np.zeros(1008, np.float32)}}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [k.key for k in keys]
    node = tree
    for k in names[:-1]:
      node = node.setdefault(k, {})
    group = "conv" if names[-1] == "kernel" else "bn"
    node.setdefault(group, {})[names[-1]] = np.asarray(leaf)
  return tree


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
  """(params, npz path, jax-fid pickle path, reference stats path, reference images) for the same weights."""
  d = tmp_path_factory.mktemp("inception")
  params = _perturbed_inception_params(0)
  npz, pkl = str(d / "inception_fid.npz"), str(d / "inception_v3_weights_fid.pickle")
  _write_torch_npz(npz, params)
  with open(pkl, "wb") as f:
    pickle.dump(_jax_fid_tree(params), f)
  ref_images = np.random.default_rng(1).uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)
  feats = inception.inception_features(params, ref_images, batch_size=2, resize_to=75)
  stats = str(d / "ref_stats.npz")
  np.savez(stats, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
  return params, npz, pkl, stats, feats


def test_inception_weights_from_npz_and_jax_fid_pickle_give_the_same_features(inception_files):
  params, npz, pkl, _, _ = inception_files
  x = np.random.default_rng(0).uniform(-1, 1, (3, 75, 75, 3)).astype(np.float32)
  want = inception.inception_features(params, x, batch_size=2, resize_to=None)
  for path in (npz, pkl):
    loaded = inception.load_weights(path)  # the format told by content
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(inception.inception_features(loaded, x, batch_size=2, resize_to=None), want)


def test_jax_fid_pickle_errors_name_the_leaf(tmp_path, inception_files):
  params = inception_files[0]
  tree = _jax_fid_tree(params)
  # A transposed (1, 7) kernel: the shape check names the leaf and both shapes.
  k = tree["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  tree["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"] = k.transpose(1, 0, 2, 3)
  with open(tmp_path / "t.pickle", "wb") as f:
    pickle.dump(tree, f)
  with pytest.raises(UserInputError, match=r"\['Mixed_6b'\]\['branch7x7_2'\]\['kernel'\]: file \(7, 1, 128, 128\)"):
    inception.load_weights(str(tmp_path / "t.pickle"))
  tree["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"] = k
  # A missing batch-norm leaf, by its path in the pickle.
  del tree["Mixed_7c"]["branch_pool"]["bn"]["var"]
  with open(tmp_path / "m.pickle", "wb") as f:
    pickle.dump(tree, f)
  with pytest.raises(UserInputError, match="lacks 1 Inception weights.*Mixed_7c/branch_pool/bn/var"):
    inception.load_weights(str(tmp_path / "m.pickle"))
  tree["Mixed_7c"]["branch_pool"]["bn"]["var"] = np.ones(192, np.float32)
  # An entry that is not part of the network, and a nonzero conv bias (which would change the features).
  tree["Mixed_5b"]["branch1x1"]["extra"] = np.zeros(3, np.float32)
  with open(tmp_path / "e.pickle", "wb") as f:
    pickle.dump(tree, f)
  with pytest.raises(UserInputError, match="not Inception FID weights.*Mixed_5b/branch1x1/extra"):
    inception.load_weights(str(tmp_path / "e.pickle"))
  del tree["Mixed_5b"]["branch1x1"]["extra"]
  tree["Conv2d_1a_3x3"]["conv"]["bias"] = np.ones(32, np.float32)
  with open(tmp_path / "b.pickle", "wb") as f:
    pickle.dump(tree, f)
  with pytest.raises(UserInputError, match="Conv2d_1a_3x3/conv/bias"):
    inception.load_weights(str(tmp_path / "b.pickle"))
  (tmp_path / "junk.bin").write_bytes(b"not weights")
  with pytest.raises(UserInputError, match="neither an npz"):
    inception.load_weights(str(tmp_path / "junk.bin"))


class _Hostile:
  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_hostile_weights_pickle_is_refused_naming_the_global(tmp_path):
  marker = tmp_path / "ran"
  evil = {"Conv2d_1a_3x3": {"conv": {"kernel": _Hostile(f"touch {marker}")}}}
  path = tmp_path / "inception_v3_weights_fid.pickle"
  path.write_bytes(pickle.dumps(evil))
  assert b"posix" in path.read_bytes()  # os.system pickles as posix.system
  with pytest.raises(UnsafePickleError, match=r"posix\.system"):
    inception.load_weights(str(path))
  assert not marker.exists()
  # Object arrays would smuggle arbitrary objects: refused by dtype.
  path.write_bytes(pickle.dumps({"a": np.array([1, "x"], dtype=object)}))
  with pytest.raises(UnsafePickleError, match="only numeric"):
    array_pickle.load_file(str(path))
  path.write_bytes(pickle.dumps({"a": eval}))
  with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
    array_pickle.load_file(str(path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_array_pickle_reads_numpy_arrays_of_every_protocol(tmp_path, protocol):
  rng = np.random.default_rng(protocol)
  tree = {
    "c": rng.standard_normal((3, 4)).astype(np.float32),
    "f": np.asfortranarray(rng.standard_normal((2, 5))),
    "big": np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian
    "empty": np.zeros((0, 3), np.float16),
    "scalar": np.float32(2.5),
    "nested": OrderedDict(x=[np.arange(3), (np.ones(2, np.int8),)]),
  }
  path = tmp_path / "t.pickle"
  path.write_bytes(pickle.dumps(tree, protocol=protocol))
  got = array_pickle.load_file(str(path))
  for key in ("c", "f", "big", "empty"):
    assert got[key].dtype == tree[key].dtype and got[key].shape == tree[key].shape
    np.testing.assert_array_equal(got[key], tree[key])
  assert got["f"].flags.f_contiguous and got["scalar"] == np.float32(2.5)
  np.testing.assert_array_equal(got["nested"]["x"][0], np.arange(3))
  np.testing.assert_array_equal(got["nested"]["x"][1][0], np.ones(2, np.int8))
  path.write_bytes(pickle.dumps(tree, protocol=protocol)[:-40])  # truncated
  with pytest.raises(UserInputError, match="not a readable pickle"):
    array_pickle.load_file(str(path))


def test_reference_stats_are_validated(tmp_path):
  p = str(tmp_path / "s.npz")
  np.savez(p, mu=np.zeros(4), sigma=np.eye(4))
  mu, sigma = inception.load_reference_stats(p, dim=4)
  assert mu.dtype == np.float64 and sigma.shape == (4, 4)
  with pytest.raises(UserInputError, match=r"'mu' has shape \(4,\), expected \(2048,\)"):
    inception.load_reference_stats(p)
  np.savez(p, mu=np.zeros(4), sigma=np.eye(3))
  with pytest.raises(UserInputError, match=r"'sigma' has shape \(3, 3\), expected \(4, 4\)"):
    inception.load_reference_stats(p, dim=4)
  np.savez(p, mu=np.array([0, np.nan, 0, 0]), sigma=np.eye(4))
  with pytest.raises(UserInputError, match="'mu' holds 1 non-finite"):
    inception.load_reference_stats(p, dim=4)
  np.savez(p, m=np.zeros(4), sigma=np.eye(4))
  with pytest.raises(UserInputError, match="needs arrays 'mu' and 'sigma'"):
    inception.load_reference_stats(p, dim=4)
  with pytest.raises(UserInputError, match="does not exist"):
    inception.load_reference_stats(str(tmp_path / "nope.npz"))


# ----------------------------------------------------------------------------
# The registry.


def _fid_config(**kwargs):
  return {"evaluator": "inception_fid", "batch_size": 999, "inception_fid": kwargs}  # batch_size: a job's field


def test_build_checks_inception_files_before_any_compute(tmp_path, inception_files, monkeypatch):
  _, npz, _, stats, _ = inception_files

  def no_compute(*args, **kwargs):
    raise AssertionError("compute before the inputs were checked")

  missing = str(tmp_path / "missing.npz")
  cases = [
    (dict(weights=missing, reference_stats=stats), r"eval\.inception_fid\.weights: .*missing\.npz: does not exist"),
    (dict(weights=npz, reference_stats=missing), r"eval\.inception_fid\.reference_stats: .*missing\.npz: does not"),
    (dict(weights="", reference_stats=stats), r"eval\.inception_fid\.weights: required .* file path"),
    (dict(reference_stats=stats), r"eval\.inception_fid\.weights: required"),
    (dict(weights=npz, reference_stats=str(tmp_path)), r"eval\.inception_fid\.reference_stats: .* not a regular file"),
    (dict(weights=npz, reference_stats=stats, batch=4), r"eval\.inception_fid\.batch: not an argument.*batch_size"),
  ]
  with monkeypatch.context() as m:  # build checks all of these before it reads any file or computes anything
    for fn in ("inception_features", "load_weights", "load_reference_stats"):
      m.setattr(inception, fn, no_compute)
    for kwargs, match in cases:
      with pytest.raises(ConfigError, match=match):
        registry.check_config(_fid_config(**kwargs))
      with pytest.raises(ConfigError, match=match):
        registry.build(_fid_config(**kwargs))
  # Content errors (found when the files are read, still at build, before any image) name the field too.
  monkeypatch.setattr(inception, "inception_features", no_compute)
  bad = str(tmp_path / "bad_stats.npz")
  np.savez(bad, mu=np.zeros(10), sigma=np.eye(10))
  registry.check_config(_fid_config(weights=npz, reference_stats=bad))  # only reads files at build
  with pytest.raises(ConfigError, match=r"eval\.inception_fid\.reference_stats: .*'mu' has shape \(10,\)"):
    registry.build(_fid_config(weights=npz, reference_stats=bad))
  junk = tmp_path / "junk"
  junk.write_bytes(b"junk")
  with pytest.raises(ConfigError, match=r"eval\.inception_fid\.weights: .*neither an npz"):
    registry.build(_fid_config(weights=str(junk), reference_stats=stats))


def test_inception_fid_end_to_end_from_either_weight_file(inception_files):
  params, npz, pkl, stats, ref_feats = inception_files
  x = np.random.default_rng(2).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
  # Independent FID: both covariances have rank < 6, so tr((S_a S_b)^1/2) is the nuclear norm of the
  # small cross matrix A B^T / sqrt((n-1)(m-1)) of the centred features (no 2048x2048 square root).
  feats = inception.inception_features(params, x, batch_size=2, resize_to=75)
  a, b = feats - feats.mean(0), ref_feats - ref_feats.mean(0)
  a, b = a.astype(np.float64), b.astype(np.float64)
  cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
  tr_a, tr_b = (a**2).sum() / (len(a) - 1), (b**2).sum() / (len(b) - 1)
  want = ((feats.mean(0) - ref_feats.mean(0)) ** 2).sum() + tr_a + tr_b - 2 * cross
  assert want > 0
  for weights in (npz, pkl):
    ev = registry.build(_fid_config(weights=weights, reference_stats=stats, batch_size=2, resize_to=75))
    assert isinstance(ev, inception.InceptionEvaluator)
    np.testing.assert_array_equal(ev.features(x), feats)
  out = ev(x)
  assert set(out) == {"fid"} and out["fid"] == pytest.approx(want, rel=1e-4)
  assert image_eval.score_images(x, evaluator=ev) == {"fid": out["fid"]}


def _tiny_restoration_images():
  rng = np.random.default_rng(0)
  clean = rng.uniform(-1, 1, (3, 12, 12, 1)).astype(np.float32)
  restored = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), -1, 1).astype(np.float32)
  observed = np.clip(clean + 0.4 * rng.standard_normal(clean.shape), -1, 1).astype(np.float32)
  return restored, clean, observed


def test_registry_builds_each_registered_evaluator(inception_files):
  _, npz, _, stats, _ = inception_files
  assert registry.names() == ["digits", "gmm", "inception_fid", "restoration"]
  teacher = gmm_teacher.gmm_teacher(dim=2, num_modes=4)
  configs = {
    "digits": ({"evaluator": "digits", "digits": {"layout": "pad"}}, digits.DigitsEvaluator),
    "gmm": ({"evaluator": "gmm", "gmm": {"seed": 3}}, gmm.GMMEvaluator),
    "inception_fid": (_fid_config(weights=npz, reference_stats=stats), inception.InceptionEvaluator),
    "restoration": ({"evaluator": "restoration"}, restoration.RestorationEvaluator),
  }
  assert sorted(configs) == registry.names()
  for name, (cfg, cls) in configs.items():
    registry.check_config(cfg)
    ev = registry.build(cfg, teacher=teacher)  # every job passes the same context; each takes what it declares
    assert type(ev) is cls and ev.name == name and ev.kind == registry.kind(name)
  # gmm: the same figures as gmm_metrics on the teacher's parameters.
  samples = np.asarray(gmm_teacher.sample(teacher.params, jax.random.key(0), 500)[0])
  ev = registry.build(configs["gmm"][0], teacher=teacher)
  assert ev(samples) == gmm.gmm_metrics(samples, jax.device_get(teacher.params), seed=3)
  with pytest.raises(TypeError, match="needs \\['teacher'\\]"):
    registry.build(configs["gmm"][0])
  image_teacher = gmm_teacher.gmm_teacher()
  image_teacher.spec["kind"] = "network"
  with pytest.raises(ConfigError, match="eval.gmm: .*Gaussian-mixture teacher"):
    registry.build(configs["gmm"][0], teacher=image_teacher)
  # restoration: mean PSNR computed here from the mean squared errors; SSIM as restoration.ssim.
  restored, clean, observed = _tiny_restoration_images()
  out = registry.build(configs["restoration"][0])(restored, clean, observed)
  mse = ((restored - clean) ** 2).reshape(3, -1).mean(-1)
  mse_obs = ((observed - clean) ** 2).reshape(3, -1).mean(-1)
  assert out["psnr"] == pytest.approx(np.mean(10 * np.log10(4.0 / mse)), rel=1e-5)
  assert out["psnr_observed"] == pytest.approx(np.mean(10 * np.log10(4.0 / mse_obs)), rel=1e-5)
  assert out["psnr"] > out["psnr_observed"]
  assert out["ssim"] == float(jnp.mean(restoration.ssim(restored, clean)))
  assert "psnr_observed" not in registry.build(configs["restoration"][0])(restored, clean)
  # No evaluator, unknown names, bad arguments.
  assert registry.build({"evaluator": ""}) is None and registry.build({}) is None
  with pytest.raises(ConfigError, match="eval.evaluator: unknown evaluator 'nope'; registered: digits, gmm, incep"):
    registry.check_config({"evaluator": "nope"})
  with pytest.raises(ConfigError, match="eval.digits: layout must be 'pad' or 'resize'"):
    registry.build({"evaluator": "digits", "digits": {"layout": "crop"}})
  with pytest.raises(ConfigError, match="eval.restoration.range: not an argument .*data_range"):
    registry.check_config({"evaluator": "restoration", "restoration": {"range": 1.0}})


def test_register_a_new_evaluator(monkeypatch):
  registry.names()  # the built-ins registered before the table is swapped for a copy
  monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

  @registry.register("mean_value", context=("teacher",))
  def mean_value(teacher, offset: float = 0.0):
    return lambda samples, labels=None: {"mean": float(np.mean(samples)) + offset + teacher}

  ev = registry.build({"evaluator": "mean_value", "mean_value": {"offset": 1.0}}, teacher=10.0, other="ignored")
  assert ev(np.ones(4)) == {"mean": 12.0}
  assert "mean_value" in registry.names()
  with pytest.raises(ValueError, match="already registered"):
    registry.register("mean_value")(lambda: None)
  with pytest.raises(ValueError, match="not parameters"):
    registry.register("other", files=("path",))(lambda weights: None)


def test_score_images_takes_a_built_evaluator():
  def fake(x, labels=None):
    return {"fd": np.float32(1.5), "class_hist": np.array([0.25, 0.75]), "num_samples": len(x), "extra": 2}

  x = np.zeros((3, 8, 8, 1), np.float32)
  out = image_eval.score_images(x, evaluator=fake)
  assert out == {"fd": 1.5, "extra": 2.0, "class_detail/0": 0.25, "class_detail/1": 0.75}
  scalars, grid = image_eval.evaluate_and_grid(None, 0, x, evaluator=None, grid_size=3)
  assert scalars == {} and grid["samples"].dtype == np.uint8
  assert image_eval.evaluate_and_grid(None, 0, x, evaluator=fake, grid_size=3)[0] == out
  with pytest.raises(TypeError, match="by name"):
    image_eval.score_images(x, evaluator=fake, layout="pad")

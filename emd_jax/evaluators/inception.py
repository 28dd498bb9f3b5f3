r"""Inception-v3, FID variant, in Flax: 2048-d pool3 features and FID.

This is the network of the TF FID graph (`pt_inception-2015-12-05`), in the
form pytorch-fid uses: torchvision's Inception-v3 layout with its
FIDInceptionA/C/E_1 blocks (average pools that ignore padding) and E_2 (a max
pool in the last block). Inputs are resized to 299x299 (bilinear, half-pixel,
no antialias, as `F.interpolate(align_corners=False)`) and must be in
`[-1, 1]`; the output is the 2048-d global average of `Mixed_7c`.

Weights are not shipped. `load_weights(path)` reads either of two files (told
apart by content, not by name), maps it onto the Flax tree and checks every
leaf against `abstract_params()` (`fileio.check_params`: the error names the
leaf and both shapes); no torch is needed to read either:

  (a) the npz of pytorch-fid's converted TF weights:
      1. download (about 92 MB)
         https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
      2. convert once (needs torch; `pip install emd_jax[convert]`):
         python -m emd_jax.evaluators.inception convert \
           pt_inception-2015-12-05-6726825d.pth inception_fid.npz
      The npz keeps the torch names (`Mixed_5b.branch1x1.conv.weight`, ...,
      `.bn.running_var`), kernels in torch layout `[out, in, kh, kw]`.
  (b) the Flax weights of the JAX FID tools, `inception_v3_weights_fid.pickle`
      (jax-fid, github.com/matthias-wright/jax-fid, also used by fidjax), as
      downloaded: a pickled dict `{layer: {'conv': {'kernel' [kh, kw, in, out]},
      'bn': {'scale', 'bias', 'mean', 'var'}}}`, blocks nested by name
      (`['Mixed_5b']['branch1x1']`), plus the classifier `fc` (unused here). It
      is read by a restricted unpickler that builds dicts and numeric numpy
      arrays and refuses every other global by name (`UnsafePickleError`).

Reference statistics: `load_reference_stats(path)` reads an npz with `mu`
`[2048]` and `sigma` `[2048, 2048]` (pytorch-fid's format; checked: keys,
shapes, finite), `save_reference_stats(path, features)` writes one from real
images' features. `InceptionEvaluator(weights, reference_stats)` (registered
as `inception_fid`, `registry`) loads and checks both when it is built.
"""

from __future__ import annotations

import functools
import sys
import zipfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.errors import UserInputError, one_line
from emd_jax.evaluators import frechet, registry
from emd_jax.formats import array_pickle, fileio, paths

Array = jax.Array
FEATURE_DIM = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
BN_EPS = 1e-3


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU; names follow torch."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c_in = x.shape[-1]
    kh, kw = self.kernel
    w = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, c_in, self.features))
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
      x,
      w.astype(x.dtype),
      window_strides=(self.stride, self.stride),
      padding=((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
    )
    y = (y - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
    return nn.relu(y)


def _avg_pool_3x3(x: Array) -> Array:
  # FID blocks: count_include_pad=False.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (`pool='avg'`, padding ignored) or FIDInceptionE_2 (`pool='max'`)."""

  pool: str = "avg"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, **row, name="branch3x3_2a")(b3),
        BasicConv(384, **col, name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
        BasicConv(384, **col, name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """images `[B, H, W, 3]` in `[-1, 1]` -> pool3 features `[B, 2048]`.

  `resize_to`: side the input is bilinearly resized to first (299 for FID;
  `None` keeps the input size, which must be at least 75).
  """

  resize_to: int | None = INPUT_SIZE

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize_to is not None and x.shape[1:3] != (self.resize_to, self.resize_to):
      x = jax.image.resize(x, (x.shape[0], self.resize_to, self.resize_to, 3), "bilinear", antialias=False)
    if min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"Inception-v3 needs inputs of at least {MIN_INPUT_SIZE}px, got {x.shape}")
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)  # [B, 73, 73, 64]
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
    x = _max_pool_3x3_s2(x)  # [B, 35, 35, 192]
    x = InceptionA(32, name="Mixed_5b")(x)  # [B, 35, 35, 256]
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)  # [B, 35, 35, 288]
    x = InceptionB(name="Mixed_6a")(x)  # [B, 17, 17, 768]
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # [B, 8, 8, 1280]
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)  # [B, 8, 8, 2048]
    return x.mean(axis=(1, 2))  # [B, 2048]


# ----------------------------------------------------------------------------
# Weights: torch names <-> Flax tree.

_TORCH_SUFFIX = {
  "kernel": "conv.weight",
  "scale": "bn.weight",
  "bias": "bn.bias",
  "mean": "bn.running_mean",
  "var": "bn.running_var",
}


def init_params(seed: int = 0) -> Any:
  """Random parameters for tests: He-normal kernels, identity batch norm.

  Drawn with numpy from the abstract tree (seconds, where a Flax init of 22M
  parameters takes tens of seconds on CPU).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      w = rng.standard_normal(leaf.shape, dtype=np.float32) * np.sqrt(2.0 / fan_in)
      return jnp.asarray(w)
    return jnp.ones(leaf.shape) if name in ("scale", "var") else jnp.zeros(leaf.shape)

  return jax.tree_util.tree_map_with_path(draw, abstract_params())


def abstract_params() -> Any:
  """The parameter tree's shapes, without computing anything."""
  model = InceptionV3FID(resize_to=None)
  shape = (1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape))["params"])


def torch_names(params: Any) -> dict[str, tuple[str, ...]]:
  """Maps each torch state-dict name to its path in the Flax tree."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(p.key for p in path)
    out[".".join(keys[:-1]) + "." + _TORCH_SUFFIX[keys[-1]]] = keys
  return out


def params_to_torch_dict(params: Any) -> dict[str, np.ndarray]:
  """Flax params -> {torch name: array in torch layout} (the npz format)."""
  flat = {}
  for name, keys in torch_names(params).items():
    leaf = functools.reduce(lambda t, k: t[k], keys, params)
    flat[name] = _to_torch(keys[-1], np.asarray(leaf, np.float32))
  return flat


def load_weights(path: str) -> Any:
  """Inception FID weights from `path` as the Flax tree, checked against `abstract_params()`.

  The format is told by content: an npz (zip) of torch-named arrays (`load_params`), or
  a pickle laid out like jax-fid's `inception_v3_weights_fid.pickle` (`load_jax_fid_pickle`).
  """
  fileio.require_file(path, "Inception weights file")
  with paths.open(path, "rb") as f:
    head = f.read(2)
  if head == b"PK":
    return load_params(path)
  if head[:1] == b"\x80":  # the PROTO opcode every pickle of protocol >= 2 starts with
    return load_jax_fid_pickle(path)
  raise UserInputError(
    f"{path}: neither an npz of Inception weights (`convert` of pytorch-fid's .pth) nor a pickle "
    "(jax-fid's inception_v3_weights_fid.pickle)"
  )


def load_params(npz_path: str) -> Any:
  """Reads an npz of torch-named weights into the Flax tree, checking names, shapes and values."""
  template = abstract_params()
  names = torch_names(template)
  with fileio.open_npz(npz_path, "Inception weights npz", "of Inception weights") as data:
    missing = sorted(set(names) - set(data.files))
    if missing:
      raise UserInputError(f"{npz_path}: lacks {len(missing)} Inception weights, e.g. {missing[:3]}")
    try:
      flat = {keys: _to_flax(keys[-1], _as_float32(data[name])) for name, keys in names.items()}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise UserInputError(f"{npz_path}: an array cannot be read ({type(e).__name__}: {one_line(e, 200)})") from e
  return _checked_tree(flat, template, npz_path)


def _as_float32(value: np.ndarray) -> np.ndarray:
  """Floating arrays as float32; anything else unchanged (`check_params` then names its dtype)."""
  value = np.asarray(value)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def _to_flax(leaf_name: str, value: np.ndarray) -> np.ndarray:
  if leaf_name == "kernel" and value.ndim == 4:  # torch [out, in, kh, kw] -> [kh, kw, in, out]
    return np.transpose(value, (2, 3, 1, 0))
  return value


def _to_torch(leaf_name: str, value: np.ndarray) -> np.ndarray:
  if leaf_name == "kernel":
    return np.transpose(value, (3, 2, 0, 1))
  return value


def _checked_tree(flat: dict[tuple[str, ...], np.ndarray], template: Any, where: str) -> dict:
  """`{path: array}` -> nested dict of jnp arrays, after `fileio.check_params` against `template`."""
  tree: dict = {}
  for keys, value in flat.items():
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  fileio.check_params(template, tree, where)
  return jax.tree.map(jnp.asarray, tree)


# jax-fid's pickle: each BasicConv is {'conv': {'kernel'}, 'bn': {'scale', 'bias', 'mean', 'var'}}
# under the same layer names as ours; the classifier heads are not part of the FID network.
_JAX_FID_UNUSED = ("fc", "AuxLogits")


def jax_fid_path(keys: tuple[str, ...]) -> tuple[str, ...]:
  """Our Flax path (`('Mixed_5b', 'branch1x1', 'scale')`) -> its path in jax-fid's pickle (`(..., 'bn', 'scale')`)."""
  *layer, leaf = keys
  return (*layer, "conv", "kernel") if leaf == "kernel" else (*layer, "bn", leaf)


def load_jax_fid_pickle(path: str) -> Any:
  """jax-fid's `inception_v3_weights_fid.pickle` -> the Flax tree, checked against `abstract_params()`.

  Read by `formats.array_pickle` (dicts and numeric numpy arrays only; any other
  global is refused by name). Kernels are already `[kh, kw, in, out]`. The
  classifier heads (`fc`, `AuxLogits`) are ignored, and so are all-zero conv
  biases (the FID network's convs have none); any other entry, a missing leaf or
  a wrong shape is an error naming it.
  """
  raw = array_pickle.load_file(path)
  if not isinstance(raw, dict):
    raise UserInputError(f"{path}: expected a dict of layers (jax-fid's layout), got {type(raw).__name__}")
  found = {}
  for keys, value in _flatten_dict(raw, path):
    if keys[0] in _JAX_FID_UNUSED or (keys[-2:] == ("conv", "bias") and not np.any(value)):
      continue
    found[keys] = value
  template = abstract_params()
  flat, missing = {}, []
  for path_keys, _ in jax.tree_util.tree_flatten_with_path(template)[0]:
    keys = tuple(p.key for p in path_keys)
    src = jax_fid_path(keys)
    if src in found:
      flat[keys] = _as_float32(found.pop(src))
    else:
      missing.append("/".join(src))
  if missing:
    raise UserInputError(f"{path}: lacks {len(missing)} Inception weights, e.g. {missing[:3]}")
  if found:
    extra = sorted("/".join(k) for k in found)
    raise UserInputError(f"{path}: {len(extra)} entries that are not Inception FID weights, e.g. {extra[:3]}")
  return _checked_tree(flat, template, path)


def _flatten_dict(tree: dict, where: str, prefix: tuple[str, ...] = ()):
  """Yields `(keys, array)` of a nested dict of arrays; anything else is an error naming its path."""
  for k, v in tree.items():
    keys = (*prefix, str(k))
    if isinstance(v, dict):
      yield from _flatten_dict(v, where, keys)
    elif isinstance(v, np.ndarray):
      yield keys, v
    else:
      raise UserInputError(f"{where}: {'/'.join(keys)} is a {type(v).__name__}, not an array or a dict")


def convert_torch_checkpoint(pth_path: str, npz_path: str) -> int:
  """pytorch-fid's `.pth` -> npz of float32 arrays under torch names. Needs torch."""
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("converting needs torch: pip install 'emd_jax[convert]'") from e
  from emd_jax.errors import UserInputError
  from emd_jax.formats import fileio

  fileio.require_file(pth_path, "Inception checkpoint")
  try:  # torch's own restricted loader (weights_only): it refuses code-running globals
    state = torch.load(pth_path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (torch raises several types on a bad or hostile file)
    raise UserInputError(f"{pth_path}: not a loadable torch checkpoint ({type(e).__name__}: {e})") from e
  if not isinstance(state, dict):
    raise UserInputError(f"{pth_path}: expected a state dict, got {type(state).__name__}")
  wanted = set(torch_names(abstract_params()))
  arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items() if k in wanted}
  missing = sorted(wanted - set(arrays))
  if missing:
    raise UserInputError(f"{pth_path}: lacks {len(missing)} weights, e.g. {missing[:3]}")
  fileio.write_npz(npz_path, **arrays)
  return len(arrays)


# ----------------------------------------------------------------------------
# Features and FID.


@functools.partial(jax.jit, static_argnames=("resize_to",))
def _features(params: Any, images: Array, resize_to: int | None) -> Array:
  return InceptionV3FID(resize_to=resize_to).apply({"params": params}, images)


def inception_features(
  params: Any, images: np.ndarray, batch_size: int = 64, resize_to: int | None = INPUT_SIZE
) -> np.ndarray:
  """pool3 features `[N, 2048]` of images `[N, H, W, C]` in `[-1, 1]`, in batches.

  The last batch is padded to `batch_size` so one compiled shape serves all.
  """
  out = []
  for i in range(0, len(images), batch_size):
    chunk = np.asarray(images[i : i + batch_size], np.float32)
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(_features(params, jnp.asarray(chunk), resize_to))[:n])
  return np.concatenate(out)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FID between two sets of pool3 features `[N, 2048]`, `[M, 2048]`."""
  return frechet.frechet_distance_features(features_a, features_b)


def load_reference_stats(path: str, dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
  """(mu `[dim]`, sigma `[dim, dim]`) float64 from an npz with keys `mu`, `sigma` (pytorch-fid's format).

  Checked: a readable npz, both keys, numeric dtypes, those shapes, finite values.
  """
  with fileio.open_npz(path, "reference statistics file", "with 'mu' and 'sigma'") as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise UserInputError(f"{path}: needs arrays 'mu' and 'sigma' (pytorch-fid's format); has {sorted(data.files)}")
    try:
      stats = {"mu": data["mu"], "sigma": data["sigma"]}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise UserInputError(f"{path}: an array cannot be read ({type(e).__name__}: {one_line(e, 200)})") from e
  for key, shape in (("mu", (dim,)), ("sigma", (dim, dim))):
    x = stats[key]
    if x.dtype.kind not in "biuf":
      raise UserInputError(f"{path}: {key!r} must be a real array, got {x.dtype}")
    if x.shape != shape:
      raise UserInputError(f"{path}: {key!r} has shape {x.shape}, expected {shape}")
    bad = int(x.size - np.isfinite(x).sum())
    if bad:
      raise UserInputError(f"{path}: {key!r} holds {bad} non-finite values")
  return np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)


def save_reference_stats(path: str, features: np.ndarray) -> None:
  """Writes `mu`, `sigma` of features `[N, 2048]` to an npz (the format `load_reference_stats` reads)."""
  mu, sigma = frechet.feature_stats(features)
  fileio.write_npz(path, mu=mu, sigma=sigma)


@registry.register("inception_fid", files=("weights", "reference_stats"))
class InceptionEvaluator:
  """FID against reference statistics: `evaluator(images [N, H, W, C] in [-1, 1], labels=None) -> {'fid'}`.

  `weights`: an npz (converted from pytorch-fid) or jax-fid's pickle (`load_weights`);
  `reference_stats`: an npz of `mu`, `sigma`. Both are read and checked here, before
  any image is scored. `resize_to`: the side images are resized to (299 for FID;
  smaller, down to 75, only for tests); `batch_size`: images per forward pass.
  """

  name = "inception_fid"
  kind = "samples"

  def __init__(self, weights: str, reference_stats: str, batch_size: int = 64, resize_to: int | None = INPUT_SIZE):
    if not (isinstance(batch_size, int) and batch_size > 0):
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if resize_to is not None and resize_to < MIN_INPUT_SIZE:
      raise ValueError(f"resize_to must be at least {MIN_INPUT_SIZE} (or None), got {resize_to}")
    self.mu, self.sigma = load_reference_stats(reference_stats)
    self.params = load_weights(weights)
    self.batch_size, self.resize_to = batch_size, resize_to

  def features(self, images: np.ndarray) -> np.ndarray:
    """pool3 features `[N, 2048]` of images `[N, H, W, C]` in `[-1, 1]`."""
    return inception_features(self.params, images, self.batch_size, self.resize_to)

  def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    del labels
    mu, sigma = frechet.feature_stats(self.features(images))
    return {"fid": frechet.frechet_distance(mu, sigma, self.mu, self.sigma)}


def main(argv: Sequence[str]) -> None:
  """`argv` without the program name: `convert IN.pth OUT.npz`."""
  from emd_jax.errors import UserError

  if len(argv) != 3 or argv[0] != "convert":
    raise UserError("usage: python -m emd_jax.evaluators.inception convert IN.pth OUT.npz")
  try:
    n = convert_torch_checkpoint(argv[1], argv[2])
  except ImportError as e:
    raise UserError(str(e)) from e
  print(f"wrote {n} arrays to {argv[2]}")


if __name__ == "__main__":
  from emd_jax import cli

  sys.exit(cli.run_argv(main))

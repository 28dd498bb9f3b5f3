"""EDM networks in Flax: structure, parameter counts, preconditioning, conversions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emd_jax import convert
from emd_jax.nets import build, edm_unet, precond

# Tiny versions of each EDM architecture (16x16, two or three levels, attention at 8x8).
TINY = {
  "ddpmpp_vp": dict(
    arch="song_unet",
    precond="vp",
    img_resolution=16,
    in_channels=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    label_dim=4,
    augment_dim=9,
    dropout=0.1,
  ),
  "ncsnpp_ve": dict(
    arch="song_unet",
    precond="ve",
    img_resolution=16,
    in_channels=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="residual",
    resample_filter=[1, 3, 3, 1],
  ),
  "song_skip_edm": dict(
    arch="song_unet",
    precond="edm",
    img_resolution=16,
    in_channels=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="skip",
    decoder_type="skip",
    resample_filter=[1, 3, 3, 1],
  ),
  "adm_edm": dict(
    arch="dhariwal_unet",
    precond="edm",
    img_resolution=16,
    in_channels=3,
    model_channels=32,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    label_dim=4,
  ),
}


def _random_params(spec, seed=0):
  """Random float32 params of the spec's shapes, without compiling init."""
  rng = np.random.default_rng(seed)
  shapes = convert.abstract_params(spec)
  return jax.tree.map(
    lambda s: (rng.standard_normal(s.shape) / np.sqrt(max(1, np.prod(s.shape[:-1])))).astype(np.float32),
    shapes,
  )


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "spec, expected",
  [
    # EDM CIFAR-10 DDPM++ (VP/EDM, augment_dim 9), counted with torch on EDM's networks.py.
    (
      dict(
        arch="song_unet",
        precond="vp",
        img_resolution=32,
        in_channels=3,
        model_channels=128,
        channel_mult=[2, 2, 2],
        augment_dim=9,
        dropout=0.13,
      ),
      55_733_891,
    ),
    # NCSN++: EDM's 56_397_827 parameters + the 128 Fourier frequencies (an EDM buffer).
    (
      dict(
        arch="song_unet",
        precond="ve",
        img_resolution=32,
        in_channels=3,
        model_channels=128,
        channel_mult=[2, 2, 2],
        augment_dim=9,
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        resample_filter=[1, 3, 3, 1],
      ),
      56_397_827 + 128,
    ),
    # ImageNet-64 ADM, class-conditional.
    (
      dict(
        arch="dhariwal_unet",
        precond="edm",
        img_resolution=64,
        in_channels=3,
        label_dim=1000,
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        augment_dim=0,
      ),
      295_899_267,
    ),
  ],
  ids=["cifar10_ddpmpp", "cifar10_ncsnpp", "imagenet64_adm"],
)
def test_paper_sizes_match_edm_parameter_counts(spec, expected):
  assert _count(convert.abstract_params(spec)) == expected


@pytest.mark.parametrize("name", sorted(TINY))
def test_round_trip_through_edm_names(name):
  spec = edm_unet.complete_spec(TINY[name])
  params = _random_params(spec)
  sd = convert.flax_to_edm(params)
  # EDM naming and layouts.
  assert all(k.startswith("model.") for k in sd)
  assert sd["model.map_layer0.weight"].shape[::-1] == params["model"]["map_layer0"]["weight"].shape
  conv = "model.enc.16x16_conv.weight"
  assert sd[conv].shape == (
    spec["model_channels"] * (spec["channel_mult"][0] if spec["arch"] == "dhariwal_unet" else 1),
    3,
    3,
    3,
  )
  if spec.get("embedding_type") == "fourier":
    assert sd["model.map_noise.freqs"].shape == (spec["model_channels"],)
  qkv = [k for k in sd if k.endswith("qkv.weight")]
  assert qkv, "tiny config must exercise attention"
  for k in qkv:
    c = sd[k].shape[1]
    assert sd[k].shape == (3 * c, c, 1, 1)
  back = convert.edm_to_flax(sd, spec)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_converter_names_missing_unknown_and_mismatched_parameters():
  spec = edm_unet.complete_spec(TINY["ddpmpp_vp"])
  sd = convert.flax_to_edm(_random_params(spec))
  bad = dict(sd)
  del bad["model.map_label.weight"]
  bad["model.enc.16x16_block9.conv0.weight"] = np.zeros((1,))
  bad["model.map_layer1.bias"] = np.zeros((7,))
  with pytest.raises(ValueError) as e:
    convert.edm_to_flax(bad, spec)
  msg = str(e.value)
  assert "model.map_label.weight" in msg and "missing" in msg
  assert "model.enc.16x16_block9.conv0.weight" in msg and "unknown" in msg
  assert "model.map_layer1.bias" in msg and "shape" in msg
  # Wrong resampling filter buffer is refused, a matching one is accepted and dropped.
  ok = dict(sd, **{"model.enc.8x8_down.conv0.resample_filter": np.full((1, 1, 2, 2), 0.25)})
  convert.edm_to_flax(ok, spec)
  with pytest.raises(ValueError, match="resample_filter"):
    convert.edm_to_flax(dict(sd, **{"model.enc.8x8_down.conv0.resample_filter": np.ones(4)}), spec)


class _Probe(nn.Module):
  """A stand-in network returning `value` (1 or its noise label) everywhere."""

  mode: str = "one"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, train=False, augment_labels=None):
    if self.mode == "one":
      return jnp.ones_like(x)
    if self.mode == "noise":
      return jnp.broadcast_to(noise_labels[:, None, None, None], x.shape)
    return x  # "input": echoes c_in * x


@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
def test_preconditioning_coefficients_match_edm(kind):
  spec = edm_unet.complete_spec(dict(arch="song_unet", precond=kind, img_resolution=4, in_channels=1))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 4, 1)), jnp.float32)
  sigma = jnp.array([0.01, 1.0, 40.0])
  s = np.asarray(sigma)[:, None, None, None]
  xn = np.asarray(x)
  out = {m: np.asarray(precond.make(spec, _Probe(m)).apply({}, x, sigma)) for m in ("one", "noise", "input")}
  if kind == "edm":
    c_skip, c_out = 0.25 / (s**2 + 0.25), s * 0.5 / np.sqrt(s**2 + 0.25)
    c_in, c_noise = 1 / np.sqrt(s**2 + 0.25), np.log(s) / 4
  elif kind == "vp":
    c_skip, c_out, c_in = 1.0, -s, 1 / np.sqrt(s**2 + 1)
    t = (np.sqrt(0.1**2 + 2 * 19.9 * np.log1p(s**2)) - 0.1) / 19.9
    c_noise = 999 * t
  else:
    c_skip, c_out, c_in, c_noise = 1.0, s, 1.0, np.log(0.5 * s)
  np.testing.assert_allclose(out["one"], c_skip * xn + c_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["noise"], c_skip * xn + c_out * c_noise, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["input"], (c_skip + c_out * c_in) * xn, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ddpmpp_vp", "adm_edm"])
def test_forward_dropout_label_dropout_and_zero_output_layer(name):
  # The Song U-Net runs at one level here (less to compile); ADM keeps its down/up path.
  levels = {"channel_mult": [1], "attn_resolutions": [16]} if name == "ddpmpp_vp" else {}
  spec = edm_unet.complete_spec(dict(TINY[name], dropout=0.3, label_dropout=1.0, **levels))
  module = build(spec)
  params = _random_params(spec, seed=1)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  sigma = jnp.array([0.3, 3.0])
  labels = jnp.eye(4)[jnp.array([1, 2])]
  zeros = jnp.zeros_like(labels)
  f = jax.jit(
    lambda p, lab, key, train: module.apply({"params": p}, x, sigma, lab, train=train, rngs={"dropout": key}),
    static_argnums=3,
  )
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y = f(params, labels, k1, False)
  assert y.shape == x.shape and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))
  # Labels matter at evaluation.
  assert float(jnp.max(jnp.abs(y - f(params, zeros, k1, False)))) > 1e-4
  # Label dropout 1 in training: same as zero labels under the same dropout mask.
  yt = f(params, labels, k1, True)
  np.testing.assert_allclose(yt, f(params, zeros, k1, True), rtol=1e-5, atol=1e-5)
  # Dropout is active in training and follows the rng.
  assert float(jnp.max(jnp.abs(yt - f(params, labels, k2, True)))) > 1e-4
  assert float(jnp.max(jnp.abs(yt - y))) > 1e-4
  # With the output layer zeroed, the denoiser is the skip path c_skip * x.
  flat = convert.flax_to_edm(params)
  last = "model.dec.16x16_aux_conv" if spec["arch"] == "song_unet" else "model.out_conv"
  flat[last + ".weight"] = np.zeros_like(flat[last + ".weight"])
  flat[last + ".bias"] = np.zeros_like(flat[last + ".bias"])
  zeroed = convert.edm_to_flax(flat, spec)
  c_skip = 1.0 if spec["precond"] == "vp" else 0.25 / (np.asarray(sigma) ** 2 + 0.25)
  np.testing.assert_allclose(
    f(zeroed, labels, k1, False),
    np.asarray(c_skip).reshape(-1, 1, 1, 1) * np.asarray(x),
    rtol=1e-6,
    atol=1e-6,
  )


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32():
  spec = edm_unet.complete_spec(TINY["ncsnpp_ve"])
  params = _random_params(spec, seed=3)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16, 3)), jnp.float32)
  sigma = jnp.array([0.5, 5.0])
  module = build(spec)
  y = jax.jit(lambda p: module.apply({"params": p}, x, sigma))(params)
  bf = build(dict(spec, dtype="bfloat16"))
  yb = jax.jit(lambda p: bf.apply({"params": p}, x, sigma))(params)
  assert yb.dtype == jnp.float32
  np.testing.assert_allclose(yb, y, atol=0.05 * float(jnp.max(jnp.abs(y))))


def test_spec_errors_are_clear():
  with pytest.raises(ValueError, match="unknown song_unet spec keys"):
    build(dict(arch="song_unet", img_resolution=16, in_channels=3, num_block=2))
  with pytest.raises(ValueError, match="precond"):
    build(dict(arch="dhariwal_unet", precond="iddpm", img_resolution=16, in_channels=3))

"""Building blocks of EDM's networks (NVlabs/edm `training/networks.py`), in Flax.

Every layer keeps EDM's parameter names (`weight`, `bias`, `freqs`) so that a
converted checkpoint is a renaming plus a transpose: linear weights are stored
`[in, out]` (EDM: `[out, in]`), convolution weights `[kh, kw, in, out]` (EDM:
`[out, in, kh, kw]`); activations are NHWC throughout. Initialisers follow EDM's
`weight_init` modes, so networks trained from scratch start where EDM's start.
Normalisation, softmax and the noise embeddings run in float32 whatever the
compute dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.runtime import fsdp

Array = jax.Array


def edm_init(mode: str, fan_in: int, fan_out: int, scale: float = 1.0):
  """An initialiser matching EDM's `weight_init(shape, mode, fan_in, fan_out) * scale`."""

  def init(key, shape, dtype=jnp.float32):
    if mode == "xavier_uniform":
      w = np.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, dtype, -1.0, 1.0)
    elif mode == "xavier_normal":
      w = np.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape, dtype)
    elif mode == "kaiming_uniform":
      w = np.sqrt(3 / fan_in) * jax.random.uniform(key, shape, dtype, -1.0, 1.0)
    elif mode == "kaiming_normal":
      w = np.sqrt(1 / fan_in) * jax.random.normal(key, shape, dtype)
    else:
      raise ValueError(f"invalid init mode {mode!r}")
    return w * scale

  return init


class Linear(nn.Module):
  """EDM's `Linear`; `weight` is `[in, out]`."""

  in_features: int
  out_features: int
  bias: bool = True
  init_mode: str = "kaiming_normal"
  init_weight: float = 1.0
  init_bias: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fans = (self.in_features, self.out_features)
    w = self.param(
      "weight",
      edm_init(self.init_mode, *fans, self.init_weight),
      (self.in_features, self.out_features),
    )
    x = fsdp.layer_op(functools.partial(_matmul, dtype=self.dtype), x, w)
    if self.bias:
      b = self.param("bias", edm_init(self.init_mode, *fans, self.init_bias), (self.out_features,))
      x = x + b.astype(self.dtype)
    return x


def _matmul(x: Array, w: Array, dtype) -> Array:
  return x @ w.astype(dtype)


def _weight_conv(x: Array, w: Array, dtype, **kw) -> Array:
  """`_conv` with a parameter `w` cast to the compute dtype (under `fsdp.layer_op`)."""
  return _conv(x, w.astype(dtype), **kw)


def _resample_kernel(resample_filter: Sequence[float], channels: int) -> np.ndarray:
  """EDM's separable resampling filter as a depthwise HWIO kernel `[k, k, 1, C]`."""
  f = np.asarray(resample_filter, np.float32)
  f2 = np.outer(f, f) / np.square(f.sum())
  return np.tile(f2[:, :, None, None], (1, 1, 1, channels))


def _conv(x: Array, w: Array, stride: int = 1, pad: int = 0, groups: int = 1) -> Array:
  return jax.lax.conv_general_dilated(
    x,
    w,
    (stride, stride),
    [(pad, pad), (pad, pad)],
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )


def _conv_transpose_up(x: Array, f: Array, pad: int) -> Array:
  """Depthwise `conv_transpose2d(stride=2, padding=pad)` with a symmetric-or-not kernel."""
  k = f.shape[0]
  f = f[::-1, ::-1]  # a transposed convolution is a convolution with the flipped kernel
  q = k - 1 - pad
  return jax.lax.conv_general_dilated(
    x,
    f,
    (1, 1),
    [(q, q), (q, q)],
    lhs_dilation=(2, 2),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


class Conv2d(nn.Module):
  """EDM's `Conv2d` with optional 2x up/downsampling; `weight` is HWIO.

  `kernel = 0` gives a pure resampling layer without parameters. EDM's
  `resample_filter` buffer is a constant computed from the constructor
  arguments, not a parameter.
  """

  in_channels: int
  out_channels: int
  kernel: int
  bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  init_mode: str = "kaiming_normal"
  init_weight: float = 1.0
  init_bias: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    assert not (self.up and self.down)
    k = self.kernel
    fans = (self.in_channels * k * k, self.out_channels * k * k)
    w = b = None
    if k:
      w = self.param(
        "weight",
        edm_init(self.init_mode, *fans, self.init_weight),
        (k, k, self.in_channels, self.out_channels),
      )  # float32; cast to the compute dtype where it is used (`_weight_conv`)
      if self.bias:
        b = self.param("bias", edm_init(self.init_mode, *fans, self.init_bias), (self.out_channels,))
        b = b.astype(self.dtype)
    x = x.astype(self.dtype)
    resample = self.up or self.down
    f_len = len(self.resample_filter) if resample else 0
    w_pad = k // 2
    f_pad = (f_len - 1) // 2 if resample else 0

    def filt(c):
      return jnp.asarray(_resample_kernel(self.resample_filter, c), self.dtype)

    def wconv(x, **kw):
      return fsdp.layer_op(functools.partial(_weight_conv, dtype=self.dtype, **kw), x, w)

    if self.fused_resample and self.up and w is not None:
      x = _conv_transpose_up(x, filt(self.in_channels) * 4, max(f_pad - w_pad, 0))
      x = wconv(x, pad=max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and w is not None:
      x = wconv(x, pad=w_pad + f_pad)
      x = _conv(x, filt(self.out_channels), stride=2, groups=self.out_channels)
    else:
      if self.up:
        x = _conv_transpose_up(x, filt(self.in_channels) * 4, f_pad)
      if self.down:
        x = _conv(x, filt(self.in_channels), stride=2, pad=f_pad, groups=self.in_channels)
      if w is not None:
        x = wconv(x, pad=w_pad)
    if b is not None:
      x = x + b
    return x


class GroupNorm(nn.Module):
  """EDM's `GroupNorm`: `min(num_groups, C // min_channels_per_group)` groups, float32 stats."""

  num_channels: int
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.num_channels
    g = min(self.num_groups, c // self.min_channels_per_group)
    w = self.param("weight", nn.initializers.ones, (c,))
    b = self.param("bias", nn.initializers.zeros, (c,))
    xf = x.astype(jnp.float32)
    xg = xf.reshape(x.shape[:-1] + (g, c // g))  # [B, H, W, G, C/G], groups contiguous as in NCHW
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + self.eps)
    y = xg.reshape(x.shape) * w + b
    return y.astype(self.dtype)


class PositionalEmbedding(nn.Module):
  """Sinusoidal noise embedding of DDPM++ and ADM: `[cos(x f), sin(x f)]`."""

  num_channels: int
  max_positions: int = 10000
  endpoint: bool = False

  def __call__(self, x: Array) -> Array:  # x: [B] -> [B, num_channels]
    half = self.num_channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if self.endpoint else 0))
    freqs = (1.0 / self.max_positions) ** freqs
    x = jnp.outer(x.astype(jnp.float32), freqs)
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """Random Fourier noise embedding of NCSN++.

  EDM keeps `freqs` as a buffer (never trained); here it is a parameter behind
  `stop_gradient`, so it travels with the checkpoint and optimisers leave it be.
  """

  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x: Array) -> Array:  # x: [B] -> [B, num_channels]
    freqs = self.param("freqs", lambda k, s: jax.random.normal(k, s) * self.scale, (self.num_channels // 2,))
    x = jnp.outer(x.astype(jnp.float32), 2 * np.pi * jax.lax.stop_gradient(freqs))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class UNetBlock(nn.Module):
  """EDM's unified residual block (DDPM++, NCSN++, ADM) with optional attention.

  `init_main` (EDM: `init`), `init_zero`, `init_attn`: dicts of `init_mode/init_weight/init_bias`
  as in EDM. The attention's qkv channels keep EDM's `(head, channel, 3)`
  interleaving so that weights load unchanged.
  """

  in_channels: int
  out_channels: int
  emb_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int | None = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[float] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init_main: dict | None = None  # EDM: `init` (renamed: `init` is a Module method)
  init_zero: dict | None = None
  init_attn: dict | None = None
  dtype: jnp.dtype = jnp.float32

  def heads(self) -> int:
    if not self.attention:
      return 0
    return self.num_heads if self.num_heads is not None else self.out_channels // self.channels_per_head

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    init = dict(self.init_main or {})
    init_zero = dict(self.init_zero if self.init_zero is not None else {"init_weight": 0})
    init_attn = dict(self.init_attn if self.init_attn is not None else init)
    cin, cout, dt = self.in_channels, self.out_channels, self.dtype
    rs = dict(resample_filter=tuple(self.resample_filter), dtype=dt)

    orig = x
    h = GroupNorm(cin, eps=self.eps, dtype=dt, name="norm0")(x)
    h = Conv2d(cin, cout, 3, up=self.up, down=self.down, name="conv0", **rs, **init)(nn.silu(h))
    params = Linear(self.emb_channels, cout * (2 if self.adaptive_scale else 1), dtype=dt, name="affine", **init)(emb)[
      :, None, None, :
    ].astype(h.dtype)
    norm1 = GroupNorm(cout, eps=self.eps, dtype=dt, name="norm1")
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      h = nn.silu(shift + norm1(h) * (scale + 1))
    else:
      h = nn.silu(norm1(h + params))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv2d(cout, cout, 3, name="conv1", dtype=dt, **init_zero)(h)
    if cout != cin or self.up or self.down:
      kernel = 1 if self.resample_proj or cout != cin else 0
      skip = Conv2d(cin, cout, kernel, up=self.up, down=self.down, name="skip", **rs, **init)
      orig = skip(orig)
    x = (h + orig.astype(h.dtype)) * self.skip_scale

    heads = self.heads()
    if heads:
      b, hh, ww, _ = x.shape
      qkv = GroupNorm(cout, eps=self.eps, dtype=dt, name="norm2")(x)
      qkv = Conv2d(cout, cout * 3, 1, name="qkv", dtype=dt, **init_attn)(qkv)
      qkv = qkv.reshape(b, hh * ww, heads, cout // heads, 3)  # EDM's channel layout
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # [B, HW, heads, c]
      scale = 1.0 / np.sqrt(cout // heads)
      logits = jnp.einsum("bqhc,bkhc->bhqk", q.astype(jnp.float32), k.astype(jnp.float32) * scale)
      w = jax.nn.softmax(logits, axis=-1).astype(dt)
      a = jnp.einsum("bhqk,bkhc->bqhc", w, v).reshape(b, hh, ww, cout)
      x = Conv2d(cout, cout, 1, name="proj", dtype=dt, **init_zero)(a) + x
      x = x * self.skip_scale
    return x

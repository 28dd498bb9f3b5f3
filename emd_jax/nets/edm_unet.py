"""EDM's U-Nets in Flax: `SongUNet` (DDPM++ / NCSN++) and `DhariwalUNet` (ADM).

Layer for layer the networks of NVlabs/edm `training/networks.py`, with the
same constructor arguments and defaults, the same submodule names (EDM's
`enc`/`dec` `ModuleDict` entries become children `enc_<key>` / `dec_<key>`) and
NHWC activations. `build(spec)` returns the preconditioned denoiser
(`emd_jax.nets.precond`); `emd_jax.convert` maps EDM checkpoints onto them.

Call convention of the raw networks: `F(x [B, H, W, C], noise_labels [B],
class_labels [B, label_dim] or None, train, augment_labels [B, augment_dim] or
None) -> [B, H, W, out_channels]`. With `train=True` they need a 'dropout' rng
(dropout and label dropout for classifier-free guidance).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emd_jax.nets.edm_layers import (
  Conv2d,
  FourierEmbedding,
  GroupNorm,
  Linear,
  PositionalEmbedding,
  UNetBlock,
)

Array = jax.Array

# EDM's constructor defaults (training/networks.py), used to complete specs.
SONG_DEFAULTS = dict(
  label_dim=0,
  augment_dim=0,
  model_channels=128,
  channel_mult=[1, 2, 2, 2],
  channel_mult_emb=4,
  num_blocks=4,
  attn_resolutions=[16],
  dropout=0.10,
  label_dropout=0.0,
  embedding_type="positional",
  channel_mult_noise=1,
  encoder_type="standard",
  decoder_type="standard",
  resample_filter=[1, 1],
)
DHARIWAL_DEFAULTS = dict(
  label_dim=0,
  augment_dim=0,
  model_channels=192,
  channel_mult=[1, 2, 3, 4],
  channel_mult_emb=4,
  num_blocks=3,
  attn_resolutions=[32, 16, 8],
  dropout=0.10,
  label_dropout=0.0,
)
# Preconditioning arguments (EDMPrecond / VPPrecond / VEPrecond) and their defaults.
PRECOND_DEFAULTS = {
  "edm": dict(sigma_data=0.5, sigma_min=0.0, sigma_max=None),  # None: unbounded (EDM's inf)
  "vp": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
  "ve": dict(sigma_min=0.02, sigma_max=100.0),
}
_ARCH_DEFAULTS = {"song_unet": SONG_DEFAULTS, "dhariwal_unet": DHARIWAL_DEFAULTS}
_SPEC_KEYS = {"arch", "precond", "img_resolution", "in_channels", "out_channels", "dtype"}


def _label_dropout(labels: Array, p: float, train: bool, module: nn.Module) -> Array:
  """Zeroes whole label vectors with probability `p` in training (EDM's CFG dropout)."""
  if not (train and p):
    return labels
  keep = jax.random.uniform(module.make_rng("dropout"), (labels.shape[0], 1)) >= p
  return labels * keep.astype(labels.dtype)


class SongUNet(nn.Module):
  """DDPM++ (`embedding_type='positional'`) and NCSN++ (`'fourier'`, residual encoder)."""

  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Sequence[float] = (1, 1)
  dtype: jnp.dtype = jnp.float32

  def _layout(self):
    """EDM's module dicts as ordered `(name, kind, kwargs)` lists for encoder and decoder."""
    assert self.embedding_type in ("fourier", "positional")
    assert self.encoder_type in ("standard", "skip", "residual")
    assert self.decoder_type in ("standard", "skip")
    mc, rf = self.model_channels, tuple(self.resample_filter)
    init = dict(init_mode="xavier_uniform")
    init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
    init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
    blk = dict(
      emb_channels=mc * self.channel_mult_emb,
      num_heads=1,
      dropout=self.dropout,
      skip_scale=np.sqrt(0.5),
      eps=1e-6,
      resample_filter=rf,
      resample_proj=True,
      adaptive_scale=False,
      init_main=init,
      init_zero=init_zero,
      init_attn=init_attn,
    )
    enc, dec = [], []
    cout = caux = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cin, cout = cout, mc
        enc.append((f"{res}x{res}_conv", "conv", dict(in_channels=cin, out_channels=cout, kernel=3, **init)))
      else:
        enc.append(
          (
            f"{res}x{res}_down",
            "block",
            dict(in_channels=cout, out_channels=cout, down=True, **blk),
          )
        )
        if self.encoder_type == "skip":
          enc.append(
            (
              f"{res}x{res}_aux_down",
              "conv",
              dict(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=rf),
            )
          )
          enc.append(
            (
              f"{res}x{res}_aux_skip",
              "conv",
              dict(in_channels=caux, out_channels=cout, kernel=1, **init),
            )
          )
        if self.encoder_type == "residual":
          enc.append(
            (
              f"{res}x{res}_aux_residual",
              "conv",
              dict(
                in_channels=caux,
                out_channels=cout,
                kernel=3,
                down=True,
                resample_filter=rf,
                fused_resample=True,
                **init,
              ),
            )
          )
          caux = cout
      for idx in range(self.num_blocks):
        cin, cout = cout, mc * mult
        attn = res in self.attn_resolutions
        enc.append(
          (
            f"{res}x{res}_block{idx}",
            "block",
            dict(in_channels=cin, out_channels=cout, attention=attn, **blk),
          )
        )
    skips = [kw["out_channels"] for name, _, kw in enc if "aux" not in name]

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        dec.append(
          (
            f"{res}x{res}_in0",
            "block",
            dict(in_channels=cout, out_channels=cout, attention=True, **blk),
          )
        )
        dec.append((f"{res}x{res}_in1", "block", dict(in_channels=cout, out_channels=cout, **blk)))
      else:
        dec.append((f"{res}x{res}_up", "block", dict(in_channels=cout, out_channels=cout, up=True, **blk)))
      for idx in range(self.num_blocks + 1):
        cin, cout = cout + skips.pop(), mc * mult
        attn = idx == self.num_blocks and res in self.attn_resolutions
        dec.append(
          (
            f"{res}x{res}_block{idx}",
            "block",
            dict(in_channels=cin, out_channels=cout, attention=attn, **blk),
          )
        )
      if self.decoder_type == "skip" or level == 0:
        if self.decoder_type == "skip" and level < len(self.channel_mult) - 1:
          dec.append(
            (
              f"{res}x{res}_aux_up",
              "conv",
              dict(
                in_channels=self.out_channels,
                out_channels=self.out_channels,
                kernel=0,
                up=True,
                resample_filter=rf,
              ),
            )
          )
        dec.append((f"{res}x{res}_aux_norm", "norm", dict(num_channels=cout, eps=1e-6)))
        dec.append(
          (
            f"{res}x{res}_aux_conv",
            "conv",
            dict(in_channels=cout, out_channels=self.out_channels, kernel=3, **init_zero),
          )
        )
    return enc, dec

  @nn.compact
  def __call__(
    self,
    x: Array,
    noise_labels: Array,
    class_labels: Array | None = None,
    train: bool = False,
    augment_labels: Array | None = None,
  ) -> Array:
    mc, dt = self.model_channels, self.dtype
    init = dict(init_mode="xavier_uniform")
    noise_channels = mc * self.channel_mult_noise
    emb_channels = mc * self.channel_mult_emb
    if self.embedding_type == "positional":
      emb = PositionalEmbedding(noise_channels, endpoint=True, name="map_noise")(noise_labels)
    else:
      emb = FourierEmbedding(noise_channels, name="map_noise")(noise_labels)
    b = emb.shape[0]
    emb = jnp.flip(emb.reshape(b, 2, -1), axis=1).reshape(b, -1)  # swap sin/cos, as EDM
    if self.label_dim:
      labels = jnp.zeros((b, self.label_dim)) if class_labels is None else class_labels
      labels = _label_dropout(labels.astype(jnp.float32), self.label_dropout, train, self)
      emb = emb + Linear(self.label_dim, noise_channels, name="map_label", **init)(labels * np.sqrt(self.label_dim))
    if self.augment_dim:
      aug = jnp.zeros((b, self.augment_dim)) if augment_labels is None else augment_labels
      emb = emb + Linear(self.augment_dim, noise_channels, bias=False, name="map_augment", **init)(aug)
    emb = nn.silu(Linear(noise_channels, emb_channels, name="map_layer0", **init)(emb))
    emb = nn.silu(Linear(emb_channels, emb_channels, name="map_layer1", **init)(emb))
    emb = emb.astype(dt)

    enc, dec = self._layout()
    skips, aux = [], x
    for name, kind, kw in enc:
      if kind == "block":
        layer = UNetBlock(**kw, dtype=dt, name=f"enc_{name}")
      else:
        layer = Conv2d(**kw, dtype=dt, name=f"enc_{name}")
      if "aux_down" in name:
        aux = layer(aux)
      elif "aux_skip" in name:
        x = skips[-1] = x + layer(aux)
      elif "aux_residual" in name:
        x = skips[-1] = aux = (x + layer(aux)) / np.sqrt(2)
      else:
        x = layer(x, emb, train) if kind == "block" else layer(x)
        skips.append(x)
    self.sow("intermediates", "features", x)  # the encoder's output (bottleneck); a no-op unless requested

    aux = tmp = None
    for name, kind, kw in dec:
      if kind == "block":
        if x.shape[-1] != kw["in_channels"]:
          x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = UNetBlock(**kw, dtype=dt, name=f"dec_{name}")(x, emb, train)
      elif kind == "norm":
        tmp = GroupNorm(**kw, dtype=dt, name=f"dec_{name}")(x)
      elif "aux_up" in name:
        aux = Conv2d(**kw, dtype=dt, name=f"dec_{name}")(aux)
      else:  # aux_conv
        tmp = Conv2d(**kw, dtype=dt, name=f"dec_{name}")(nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
    return aux


class DhariwalUNet(nn.Module):
  """ADM (Dhariwal & Nichol) as reimplemented by EDM, e.g. the ImageNet-64 teacher."""

  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    noise_labels: Array,
    class_labels: Array | None = None,
    train: bool = False,
    augment_labels: Array | None = None,
  ) -> Array:
    mc, dt = self.model_channels, self.dtype
    emb_channels = mc * self.channel_mult_emb
    init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
    init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
    blk = dict(
      emb_channels=emb_channels,
      channels_per_head=64,
      dropout=self.dropout,
      init_main=init,
      init_zero=init_zero,
      dtype=dt,
    )

    emb = PositionalEmbedding(mc, name="map_noise")(noise_labels)
    b = emb.shape[0]
    if self.augment_dim:
      aug = jnp.zeros((b, self.augment_dim)) if augment_labels is None else augment_labels
      emb = emb + Linear(self.augment_dim, mc, bias=False, name="map_augment", **init_zero)(aug)
    emb = nn.silu(Linear(mc, emb_channels, name="map_layer0", **init)(emb))
    emb = Linear(emb_channels, emb_channels, name="map_layer1", **init)(emb)
    if self.label_dim:
      labels = jnp.zeros((b, self.label_dim)) if class_labels is None else class_labels
      labels = _label_dropout(labels.astype(jnp.float32), self.label_dropout, train, self)
      emb = emb + Linear(
        self.label_dim,
        emb_channels,
        bias=False,
        init_mode="kaiming_normal",
        init_weight=np.sqrt(self.label_dim),
        name="map_label",
      )(labels)
    emb = nn.silu(emb).astype(dt)

    skips, cout = [], self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cin, cout = cout, mc * mult
        x = Conv2d(cin, cout, 3, dtype=dt, name=f"enc_{res}x{res}_conv", **init)(x)
      else:
        x = UNetBlock(cout, cout, down=True, name=f"enc_{res}x{res}_down", **blk)(x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        cin, cout = cout, mc * mult
        x = UNetBlock(
          cin,
          cout,
          attention=res in self.attn_resolutions,
          name=f"enc_{res}x{res}_block{idx}",
          **blk,
        )(x, emb, train)
        skips.append(x)
    self.sow("intermediates", "features", x)  # the encoder's output (bottleneck); a no-op unless requested

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        x = UNetBlock(cout, cout, attention=True, name=f"dec_{res}x{res}_in0", **blk)(x, emb, train)
        x = UNetBlock(cout, cout, name=f"dec_{res}x{res}_in1", **blk)(x, emb, train)
      else:
        x = UNetBlock(cout, cout, up=True, name=f"dec_{res}x{res}_up", **blk)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        skip = skips.pop()
        cin, cout = cout + skip.shape[-1], mc * mult
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        x = UNetBlock(
          cin,
          cout,
          attention=res in self.attn_resolutions,
          name=f"dec_{res}x{res}_block{idx}",
          **blk,
        )(x, emb, train)
    x = GroupNorm(cout, dtype=dt, name="out_norm")(x)
    return Conv2d(cout, self.out_channels, 3, dtype=dt, name="out_conv", **init_zero)(nn.silu(x))


def complete_spec(spec: dict) -> dict:
  """Fills EDM's defaults into a spec and checks its keys; returns a new, JSON-able dict."""
  arch = spec.get("arch")
  if arch not in _ARCH_DEFAULTS:
    raise ValueError(f"unknown EDM arch {arch!r}; expected 'song_unet' or 'dhariwal_unet'")
  precond = spec.get("precond", "edm")
  if precond not in PRECOND_DEFAULTS:
    raise ValueError(f"unknown precond {precond!r}; expected one of {sorted(PRECOND_DEFAULTS)}")
  allowed = _SPEC_KEYS | set(_ARCH_DEFAULTS[arch]) | set(PRECOND_DEFAULTS[precond]) | {"sigma_data"}
  unknown = sorted(set(spec) - allowed)
  if unknown:
    raise ValueError(f"unknown {arch} spec keys {unknown}; allowed: {sorted(allowed)}")
  for key in ("img_resolution", "in_channels"):
    if key not in spec:
      raise ValueError(f"{arch} spec needs {key!r}")
  out = dict(_ARCH_DEFAULTS[arch])
  out.update(PRECOND_DEFAULTS[precond])
  out.setdefault("sigma_data", 0.5)
  out.update(spec)
  out["precond"] = precond
  if out.get("sigma_max") == float("inf"):
    out["sigma_max"] = None  # keeps teacher.json strict JSON
  out.setdefault("out_channels", out["in_channels"])
  out.setdefault("dtype", "float32")
  for key in ("channel_mult", "attn_resolutions", "resample_filter"):
    if key in out:
      out[key] = list(out[key])
  return out


def unet_kwargs(spec: dict) -> dict:
  """The raw network's constructor arguments from a completed spec."""
  names = ("img_resolution", "in_channels", "out_channels") + tuple(_ARCH_DEFAULTS[spec["arch"]])
  kw = {k: spec[k] for k in names}
  for key in ("channel_mult", "attn_resolutions", "resample_filter"):
    if key in kw:
      kw[key] = tuple(kw[key])
  kw["dtype"] = jnp.dtype(spec.get("dtype", "float32"))
  return kw


def build(spec: dict) -> nn.Module:
  """The preconditioned EDM denoiser a spec describes (see module docstring)."""
  from emd_jax.nets import precond

  spec = complete_spec(spec)
  cls = SongUNet if spec["arch"] == "song_unet" else DhariwalUNet
  net = cls(**unet_kwargs(spec))
  return precond.make(spec, net)

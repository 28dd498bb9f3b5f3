"""EDM-preconditioned MLP denoiser for vector data (the GMM generator and fake score)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from emd_jax.diffusion import edm_precond, expand_to

FEATURES = "intermediates"  # the collection `nets.features_apply` reads


class FourierEmbedding(nn.Module):
  """Sinusoidal embedding of the scalar noise conditioning `c_noise`."""

  dim: int

  @nn.compact
  def __call__(self, c: jax.Array) -> jax.Array:  # [B] -> [B, dim]
    half = self.dim // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / max(half - 1, 1))
    args = (c * 250.0)[:, None] * freqs[None]  # c_noise = log(sigma)/4 spans ~[-2, 1]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPDenoiser(nn.Module):
  """`D(x, sigma) = c_skip x + c_out F(c_in x, c_noise[, label])`, F a residual MLP.

  x: [B, D], sigma: [B], labels: [B, C] one-hot or None.
  """

  dim: int
  hidden: int = 128
  depth: int = 3
  emb_dim: int = 64
  num_classes: int = 0
  sigma_data: float = 0.5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, sigma, labels=None, train: bool = False):
    del train
    dtype = jnp.dtype(self.dtype)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
    emb = FourierEmbedding(self.emb_dim)(c_noise)
    if self.num_classes and labels is not None:
      emb = emb + nn.Dense(self.emb_dim, use_bias=False, name="label_emb")(labels)
    emb = nn.silu(nn.Dense(self.hidden, name="emb0")(emb))
    h = nn.Dense(self.hidden, dtype=dtype, name="in")(expand_to(c_in, x) * x)
    for i in range(self.depth):
      scale_shift = nn.Dense(2 * self.hidden, name=f"film{i}")(emb)
      scale, shift = jnp.split(scale_shift, 2, axis=-1)
      u = nn.LayerNorm(dtype=dtype, name=f"norm{i}")(h) * (1 + scale) + shift
      u = nn.Dense(self.hidden, dtype=dtype, name=f"fc{i}a")(nn.silu(u))
      u = nn.Dense(self.hidden, dtype=dtype, name=f"fc{i}b")(nn.silu(u))
      h = h + u
    self.sow(FEATURES, "features", h)  # last hidden layer (the discriminator's input; a no-op unless requested)
    f = nn.Dense(self.dim, dtype=dtype, name="out")(nn.silu(h)).astype(jnp.float32)
    return expand_to(c_skip, x) * x + expand_to(c_out, x) * f


def build(spec: dict) -> MLPDenoiser:
  """Builds an `MLPDenoiser` from a spec `{"arch": "mlp", "dim": ..., ...}`."""
  kwargs = {k: v for k, v in spec.items() if k not in ("arch", "precond")}
  return MLPDenoiser(**kwargs)

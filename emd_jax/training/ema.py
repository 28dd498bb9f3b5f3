"""Exponential moving averages of parameters (the generator's and the teacher's EMA)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


def ema_update(ema, params, decay):
  """`decay * ema + (1 - decay) * params`, leaf by leaf (`decay` a float or a traced scalar)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def debiased_decay(decay: float, num_updates: Array) -> Array:
  """The decay that makes the EMA the normalised average over `num_updates` accepted updates.

  With `d_n = d (1 - d^(n-1)) / (1 - d^n)` the average after `n` updates is
  `sum_k d^(n-k) p_k / sum_k d^(n-k)` over `k = 1..n`: the initial weights carry no weight (as
  Adam corrects its moments). `n = 1` copies `p_1`.
  """
  n = jnp.asarray(num_updates, jnp.float32)
  return decay * (1.0 - decay ** (n - 1.0)) / (1.0 - decay**n)


def warmup_decay(decay: float, step: Array) -> Array:
  """`min(decay, (1 + step) / (10 + step))`: early averages forget a random initialisation quickly."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


# ----------------------------------------------------------------------------
# Named EMA tracks (`generator.ema_tracks`): extra averages of the generator, next to its `ema`.

RESERVED_TRACKS = ("ema", "raw")  # the default EMA and the non-averaged generator
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


@dataclasses.dataclass(frozen=True)
class EmaTrack:
  """One named EMA: `decay`, and whether it is bias-corrected over the accepted updates (`debiased_decay`)."""

  name: str
  decay: float
  debias: bool = False


def parse_ema_tracks(text: str) -> tuple[EmaTrack, ...]:
  """`"name:decay[d],..."` -> tracks in the given order ("" -> none); raises ValueError saying what is wrong.

  E.g. `"ema999:0.999,ema9999:0.9999,deb:0.999d"`: a trailing `d` makes that track debiased. Names are
  lower-case letters, digits and `_`, start with a letter, are unique and are not `ema` or `raw`;
  decays are in [0, 1).
  """
  tracks = []
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, sep, value = item.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
      raise ValueError(f"{item!r} is not 'name:decay' (e.g. 'ema9999:0.9999', or '0.999d' for a debiased track)")
    if not (name[0].isalpha() and set(name) <= _NAME_CHARS):
      raise ValueError(f"track name {name!r}: use lower-case letters, digits and '_', starting with a letter")
    if name in RESERVED_TRACKS:
      raise ValueError(f"track name {name!r} is reserved ({', '.join(RESERVED_TRACKS)})")
    if name in (t.name for t in tracks):
      raise ValueError(f"track name {name!r} is given twice")
    debias = value.endswith("d")
    try:
      decay = float(value.removesuffix("d"))
    except ValueError:
      raise ValueError(f"track {name!r}: decay {value!r} is not a number") from None
    if not 0.0 <= decay < 1.0:
      raise ValueError(f"track {name!r}: decay must be in [0, 1), got {decay}")
    tracks.append(EmaTrack(name, decay, debias))
  return tuple(tracks)


def track_decay(track: EmaTrack, num_updates: Array):
  """The decay of `track` at the `num_updates`-th accepted update (constant unless debiased)."""
  return debiased_decay(track.decay, num_updates) if track.debias else track.decay

"""Small line charts drawn with pillow (a core dependency), so no plotting library is needed.

`panels(series, title)` returns a uint8 RGB picture: one panel per figure, one coloured polyline per
track with a dot at each point and optional error bars, the y range printed at the panel's left
edge, the first and last x at its foot, a legend in the first panel. Write it with
`grids.save_png` (local paths and object stores alike).
"""

from __future__ import annotations

import math

import numpy as np

# Colour-blind-safe (Okabe-Ito) colours, one per track, in order.
COLOURS = (
  (0, 114, 178),
  (230, 159, 0),
  (0, 158, 115),
  (204, 121, 167),
  (86, 180, 233),
  (213, 94, 0),
  (240, 228, 66),
  (0, 0, 0),
)

PANEL_W, PANEL_H = 360, 260
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 14, 26, 30


def _fmt(v: float) -> str:
  return f"{v:.4g}"


def _range(values: list[float]) -> tuple[float, float]:
  lo, hi = min(values), max(values)
  if not (math.isfinite(lo) and math.isfinite(hi)):
    return 0.0, 1.0
  if hi == lo:
    pad = abs(lo) * 0.05 or 0.5
    return lo - pad, hi + pad
  pad = 0.05 * (hi - lo)
  return lo - pad, hi + pad


def _panel(draw, font, ox: int, oy: int, name: str, series: dict[str, list[tuple]], colours: dict) -> None:
  x0, y0 = ox + MARGIN_L, oy + MARGIN_T
  x1, y1 = ox + PANEL_W - MARGIN_R, oy + PANEL_H - MARGIN_B
  draw.rectangle([x0, y0, x1, y1], outline=(90, 90, 90))
  draw.text((ox + MARGIN_L, oy + 6), name, fill=(0, 0, 0), font=font)
  pts = [p for ps in series.values() for p in ps if math.isfinite(p[1])]
  if not pts:
    draw.text((x0 + 8, y0 + 8), "(no finite values)", fill=(120, 120, 120), font=font)
    return
  xs = [p[0] for p in pts]
  ys = [p[1] + s * p[2] for p in pts for s in (-1, 1)]
  xlo, xhi = _range(xs)
  ylo, yhi = _range(ys)

  def to_px(x: float, y: float) -> tuple[float, float]:
    return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

  for frac in (0.25, 0.5, 0.75):  # light grid
    gy = y1 - frac * (y1 - y0)
    draw.line([x0, gy, x1, gy], fill=(225, 225, 225))
  draw.text((ox + 4, y0), _fmt(yhi), fill=(60, 60, 60), font=font)
  draw.text((ox + 4, y1 - 10), _fmt(ylo), fill=(60, 60, 60), font=font)
  draw.text((x0, y1 + 4), _fmt(min(xs)), fill=(60, 60, 60), font=font)
  last = _fmt(max(xs))
  draw.text((x1 - 6 * len(last), y1 + 4), last, fill=(60, 60, 60), font=font)
  draw.text(((x0 + x1) // 2 - 12, y1 + 14), "step", fill=(60, 60, 60), font=font)
  for track, ps in series.items():
    c = colours[track]
    ps = sorted(p for p in ps if math.isfinite(p[1]))
    px = [to_px(x, y) for x, y, _ in ps]
    if len(px) > 1:
      draw.line(px, fill=c, width=2)
    for (x, y, e), (u, v) in zip(ps, px, strict=True):
      if e > 0:
        _, top = to_px(x, y + e)
        _, bot = to_px(x, y - e)
        draw.line([u, top, u, bot], fill=c, width=1)
      draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=c)


def panels(series: dict[str, dict[str, list[tuple]]], title: str = "", cols: int = 3) -> np.ndarray:
  """`{figure: {track: [(x, y, err), ...]}}` -> uint8 `[H, W, 3]`: one panel per figure, a line per track."""
  from PIL import Image, ImageDraw, ImageFont

  names = list(series) or ["(no metrics)"]
  cols = max(1, min(cols, len(names)))
  rows = -(-len(names) // cols)
  top = 24 if title else 0
  img = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H + top), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  tracks = list(dict.fromkeys(t for s in series.values() for t in s))
  colours = {t: COLOURS[i % len(COLOURS)] for i, t in enumerate(tracks)}
  if title:
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)
  for i, name in enumerate(names):
    r, c = divmod(i, cols)
    _panel(draw, font, c * PANEL_W, top + r * PANEL_H, name, series.get(name, {}), colours)
  lx, ly = MARGIN_L + 8, top + MARGIN_T + 6  # legend, in the first panel
  for t in tracks:
    draw.line([lx, ly + 6, lx + 18, ly + 6], fill=colours[t], width=3)
    draw.text((lx + 24, ly), t, fill=(0, 0, 0), font=font)
    ly += 14
  return np.asarray(img)

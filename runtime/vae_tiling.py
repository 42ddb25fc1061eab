"""Tiled VAE decoding: overlapping latent tiles decoded one at a time and blended, so large images fit in memory.

References: diffusers AutoencoderKL.tiled_decode / enable_vae_tiling (tiles every (1 - overlap) * tile latents,
edge tiles cut short, linear blend of each tile into its upper and left neighbours, in place); stable-diffusion.cpp
runtime/tiling.cpp (equal-size tiles spread evenly over the axis, smootherstep weights over the overlaps).
The `even` layout (stable-diffusion.cpp's) gives every tile the same shape: one compiled shape for static-shape
backends such as OpenVINO. `diffusers` reproduces diffusers' tiled_decode exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import UserError

Decode = Callable[[np.ndarray], np.ndarray]      # (1, C, h, w) latents -> (1, 3, h*f, w*f) pixels
LAYOUTS = ("even", "diffusers")


@dataclass(frozen=True)
class VaeTiling:
    """Tile size in latent cells (64 = 512 px for SD), overlap as a fraction of the tile, and the layout."""
    tile: int = 64
    overlap: float = 0.25
    layout: str = "even"

    def __post_init__(self):
        if self.tile < 4 or not 0.0 <= self.overlap < 1.0 or self.layout not in LAYOUTS:
            raise UserError(f"VAE tiling needs a tile of at least 4 latents (32 px), an overlap in [0, 1) and a "
                            f"layout in {LAYOUTS}; got tile {self.tile}, overlap {self.overlap}, {self.layout!r}")

    def decode(self, z: np.ndarray, decode: Decode, scale: int) -> np.ndarray:
        """`decode(z)`, in tiles when z (1, C, h, w) is larger than one tile; (1, 3, h*scale, w*scale)."""
        if z.shape[-1] <= self.tile and z.shape[-2] <= self.tile:
            return decode(z)
        run = _diffusers if self.layout == "diffusers" else _even
        return run(z, decode, scale, self.tile, self.overlap)


# -- diffusers' layout --------------------------------------------------------------------------------------------

def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """diffusers' blend_v (axis 2) / blend_h (axis 3): b's first rows fade in from a's last, in place."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    for k in range(extent):
        src = [slice(None)] * 4
        dst = [slice(None)] * 4
        src[axis], dst[axis] = a.shape[axis] - extent + k, k
        b[tuple(dst)] = a[tuple(src)] * (1 - k / extent) + b[tuple(dst)] * (k / extent)


def _diffusers(z: np.ndarray, decode: Decode, scale: int, tile: int, overlap: float) -> np.ndarray:
    """AutoencoderKL.tiled_decode with tile_latent_min_size = tile, tile_sample_min_size = tile * scale."""
    stride = int(tile * (1 - overlap))
    extent = int(tile * scale * overlap)
    limit = tile * scale - extent
    rows = [[np.array(decode(z[:, :, i:i + tile, j:j + tile]), dtype=np.float32)       # (1, 3, <=T*f, <=T*f)
             for j in range(0, z.shape[3], stride)] for i in range(0, z.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], t, extent, 2)
            if j > 0:
                _blend(row[j - 1], t, extent, 3)
        out_rows.append(np.concatenate([t[:, :, :limit, :limit] for t in row], axis=3))
    return np.concatenate(out_rows, axis=2)                                             # (1, 3, h*f, w*f)


# -- stable-diffusion.cpp's layout ------------------------------------------------------------------------------

def plan_axis(size: int, tile: int, overlap: float) -> list[tuple[int, int, int]]:
    """(offset, overlap before, overlap after) per tile: equal tiles spread evenly, as sd_tiling_plan_axis."""
    if tile >= size:
        return [(0, 0, 0)]
    extent = size - tile
    target = extent / ((1.0 - overlap) * tile)
    lo_n, hi_n = 1 + (extent - 1) // (tile - 1), max(1, 2 * extent // tile)   # tiles overlap; never three at once
    counts = [min(max(int(np.floor(target)), lo_n), hi_n), min(max(int(np.ceil(target)), lo_n), hi_n)]
    n = min(counts, key=lambda c: (abs(1.0 / c - 1.0 / target), c))
    pos = [k * extent // n for k in range(n + 1)]
    return [(p, pos[k - 1] + tile - p if k > 0 else 0, p + tile - pos[k + 1] if k < n else 0)
            for k, p in enumerate(pos)]


def _ramp(length: int, before: int, after: int) -> np.ndarray:
    """Per-pixel weights along one tile axis: smootherstep up over `before`, down over `after`, 1 elsewhere."""
    x = np.ones(length, dtype=np.float64)
    i = np.arange(length, dtype=np.float64)
    if before:
        x = np.where(i < before, i / before, x)
    if after:
        x = np.where(i >= length - after, (length - i) / after, x)
    x = np.clip(x, 0.0, 1.0)
    return x * x * x * (x * (6.0 * x - 15.0) + 10.0)


def _even(z: np.ndarray, decode: Decode, scale: int, tile: int, overlap: float) -> np.ndarray:
    """Equal-size tiles, each added with smootherstep weights that sum to one across every overlap."""
    th, tw = min(tile, z.shape[2]), min(tile, z.shape[3])
    ys, xs = plan_axis(z.shape[2], tile, overlap), plan_axis(z.shape[3], tile, overlap)
    out = weight = None
    for y, top, bottom in ys:
        wy = _ramp(th * scale, top * scale, bottom * scale)
        for x, left, right in xs:
            pixels = decode(z[:, :, y:y + th, x:x + tw])                              # (1, 3, th*f, tw*f)
            if out is None:
                out = np.zeros(pixels.shape[:2] + (z.shape[2] * scale, z.shape[3] * scale), dtype=np.float64)
                weight = np.zeros(out.shape[2:], dtype=np.float64)
            w = np.outer(wy, _ramp(tw * scale, left * scale, right * scale))
            region = (slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            out[(slice(None), slice(None)) + region] += pixels * w
            weight[region] += w
    return (out / np.maximum(weight, 1e-12)).astype(np.float32)                       # (1, 3, h*f, w*f)

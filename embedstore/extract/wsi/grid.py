"""The tile grid of a slide at a target mpp: pure planning from sizes and a tissue mask.

Coordinates are level-0 pixels everywhere (``x``, ``y``), as in OpenSlide. A grid of tiles of
``tile_size`` px at ``target_mpp`` um/px covers ``tile_size * target_mpp / slide_mpp`` level-0 px
per tile side; each tile is read from the coarsest pyramid level that is not coarser than needed
(1 % tolerance) and resized (antialiased) to ``tile_size``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore.errors import SlideError

if TYPE_CHECKING:
    from .reader import SlideReader

__all__ = ["best_level", "TileGrid", "plan_grid", "read_tile"]


def best_level(level_downsamples: list[float] | tuple[float, ...], downsample: float,
               tolerance: float = 0.01) -> int:
    """Index of the coarsest level whose downsample is <= ``downsample * (1 + tolerance)``
    (reading a level that much coarser costs a < tolerance upscale); level 0 if none fits."""
    limit = downsample * (1.0 + tolerance)
    fits = [(d, i) for i, d in enumerate(level_downsamples) if d <= limit]
    return max(fits)[1] if fits else 0


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Tiles of one slide, row-major (y, then x)."""
    x: np.ndarray          # (n,) int64 level-0 left edges
    y: np.ndarray          # (n,) int64 level-0 top edges
    tissue: np.ndarray     # (n,) float32 tissue fraction of each tile in the mask (1 without mask)
    dims: tuple[int, int]  # level-0 (width, height) of the slide
    level: int             # pyramid level the tiles are read from
    downsample: float      # downsample of that level
    read_size: int         # px read at that level per tile side (then resized to tile_size)
    tile_size: int         # px per tile side as stored / embedded
    tile_l0: float         # level-0 px per tile side: tile_size * target_mpp / slide_mpp
    target_mpp: float      # um/px of the tiles
    slide_mpp: float       # um/px of level 0 (metadata or user-given)
    min_tissue: float      # tissue fraction a tile needed to be kept

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("level", "downsample", "read_size", "tile_size",
                                            "tile_l0", "target_mpp", "slide_mpp", "min_tissue")}
        d["dims"] = list(self.dims)
        d["x"], d["y"] = self.x.tolist(), self.y.tolist()
        d["tissue"] = [round(float(v), 4) for v in self.tissue]
        return d

    def save_json(self, path: str | os.PathLike[str]) -> None:
        from embedstore.store.atomic import atomic_write_text  # the store loads pyarrow, lmdb
        atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> TileGrid:
        d = json.loads(Path(path).read_text())
        return cls(x=np.asarray(d.pop("x"), np.int64), y=np.asarray(d.pop("y"), np.int64),
                   tissue=np.asarray(d.pop("tissue"), np.float32),
                   dims=tuple(d.pop("dims")), **d)


def _mask_fractions(mask: np.ndarray, dims: tuple[int, int], x0: np.ndarray, y0: np.ndarray,
                    size: float) -> np.ndarray:
    """Exact fraction of each level-0 square [x0, x0+size) x [y0, y0+size) covered by ``mask``
    (which spans the whole slide): bilinear lookup in the summed-area table is exact for a
    piecewise-constant mask."""
    mh, mw = mask.shape
    sat = np.zeros((mh + 1, mw + 1), np.float64)
    sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)

    def area(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # integral over [0,u) x [0,v)
        u, v = np.clip(u, 0, mw), np.clip(v, 0, mh)
        i, j = np.minimum(np.floor(u).astype(np.int64), mw - 1), \
            np.minimum(np.floor(v).astype(np.int64), mh - 1)
        a, b = u - i, v - j
        return (sat[j, i] * (1 - a) * (1 - b) + sat[j, i + 1] * a * (1 - b)
                + sat[j + 1, i] * (1 - a) * b + sat[j + 1, i + 1] * a * b)

    sx, sy = mw / dims[0], mh / dims[1]
    u0, u1 = x0 * sx, (x0 + size) * sx
    v0, v1 = y0 * sy, (y0 + size) * sy
    covered = area(u1, v1) - area(u0, v1) - area(u1, v0) + area(u0, v0)
    return np.clip(covered / ((u1 - u0) * (v1 - v0)), 0.0, 1.0)


def plan_grid(dims: tuple[int, int], slide_mpp: float, target_mpp: float, tile_size: int,
              mask: np.ndarray | None = None, *,
              level_downsamples: list[float] | tuple[float, ...] = (1.0,),
              min_tissue: float = 0.25, level_tolerance: float = 0.01) -> TileGrid:
    """Non-overlapping tiles fully inside the slide, kept where the tissue fraction of ``mask``
    ((h, w) bool covering the whole slide at any scale; None keeps all) is >= ``min_tissue``.

    Pure: no I/O. 0.25 keeps tissue edges while dropping tiles that are mostly glass.
    """
    if not (slide_mpp > 0 and math.isfinite(slide_mpp)):
        raise SlideError(f"slide_mpp must be a positive number, got {slide_mpp!r}")
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise SlideError(f"target_mpp must be a positive number, got {target_mpp!r}")
    if int(tile_size) != tile_size or tile_size < 1:
        raise SlideError(f"tile_size must be a positive integer, got {tile_size!r}")
    if not 0.0 <= min_tissue <= 1.0:
        raise SlideError(f"min_tissue must be within [0, 1], got {min_tissue!r}")
    W, H = int(dims[0]), int(dims[1])
    need = target_mpp / slide_mpp
    tile_l0 = tile_size * need
    level = best_level(level_downsamples, need, level_tolerance)
    ds = float(level_downsamples[level])
    read_size = max(1, math.floor(tile_l0 / ds + 0.5))
    ncols, nrows = int(W / tile_l0 + 1e-9), int(H / tile_l0 + 1e-9)
    cols = np.floor(np.arange(ncols) * tile_l0 + 0.5).astype(np.int64)
    rows = np.floor(np.arange(nrows) * tile_l0 + 0.5).astype(np.int64)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    x, y = xx.ravel(), yy.ravel()
    if mask is None:
        tissue = np.ones(x.shape, np.float32)
    else:
        if mask.ndim != 2 or mask.size == 0:
            raise SlideError(f"tissue mask must be a non-empty 2-D array, got shape {mask.shape}")
        tissue = _mask_fractions(mask.astype(bool), (W, H), x, y, tile_l0).astype(np.float32)
    keep = tissue >= min_tissue - 1e-6
    return TileGrid(x=x[keep], y=y[keep], tissue=tissue[keep], dims=(W, H), level=level,
                    downsample=ds, read_size=int(read_size), tile_size=int(tile_size),
                    tile_l0=float(tile_l0), target_mpp=float(target_mpp),
                    slide_mpp=float(slide_mpp), min_tissue=float(min_tissue))


def read_tile(reader: SlideReader, grid: TileGrid, i: int) -> np.ndarray:
    """Tile ``i`` of ``grid``: (tile_size, tile_size, 3) uint8 RGB."""
    region = reader.read_region(int(grid.x[i]), int(grid.y[i]), grid.level,
                                grid.read_size, grid.read_size)
    if grid.read_size == grid.tile_size:
        return region
    from PIL import Image
    img = Image.fromarray(region).resize((grid.tile_size, grid.tile_size),
                                         Image.Resampling.LANCZOS)
    return np.asarray(img)


"""One slide's plan: its thumbnail, tissue mask and tile grid (and the pictures of them)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedstore.errors import SlideError

from .grid import TileGrid, plan_grid
from .overlay import save_mask, save_overlay
from .reader import SlideReader
from .tissue import tissue_mask

__all__ = ["SlidePlan", "plan_slide", "mask_downsample"]


@dataclass(frozen=True, eq=False)
class SlidePlan:
    """The tiling of one slide and what it was computed from."""
    grid: TileGrid         # the tiles to read
    thumbnail: np.ndarray  # (h, w, 3) uint8 RGB of the whole slide
    mask: np.ndarray       # (h, w) bool tissue mask on that thumbnail
    mask_mpp: float        # um/px of thumbnail and mask

    def save(self, directory: str | os.PathLike[str], stem: str = "slide") -> dict[str, Path]:
        """Write ``{stem}.overlay.png``, ``{stem}.mask.png`` and ``{stem}.grid.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {k: d / f"{stem}.{k}.{ext}" for k, ext in
                 (("overlay", "png"), ("mask", "png"), ("grid", "json"))}
        save_overlay(self.thumbnail, self.mask, self.grid, paths["overlay"])
        save_mask(self.mask, paths["mask"])
        self.grid.save_json(paths["grid"])
        return paths


def mask_downsample(reader: SlideReader, mpp: float, mask_max_side: int = 2048,
                    mask_min_mpp: float = 4.0) -> float:
    """The downsample of the thumbnail tissue is found on: at most ``mask_max_side`` px a side,
    never finer than ``mask_min_mpp`` um/px; a pyramid level up to 10 % coarser than that is
    taken as it is. Reading a level whole costs its JPEG tiles; resizing the next finer one
    (4x the pixels) to the exact size cost 0.45 s of the 0.55 s a 64k x 48k slide's plan
    took, for a mask at 7.8 instead of 8 um/px."""
    W, H = reader.dimensions
    ds = max(1.0, mask_min_mpp / mpp, max(W, H) / mask_max_side)
    return next((d for d in sorted(reader.level_downsamples) if ds <= d <= ds * 1.1), ds)


def plan_slide(reader: SlideReader, target_mpp: float, tile_size: int, *,
               slide_mpp: float | None = None, min_tissue: float = 0.25,
               mask_max_side: int = 2048, mask_min_mpp: float = 4.0,
               close_um: float = 16.0, open_um: float = 8.0) -> SlidePlan:
    """Mask tissue on a thumbnail and plan the grid. ``slide_mpp`` overrides the metadata.

    The thumbnail is at most ``mask_max_side`` px a side and never finer than
    ``mask_min_mpp`` um/px (`mask_downsample`); only it is decoded to find tissue.
    """
    mpp = slide_mpp if slide_mpp is not None else reader.mpp
    if mpp is None:
        raise SlideError(f"slide {reader.path} has no microns-per-pixel in its metadata; "
                         "pass --slide-mpp (e.g. 0.25 for a 40x scan, 0.5 for 20x)")
    W, H = reader.dimensions
    thumb = reader.overview(mask_downsample(reader, mpp, mask_max_side, mask_min_mpp))
    mask_mpp = mpp * W / thumb.shape[1]
    mask = tissue_mask(thumb, close_px=max(1, round(close_um / mask_mpp)),
                       open_px=max(1, round(open_um / mask_mpp)))
    grid = plan_grid((W, H), mpp, target_mpp, tile_size, mask,
                     level_downsamples=reader.level_downsamples, min_tissue=min_tissue)
    return SlidePlan(grid=grid, thumbnail=thumb, mask=mask, mask_mpp=mask_mpp)


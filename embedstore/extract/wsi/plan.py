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

__all__ = ["SlidePlan", "plan_slide"]


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


def plan_slide(reader: SlideReader, target_mpp: float, tile_size: int, *,
               slide_mpp: float | None = None, min_tissue: float = 0.25,
               mask_max_side: int = 2048, mask_min_mpp: float = 4.0,
               close_um: float = 16.0, open_um: float = 8.0) -> SlidePlan:
    """Mask tissue on a thumbnail and plan the grid. ``slide_mpp`` overrides the metadata.

    The thumbnail is at most ``mask_max_side`` px a side and never finer than
    ``mask_min_mpp`` um/px; only it is decoded to find tissue.
    """
    mpp = slide_mpp if slide_mpp is not None else reader.mpp
    if mpp is None:
        raise SlideError(f"slide {reader.path} has no microns-per-pixel in its metadata; "
                         "pass --slide-mpp (e.g. 0.25 for a 40x scan, 0.5 for 20x)")
    W, H = reader.dimensions
    ds = max(1.0, mask_min_mpp / mpp, max(W, H) / mask_max_side)
    thumb = reader.overview(ds)
    mask_mpp = mpp * W / thumb.shape[1]
    mask = tissue_mask(thumb, close_px=max(1, round(close_um / mask_mpp)),
                       open_px=max(1, round(open_um / mask_mpp)))
    grid = plan_grid((W, H), mpp, target_mpp, tile_size, mask,
                     level_downsamples=reader.level_downsamples, min_tissue=min_tissue)
    return SlidePlan(grid=grid, thumbnail=thumb, mask=mask, mask_mpp=mask_mpp)


"""Whole-slide images: open, mask tissue, plan a tile grid at a target mpp, read tiles.

Coordinates are level-0 pixels everywhere (``x``, ``y``), as in OpenSlide.

- ``reader``: ``SlideReader`` (picks the backend, reads regions, thumbnails; fork-safe)
  over ``tiff`` (tifffile: SVS, OME-TIFF) and ``openslide`` (vendor formats);
- ``identity``: slide ids, tile keys, a slide file's fingerprint;
- ``tissue``: the tissue mask of a thumbnail;
- ``grid``: the tile grid at a target mpp (pure) and reading one of its tiles;
- ``plan``: one slide's thumbnail + mask + grid; ``overlay``: its PNG pictures.
"""
from __future__ import annotations

from .grid import TileGrid, best_level, plan_grid, read_tile
from .identity import parse_tile_key, slide_id, slide_identity, tile_key
from .overlay import save_mask, save_overlay
from .plan import SlidePlan, plan_slide
from .reader import SlideReader
from .tissue import median3, otsu_threshold, tissue_mask

__all__ = [
    "SlideReader", "TileGrid", "SlidePlan", "slide_identity", "slide_id", "tile_key",
    "parse_tile_key", "otsu_threshold", "median3", "tissue_mask", "best_level", "plan_grid",
    "plan_slide", "read_tile", "save_overlay", "save_mask",
]

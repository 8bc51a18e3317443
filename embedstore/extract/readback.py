"""Reading tiles back from their sources: for galleries, heatmaps and looking at results.

A stored row knows its key, its source root and (for slides) its slide id and level-0 x, y;
with the tile geometry in STORE.json that is enough to read the pixels again.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SourceError

if TYPE_CHECKING:
    from ..store import Store
    from .wsi import SlideReader

__all__ = ["read_tiles", "slide_path", "slide_thumbnail"]


def slide_path(store: Store, slide: str) -> Path:
    """The slide file of ``slide`` (its id, relative to the source root recorded per tile)."""
    bag = store.slide(slide)
    src = store.metadata(bag.ids[:1], ("source",))["source"][0]
    p = Path(src or "") / slide
    if not p.exists():
        raise SourceError(f"slide {slide!r} is not at {p} any more (moved?): its tiles cannot be read back")
    return p


def slide_thumbnail(store: Store, slide: str, max_size: int = 1024) -> tuple[np.ndarray, float]:
    """(thumbnail (h, w, 3) uint8, level-0 pixels per thumbnail pixel)."""
    from .wsi import SlideReader
    with SlideReader(slide_path(store, slide)) as r:
        thumb = r.thumbnail(max_size)
        return thumb, r.dimensions[0] / thumb.shape[1]


def read_tiles(store: Store, ids: np.ndarray, size: int = 160) -> list[np.ndarray | None]:
    """Pixels of the tiles ``ids`` as (size, size, 3) uint8 images (None where unreadable)."""
    from PIL import Image
    meta = store.metadata(np.asarray(ids), ("key", "slide", "source", "x", "y"))
    tile = store.meta.tile or {}
    out: list[np.ndarray | None] = []
    readers: dict[str, SlideReader] = {}
    units = store.units() if tile.get("kind") == "slides" else {}
    try:
        for key, slide, src, x, y in zip(meta["key"], meta["slide"], meta["source"], meta["x"], meta["y"]):
            try:
                if tile.get("kind") == "slides" and x >= 0 and slide:
                    from .wsi import SlideReader
                    path = str(Path(src or "") / slide)
                    r = readers.get(path) or readers.setdefault(path, SlideReader(path))
                    mpp = units.get(f"slide:{slide}", {}).get("slide_mpp") or r.mpp or tile.get("mpp") or 0.5
                    side = int(round(tile.get("tile_size", 224) * (tile.get("mpp") or mpp) / mpp))
                    img = Image.fromarray(r.read_region(int(x), int(y), 0, side, side))
                else:
                    img = Image.open(Path(src or "") / key).convert("RGB")
                out.append(np.asarray(img.resize((size, size), Image.Resampling.BILINEAR)))
            except Exception:
                out.append(None)
    finally:
        for r in readers.values():
            r.close()
    return out

"""One work item -> the tile specs its workers decode.

Files: the unit's files not yet in the store. Slides: the tissue grid at the store's mpp (its
mask, overlay and grid are written to ``STORE/masks``), less the tiles already stored. Views of
tiles embedded before the store had views: those tiles again, for their views only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import SlideError, SourceError
from ..store import lookup_ids, open_store
from .dataset import TileSpec
from .pending import WorkItem

__all__ = ["PlannedUnit", "Planned", "TilePlanner"]


@dataclass
class PlannedUnit:
    specs: list[TileSpec]                 # the tiles to decode and embed
    skipped: int = 0                      # tiles already in the store
    info: dict[str, Any] | None = None    # kept with the unit's record (slide identity, grid)
    overlay: str | None = None            # the overlay PNG written for a slide


class Planned(NamedTuple):
    """A claimed work item and its plan (or why planning failed)."""
    item: int                    # index of the item in the run's work list
    unit: PlannedUnit | None     # None when planning failed
    error: str | None            # one line
    seconds: float               # time spent planning


class TilePlanner:
    """Plans work items against the store at ``store`` (read fresh: what is committed now)."""

    def __init__(self, store: Path, *, tile_size: int, file_size: int | None, target_mpp: float,
                 slide_mpp: float | None = None, min_tissue: float = 0.25, lock: bool = True) -> None:
        self.store = Path(store)
        self.tile_size = tile_size        # px per stored tile side
        self.file_size = file_size        # files: the side every file is resized to
        self.target_mpp = target_mpp      # slides: um/px of the tiles
        self.slide_mpp = slide_mpp        # slides: um/px when the metadata lacks it
        self.min_tissue = min_tissue
        self.lock = lock                  # False: read the catalog lock-free (staging ranks)

    def lookup(self, keys: list[str]) -> list[int | None]:
        """Ids of ``keys`` in the store, None where not committed."""
        return lookup_ids(self.store, keys, lock=self.lock)

    def plan(self, index: int, item: WorkItem) -> PlannedUnit:
        if item.views_only:
            return self._views(index, item)
        if item.unit.kind == "files":
            return self._files(index, item)
        return self._slide(index, item)

    def plan_timed(self, index: int, item: WorkItem) -> Planned:
        """`plan`, catching what an unreadable input raises: a bad slide must not stop the run."""
        t0 = time.perf_counter()
        try:
            return Planned(index, self.plan(index, item), None, time.perf_counter() - t0)
        except (SlideError, SourceError, OSError, ValueError) as e:
            return Planned(index, None, str(e).splitlines()[0], time.perf_counter() - t0)
        except Exception as e:  # an unreadable slide must not stop the run
            return Planned(index, None, f"{type(e).__name__}: {e}".splitlines()[0],
                           time.perf_counter() - t0)

    def _files(self, index: int, item: WorkItem) -> PlannedUnit:
        files = item.unit.files
        keys = [t.key for t in files]
        present = {k for k, i in zip(keys, self.lookup(keys)) if i is not None}
        return PlannedUnit([TileSpec(index, t.key, t.path, tile_size=self.file_size or 0)
                            for t in files if t.key not in present], skipped=len(present))

    def _slide(self, index: int, item: WorkItem) -> PlannedUnit:
        from .wsi import SlideReader, plan_slide, slide_identity, tile_key
        u = item.unit
        with SlideReader(u.slide_path) as r:
            p = plan_slide(r, self.target_mpp, self.tile_size, slide_mpp=self.slide_mpp,
                           min_tissue=self.min_tissue)
        paths = p.save(self.store / "masks", u.slide_id.replace("/", "__"))
        g = p.grid
        info = {"identity": slide_identity(u.slide_path), "tiles": len(g),
                "slide_mpp": g.slide_mpp, "level": g.level, "read_size": g.read_size}
        keys = [tile_key(u.slide_id, int(x), int(y)) for x, y in zip(g.x, g.y)]
        present = {k for k, i in zip(keys, self.lookup(keys)) if i is not None}
        specs = [TileSpec(index, k, u.slide_path, int(x), int(y), g.level, g.read_size, g.read_size,
                          self.tile_size)
                 for k, x, y in zip(keys, g.x, g.y) if k not in present]
        return PlannedUnit(specs, skipped=len(present), info=info, overlay=str(paths["overlay"]))

    def _views(self, index: int, item: WorkItem) -> PlannedUnit:
        """Tiles of a unit embedded before the store had views: embed their views only."""
        u = item.unit
        if u.kind == "files":
            keys = [t.key for t in u.files]
            return PlannedUnit([TileSpec(index, t.key, t.path, tile_size=self.file_size or 0)
                                for t, i in zip(u.files, self.lookup(keys)) if i is not None])
        st = open_store(self.store, lock=self.lock)
        rec = st.units()[u.id]
        bag = st.slide(u.slide_id)
        rs = int(rec.get("read_size", self.tile_size))
        level = int(rec.get("level", 0))
        return PlannedUnit([TileSpec(index, k, u.slide_path, int(x), int(y), level, rs, rs,
                                     self.tile_size) for k, (x, y) in zip(bag.keys, bag.coords)])

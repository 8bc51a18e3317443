"""One work item -> the tile specs its workers decode.

Files: the unit's files not yet in the store; a key already there from another file location
is checked by content (``fingerprint``): another file under it is an error naming both, never
"already present". Slides: the tissue grid at the store's mpp (its
mask, overlay and grid are written to ``STORE/masks``), less the tiles already stored. Views of
tiles embedded before the store had views: those tiles again, for their views only.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import SlideError, SourceError
from ..store import lookup_ids, open_store
from ..store.geometry import mask_stem
from .dataset import TileSpec
from .fingerprint import conflict_reason, file_fingerprint, fingerprints
from .pending import WorkItem
from .sources import FileTile

__all__ = ["PlannedUnit", "Planned", "TilePlanner"]


@dataclass
class PlannedUnit:
    specs: list[TileSpec]                 # the tiles to decode and embed
    skipped: int = 0                      # tiles already in the store
    info: dict[str, Any] | None = None    # kept with the unit's record (slide identity, grid)
    overlay: str | None = None            # the overlay PNG written for a slide
    errors: list[tuple[str, str]] = field(default_factory=list)   # (key, reason): inputs refused
    conflicts: list[str] = field(default_factory=list)  # keys holding another file's embedding


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
        self._recorded: dict[str, str] | None = None   # key -> fingerprint of finished units

    def lookup(self, keys: list[str]) -> list[int | None]:
        """Ids of ``keys`` in the store, None where not committed."""
        return lookup_ids(self.store, keys, lock=self.lock)

    def plan(self, index: int, item: WorkItem) -> PlannedUnit:
        if item.unit.problem:
            raise SourceError(item.unit.problem)
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
        u = item.unit
        refused = [(t.key, t.problem) for t in u.files if t.problem]
        files = [t for t in u.files if not t.problem]
        ids = self.lookup([t.key for t in files])
        fps = fingerprints(files)
        present = [(t, i) for t, i in zip(files, ids) if i is not None]
        conflicts = self._conflicts(present, fps)
        bad = {k for k, _ in conflicts}
        info = {"root": u.source, "files": {k: v for k, v in fps.items() if k not in bad}}
        specs = [TileSpec(index, t.key, t.path, tile_size=self.file_size or 0)
                 for t, i in zip(files, ids) if i is None]
        return PlannedUnit(specs, skipped=len(present) - len(conflicts), info=info,
                           errors=refused + conflicts, conflicts=sorted(bad))

    def _conflicts(self, present: list[tuple[FileTile, int]],
                   fps: dict[str, str]) -> list[tuple[str, str]]:
        """``(key, reason)`` for the keys in the store whose embedded file (its row's source
        folder + key) is at another location and is not the same content as this file."""
        if not present:
            return []
        st = open_store(self.store, lock=self.lock)
        sources = st.metadata(np.array([i for _, i in present], dtype=np.int64), ("source",))["source"]
        out: list[tuple[str, str]] = []
        for (t, _), src in zip(present, sources):
            old = os.path.join(src, t.key) if src else t.key
            if os.path.realpath(old) == t.path:
                continue                                  # the very file embedded
            want = self.recorded().get(t.key)
            unknown = want is None
            if unknown and os.path.exists(old):
                try:
                    want, unknown = file_fingerprint(old), False
                except OSError:
                    pass
            if unknown or want != fps.get(t.key):
                out.append((t.key, conflict_reason(t.key, t.path, old, unknown=unknown)))
        return out

    def recorded(self) -> dict[str, str]:
        """Key -> fingerprint recorded by the finished files units (read once, when needed)."""
        if self._recorded is None:
            self._recorded = {}
            for rec in open_store(self.store, lock=self.lock).units().values():
                self._recorded.update(rec.get("files") or {})
        return self._recorded

    def _slide(self, index: int, item: WorkItem) -> PlannedUnit:
        from .wsi import SlideReader, plan_slide, slide_identity, tile_key
        u = item.unit
        with SlideReader(u.slide_path) as r:
            p = plan_slide(r, self.target_mpp, self.tile_size, slide_mpp=self.slide_mpp,
                           min_tissue=self.min_tissue)
        paths = p.save(self.store / "masks", mask_stem(u.slide_id))
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

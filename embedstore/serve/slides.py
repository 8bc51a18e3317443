"""Open slide readers of one served store, kept per slide (a bounded LRU), each with its own lock.

A DeepZoom viewer asks for dozens of tiles at once; they are read in the server's thread pool,
one lock per slide (a reader's file handle is not shared across threads), so tiles of other
slides are read meanwhile. The slide's file is found from the store (``readback.slide_path``)
once, when its reader is opened; no path from a request is ever opened.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .deepzoom import DeepZoom, jpeg_bytes, read_dz_tile

if TYPE_CHECKING:
    from ..extract.wsi import SlideReader

__all__ = ["SlideReaders", "OpenSlideFile"]

READERS = 8               # slides kept open per served store


class OpenSlideFile:
    """One opened slide: its reader, its DeepZoom geometry and the lock around reads."""

    def __init__(self, path: Path) -> None:
        from ..extract.wsi import SlideReader
        self.reader: SlideReader = SlideReader(path)
        self.dz = DeepZoom.of(self.reader)
        self.lock = threading.Lock()
        self.closed = False

    def dz_tile(self, level: int, col: int, row: int) -> np.ndarray | None:
        """DeepZoom tile (h, w, 3) uint8 (UnknownKeyError out of range); None once closed."""
        self.dz.region(level, col, row)                  # check before taking the lock
        with self.lock:
            if self.closed:                              # evicted while this request waited
                return None
            return read_dz_tile(self.reader, self.dz, level, col, row)

    def region(self, x: int, y: int, side: int) -> np.ndarray | None:
        """The level-0 square (x, y, side) as (side, side, 3) uint8; None once closed."""
        with self.lock:
            if self.closed:
                return None
            return self.reader.read_region(x, y, 0, side, side)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float] | None:
        """(thumbnail (h, w, 3) uint8, level-0 px per thumbnail px), as ``readback.slide_thumbnail``;
        None once closed."""
        with self.lock:
            if self.closed:
                return None
            thumb = self.reader.thumbnail(max_size)
        return thumb, self.dz.width / thumb.shape[1]

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.reader.close()


class SlideReaders:
    """At most ``size`` open slides, least recently used closed first; ``locate(slide)`` gives a
    slide's file (called only for slides the store holds, outside this cache's lock)."""

    def __init__(self, locate: Callable[[str], Path], size: int = READERS) -> None:
        self._locate, self._size = locate, size
        self._open: OrderedDict[str, OpenSlideFile] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, slide: str) -> OpenSlideFile:
        with self._lock:
            f = self._open.get(slide)
            if f is not None:
                self._open.move_to_end(slide)
                return f
        new = OpenSlideFile(self._locate(slide))        # may read the store: not under our lock
        evicted: list[OpenSlideFile] = []
        with self._lock:
            f = self._open.get(slide)
            if f is None:
                f = self._open[slide] = new
                while len(self._open) > self._size:
                    evicted.append(self._open.popitem(last=False)[1])
            else:                                        # another request opened it meanwhile
                evicted.append(new)
            self._open.move_to_end(slide)
        for old in evicted:
            old.close()                                  # waits for a read in flight on it
        return f

    def dz_jpeg(self, slide: str, level: int, col: int, row: int, quality: int = 80) -> bytes:
        """A DeepZoom tile of ``slide`` as JPEG bytes (encoded outside every lock)."""
        while True:
            img = self.get(slide).dz_tile(level, col, row)
            if img is not None:
                return jpeg_bytes(img, quality)

    def region(self, slide: str, x: int, y: int, side: int) -> np.ndarray:
        """A level-0 square of ``slide`` (a stored tile's), read through its open reader."""
        while True:
            img = self.get(slide).region(x, y, side)
            if img is not None:
                return img

    def thumbnail(self, slide: str, max_size: int) -> tuple[np.ndarray, float]:
        while True:
            out = self.get(slide).thumbnail(max_size)
            if out is not None:
                return out

    def close(self) -> None:
        with self._lock:
            files = list(self._open.values())
            self._open.clear()
        for f in files:
            f.close()

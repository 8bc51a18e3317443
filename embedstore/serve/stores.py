"""The stores one ``embedstore serve`` serves: short names, and every read the API makes of them.

Nothing here knows HTTP. A request names a store by its short name and a tile or slide by
what the store holds; anything else raises :class:`~embedstore.errors.UnknownKeyError`
(the API answers 404), so no path from a request ever reaches the filesystem: tiles and
thumbnails are read back from the sources recorded in the store itself.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, SourceError, UnknownKeyError

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["ServedStore", "served_stores", "short_names", "png_bytes", "MAX_IMAGE_PIXELS"]

MAX_IMAGE_PIXELS = 64_000_000      # an uploaded query image larger than this is refused
THUMBNAIL_SIZE = 1024               # longest side of a slide thumbnail, in pixels
_THUMB_CACHE = 32                   # thumbnails kept per store
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def short_names(paths: Sequence[Path]) -> list[str]:
    """A URL-safe name per store path: its directory name, ``-2``, ``-3`` ... for repeats."""
    names: list[str] = []
    for path in paths:
        base = _UNSAFE.sub("_", Path(path).resolve().name).strip("._") or "store"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def png_bytes(img: np.ndarray) -> bytes:
    """(h, w, 3|4) uint8 -> PNG file bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


class ServedStore:
    """One store opened for serving. Reads go through one lock (LMDB read transactions and
    slide readers are not shared across threads); the image embedder is built on first use."""

    def __init__(self, name: str, store: Store) -> None:
        self.name, self.store = name, store
        self.lock = threading.RLock()
        self._embed: Callable[[Path], np.ndarray] | None = None
        self._slides: list[str] | None = None
        self._thumbs: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()

    # -- what the store holds ------------------------------------------------------------
    @property
    def is_slides(self) -> bool:
        return (self.store.meta.tile or {}).get("kind") == "slides"

    def summary(self) -> dict[str, Any]:
        backbone = self.store.meta.backbone or {}
        return {"name": self.name, "rows": len(self.store), "dim": self.store.dim,
                "backbone": backbone.get("name"), "kind": (self.store.meta.tile or {}).get("kind"),
                "slides": len(self.slides())}

    def slides(self) -> list[str]:
        with self.lock:
            if self._slides is None:
                self._slides = self.store.slides()
            return self._slides

    def require_slide(self, slide: str) -> str:
        if slide not in set(self.slides()):
            raise UnknownKeyError(f"slide {slide!r} is not in store {self.name!r}; "
                                  f"GET /api/{self.name}/slides lists its slides")
        return slide

    def require_key(self, key: str) -> int:
        """The id of tile ``key``; UnknownKeyError when the store does not hold it."""
        with self.lock:
            try:
                return int(self.store.ids([key])[0])
            except (KeyError, ValueError):
                raise UnknownKeyError(f"tile {key!r} is not in store {self.name!r}") from None

    def keys(self, offset: int, limit: int) -> dict[str, Any]:
        """A page of live tiles in id order: total, keys, ids."""
        with self.lock:
            ids = self.store.all_ids()
            page = ids[offset:offset + limit]
            return {"total": int(len(ids)), "offset": offset, "ids": [int(i) for i in page],
                    "keys": self.store.keys_of(page) if len(page) else []}

    # -- search --------------------------------------------------------------------------
    def search(self, *, key: str | None = None, vector: np.ndarray | None = None, k: int = 10,
               exclude_same_slide: bool = False, slides: Collection[str] | None = None,
               label: str | None = None, task: str | None = None) -> dict[str, Any]:
        """Neighbours of a stored tile ``key`` or of a ``vector`` (dim,), as JSON."""
        from ..index import search
        from ..index.search import neighbours_json
        if task is not None and label is None:
            raise ConfigError("task only applies with label; add label=L")
        if slides:
            for slide in slides:
                self.require_slide(slide)
        common: dict[str, Any] = dict(k=k, exclude_same_slide=exclude_same_slide,
                                      slides=list(slides) if slides else None, label=label, task=task)
        with self.lock:
            if key is not None:
                hit = search(self.store, ids=[self.require_key(key)], **common)[0]
            else:                          # search checks the vector (as_queries): one line
                hit = search(self.store, vectors=np.asarray(vector), **common)[0]
        return {"store": self.name, "query": key, "method": hit.method, "k": k,
                "results": neighbours_json(hit)}

    def query_vector(self, key: str) -> np.ndarray:
        with self.lock:
            return np.asarray(self.store.gather(np.array([self.require_key(key)])), np.float32)[0]

    def embed_image(self, data: bytes) -> np.ndarray:
        """An uploaded image file's bytes -> (dim,) float32 with the store's own backbone."""
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception as exc:        # PIL raises several kinds for garbage
            raise SourceError(f"the upload is not a readable image ({' '.join(str(exc).split())[:120]})"
                              "; send a PNG, JPEG or TIFF file") from None
        if w * h > MAX_IMAGE_PIXELS:
            raise SourceError(f"the uploaded image is {w}x{h} pixels, more than {MAX_IMAGE_PIXELS:,}; "
                              "send a tile-sized image")
        with self.lock:
            if self._embed is None:
                from ..backbones.images import image_embedder
                meta = self.store.meta
                self._embed = image_embedder(meta.backbone, meta.weights_sha256,
                                             (meta.tile or {}).get("tile_size"), self.name)
            with tempfile.TemporaryDirectory(prefix="embedstore-serve-") as tmp:
                path = Path(tmp) / "query"
                path.write_bytes(data)
                return np.asarray(self._embed(path), dtype=np.float32)

    # -- pixels --------------------------------------------------------------------------
    def tile_png(self, key: str, size: int = 224) -> bytes:
        from ..extract.readback import read_tiles
        with self.lock:
            tid = self.require_key(key)
            img = read_tiles(self.store, np.array([tid], dtype=np.int64), size=size)[0]
        if img is None:
            raise SourceError(f"tile {key!r} of store {self.name!r} cannot be read back from its "
                              "source (moved or deleted?)")
        return png_bytes(img)

    def thumbnail(self, slide: str) -> tuple[np.ndarray, float]:
        """(thumbnail (h, w, 3) uint8, level-0 pixels per thumbnail pixel), cached."""
        from ..extract.readback import slide_thumbnail
        self.require_slide(slide)
        with self.lock:
            if slide not in self._thumbs:
                self._thumbs[slide] = slide_thumbnail(self.store, slide, THUMBNAIL_SIZE)
                while len(self._thumbs) > _THUMB_CACHE:
                    self._thumbs.popitem(last=False)
            self._thumbs.move_to_end(slide)
            return self._thumbs[slide]

    def tile_side(self, slide: str, coords: np.ndarray) -> int:
        """A slide tile's side in level-0 pixels, as the store records it (store.geometry: the
        slide's grid.json, its unit, STORE.json, else the grid step of ``coords``)."""
        from ..store.geometry import slide_geometry
        side = slide_geometry(self.store, slide, coords[:, 0], coords[:, 1]).tile_l0
        return int(round(side)) if side else int((self.store.meta.tile or {}).get("tile_size", 224))

    def slide_info(self, slide: str) -> dict[str, Any]:
        thumb, down = self.thumbnail(slide)
        with self.lock:
            bag = self.store.slide(slide)
        return {"slide": slide, "tiles": len(bag.ids), "thumb_width": int(thumb.shape[1]),
                "thumb_height": int(thumb.shape[0]), "downsample": float(down),
                "width": int(round(thumb.shape[1] * down)), "height": int(round(thumb.shape[0] * down)),
                "tile_side": self.tile_side(slide, bag.coords)}

    def tile_at(self, slide: str, x: float, y: float) -> dict[str, Any]:
        """The slide's tile under level-0 point (x, y), else the one whose centre is nearest."""
        self.require_slide(slide)
        with self.lock:
            bag = self.store.slide(slide)
        side = self.tile_side(slide, bag.coords)
        centres = bag.coords.astype(np.float64) + side / 2.0
        j = int(np.argmin(((centres - np.array([x, y])) ** 2).sum(axis=1)))
        cx, cy = (int(v) for v in bag.coords[j])
        return {"key": bag.keys[j], "id": int(bag.ids[j]), "slide": slide, "x": cx, "y": cy,
                "side": side, "inside": bool(cx <= x < cx + side and cy <= y < cy + side)}

    def heatmap_png(self, slide: str, query: np.ndarray, alpha: float = 0.6) -> bytes:
        """The query's cosine similarity to every tile of ``slide``, rescaled to [0, 1] over the
        slide: an RGBA overlay the size of the slide's thumbnail (transparent off the tiles)."""
        from matplotlib import colormaps

        from ..index.similarity import slide_similarity
        thumb, down = self.thumbnail(slide)
        with self.lock:
            bag = self.store.slide(slide)
        scores = slide_similarity(np.asarray(bag.emb, np.float32), np.asarray(query, np.float32))
        lo, hi = float(scores.min()), float(scores.max())
        values = (scores - lo) / (hi - lo) if hi > lo else np.ones_like(scores)
        h, w = thumb.shape[:2]
        grid = np.full((h, w), np.nan, dtype=np.float32)
        side = self.tile_side(slide, bag.coords)
        for (x, y), v in zip(bag.coords, values):
            x0, y0 = int(x // down), int(y // down)
            x1, y1 = max(int(np.ceil((x + side) / down)), x0 + 1), max(int(np.ceil((y + side) / down)), y0 + 1)
            grid[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = v
        rgba = colormaps["inferno"](np.nan_to_num(grid, nan=0.0), bytes=True)
        rgba[..., 3] = np.where(np.isnan(grid), 0, int(alpha * 255)).astype(np.uint8)
        return png_bytes(rgba)


def served_stores(paths: Sequence[str | os.PathLike[str]]) -> dict[str, ServedStore]:
    """Open every store (StoreNotFoundError / NotAStoreError for a bad path) under its short name;
    the same directory given twice is served once."""
    from ..store import open_store
    unique: list[Path] = []
    for p in paths:
        if Path(p).resolve() not in [u.resolve() for u in unique]:
            unique.append(Path(p))
    if not unique:
        raise ConfigError("serve needs at least one store")
    return {name: ServedStore(name, open_store(path)) for name, path in zip(short_names(unique), unique)}

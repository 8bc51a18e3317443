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
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, SourceError, UnknownKeyError
from ..index.similarity import rescale
from ..plots import paint_tiles
from .overlay import overlay_rgba
from .predictions import PredictionFile, StoreHeads
from .slides import SlideReaders

if TYPE_CHECKING:
    from ..backbones.backbone import Backbone
    from ..heads import TrainedHead
    from ..store import Bag, Store

__all__ = ["ServedStore", "served_stores", "short_names", "png_bytes", "MAX_IMAGE_PIXELS"]

MAX_IMAGE_PIXELS = 64_000_000      # an uploaded query image larger than this is refused
THUMBNAIL_SIZE = 1024               # longest side of a slide thumbnail, in pixels
_THUMB_CACHE = 32                   # thumbnails kept per store
_BAG_CACHE = 32                     # slides' tiles (keys, ids, coords, embeddings) kept per store
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
    """One store opened for serving. Store reads go through one lock (LMDB read transactions
    are not shared across threads); DeepZoom tiles through one lock per open slide
    (``SlideReaders``); the image embedder is built on first use. ``heads``: the heads served
    with this store (name -> head trained in its space); ``predictions``: predictions files
    naming its slides (name -> file)."""

    def __init__(self, name: str, store: Store, heads: Mapping[str, TrainedHead] | None = None,
                 predictions: Mapping[str, PredictionFile] | None = None) -> None:
        self.name, self.store = name, store
        self.lock = threading.RLock()
        self._backbone: Backbone | None = None
        self._slides: list[str] | None = None
        self._slide_set: frozenset[str] = frozenset()
        self._thumbs: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self._thumb_png: OrderedDict[str, bytes] = OrderedDict()
        self._bags: OrderedDict[str, tuple[Bag, int]] = OrderedDict()
        self.readers = SlideReaders(self._slide_file)
        self.heads = StoreHeads(heads or {}, predictions)

    # -- what the store holds ------------------------------------------------------------
    @property
    def is_slides(self) -> bool:
        return (self.store.meta.tile or {}).get("kind") == "slides"

    def summary(self) -> dict[str, Any]:
        backbone = self.store.meta.backbone or {}
        return {"name": self.name, "rows": len(self.store), "dim": self.store.dim,
                "backbone": backbone.get("name"), "kind": (self.store.meta.tile or {}).get("kind"),
                "slides": len(self.slides()), "heads": self.heads.listing()}

    def slides(self) -> list[str]:
        with self.lock:
            if self._slides is None:
                self._slides = self.store.slides()
                self._slide_set = frozenset(self._slides)
            return self._slides

    def require_slide(self, slide: str) -> str:
        self.slides()
        if slide not in self._slide_set:
            raise UnknownKeyError(f"slide {slide!r} is not in store {self.name!r}; "
                                  f"GET /api/{self.name}/slides lists its slides")
        return slide

    def bag(self, slide: str) -> tuple[Bag, int]:
        """(the slide's live tiles: keys, ids, coords, emb; their level-0 side), cached."""
        self.require_slide(slide)
        with self.lock:
            hit = self._bags.get(slide)
            if hit is None:
                bag = self.store.slide(slide)
                hit = self._bags[slide] = (bag, self.tile_side(slide, bag.coords))
                while len(self._bags) > _BAG_CACHE:
                    self._bags.popitem(last=False)
            self._bags.move_to_end(slide)
            return hit

    def _slide_file(self, slide: str) -> Path:
        from ..extract.readback import slide_path
        self.require_slide(slide)
        with self.lock:
            return slide_path(self.store, slide)

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
        """An uploaded image file's bytes -> (dim,) float32 with the store's own backbone; the
        image is decoded once, resized to the store's tile size as ``backbones.images.read_rgb``."""
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise SourceError(f"the uploaded image is {w}x{h} pixels, more than "
                                      f"{MAX_IMAGE_PIXELS:,}; send a tile-sized image")
                img = im.convert("RGB")
        except SourceError:
            raise
        except Exception as exc:        # PIL raises several kinds for garbage
            raise SourceError(f"the upload is not a readable image ({' '.join(str(exc).split())[:120]})"
                              "; send a PNG, JPEG or TIFF file") from None
        meta = self.store.meta
        size = (meta.tile or {}).get("tile_size")
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        with self.lock:
            if self._backbone is None:
                from ..backbones.images import recorded_backbone
                self._backbone = recorded_backbone(meta.backbone, meta.weights_sha256, self.name)
            return np.asarray(self._backbone.embed(np.asarray(img)[None]).numpy()[0], dtype=np.float32)

    # -- pixels --------------------------------------------------------------------------
    def tile_png(self, key: str, size: int = 224) -> bytes:
        """A tile's pixels as PNG, ``size`` px square. A slide's tile is read through the
        slide's open reader (``self.readers``), outside the store's lock: a gallery's dozen
        tile requests neither reopen the slide each nor hold up searches on the store."""
        from PIL import Image

        from ..extract.readback import read_tiles
        with self.lock:
            tid = self.require_key(key)
            m = self.store.metadata(np.array([tid], dtype=np.int64), ("slide", "x", "y"))
        slide, x, y = m["slide"][0], int(m["x"][0]), int(m["y"][0])
        img: np.ndarray | None
        if self.is_slides and slide and x >= 0:
            side = self.bag(slide)[1]
            try:
                region = self.readers.region(slide, x, y, side)
            except Exception:   # noqa: BLE001 - the slide moved, or cannot be decoded there
                region = None
            img = None if region is None else np.asarray(
                Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR))
        else:
            with self.lock:
                img = read_tiles(self.store, np.array([tid], dtype=np.int64), size=size)[0]
        if img is None:
            raise SourceError(f"tile {key!r} of store {self.name!r} cannot be read back from its "
                              "source (moved or deleted?)")
        return png_bytes(img)

    def thumbnail(self, slide: str) -> tuple[np.ndarray, float]:
        """(thumbnail (h, w, 3) uint8, level-0 pixels per thumbnail pixel), cached; read through
        the slide's open reader, not under the store's lock."""
        self.require_slide(slide)
        with self.lock:
            hit = self._thumbs.get(slide)
            if hit is not None:
                self._thumbs.move_to_end(slide)
                return hit
        hit = self.readers.thumbnail(slide, THUMBNAIL_SIZE)
        with self.lock:
            self._thumbs[slide] = hit
            while len(self._thumbs) > _THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return hit

    def thumbnail_png(self, slide: str) -> bytes:
        """The thumbnail as PNG bytes, encoded once (cached like the thumbnail)."""
        thumb = self.thumbnail(slide)[0]
        with self.lock:
            data = self._thumb_png.get(slide)
        if data is None:
            data = png_bytes(thumb)
            with self.lock:
                self._thumb_png[slide] = data
                while len(self._thumb_png) > _THUMB_CACHE:
                    self._thumb_png.popitem(last=False)
        return data

    def tile_side(self, slide: str, coords: np.ndarray) -> int:
        """A slide tile's side in level-0 pixels, as the store records it (store.geometry: the
        slide's grid.json, its unit, STORE.json, else the grid step of ``coords``)."""
        from ..store.geometry import slide_geometry
        side = slide_geometry(self.store, slide, coords[:, 0], coords[:, 1]).tile_l0
        return int(round(side)) if side else int((self.store.meta.tile or {}).get("tile_size", 224))

    def slide_info(self, slide: str) -> dict[str, Any]:
        thumb, down = self.thumbnail(slide)
        bag, side = self.bag(slide)
        dz = self.readers.get(slide).dz
        return {"slide": slide, "tiles": len(bag.ids), "thumb_width": int(thumb.shape[1]),
                "thumb_height": int(thumb.shape[0]), "downsample": float(down),
                "width": dz.width, "height": dz.height, "tile_side": side}

    def tile_at(self, slide: str, x: float, y: float) -> dict[str, Any]:
        """The slide's tile under level-0 point (x, y), else the one whose centre is nearest."""
        bag, side = self.bag(slide)
        centres = bag.coords.astype(np.float64) + side / 2.0
        j = int(np.argmin(((centres - np.array([x, y])) ** 2).sum(axis=1)))
        cx, cy = (int(v) for v in bag.coords[j])
        return {"key": bag.keys[j], "id": int(bag.ids[j]), "slide": slide, "x": cx, "y": cy,
                "side": side, "inside": bool(cx <= x < cx + side and cy <= y < cy + side)}

    def _overlay_png(self, slide: str, values: np.ndarray, cmap: str, alpha: float) -> bytes:
        thumb, down = self.thumbnail(slide)
        bag, side = self.bag(slide)
        grid = paint_tiles(thumb.shape[:2], down, bag.coords, side, values)
        return png_bytes(overlay_rgba(grid, cmap, alpha))

    def heatmap_png(self, slide: str, query: np.ndarray, alpha: float = 0.6) -> bytes:
        """The query's cosine similarity to every tile of ``slide``, rescaled to [0, 1] over the
        slide: an RGBA overlay the size of the slide's thumbnail (transparent off the tiles)."""
        from ..index.similarity import slide_similarity
        bag, _ = self.bag(slide)
        with self.lock:
            emb = np.asarray(bag.emb, np.float32)
        values, _, _ = rescale(slide_similarity(emb, np.asarray(query, np.float32)))
        return self._overlay_png(slide, values, "inferno", alpha)

    def prediction_png(self, slide: str, head: str, cls: str | None = None, alpha: float = 0.6) -> bytes:
        """The probability of class ``cls`` (default: the head's positive or last class) under
        head or predictions file ``head`` on every tile of ``slide``, on [0, 1]: an overlay like
        ``heatmap_png``."""
        self.heads.class_index(head, cls, self.name)          # 404 before any reading
        bag, side = self.bag(slide)
        with self.lock:
            emb = np.asarray(bag.emb, np.float32) if head in self.heads.heads else bag.emb[:0]
        coords, values = self.heads.values(head, cls, slide, bag.coords, emb, self.name)
        thumb, down = self.thumbnail(slide)
        grid = paint_tiles(thumb.shape[:2], down, coords, side, values)
        return png_bytes(overlay_rgba(grid, "viridis", alpha))

    def dz_tile_jpeg(self, slide: str, level: int, col: int, row: int) -> bytes:
        """DeepZoom tile (``col``, ``row``) of ``level`` (JPEG); UnknownKeyError out of range."""
        self.require_slide(slide)
        return self.readers.dz_jpeg(slide, level, col, row)

    def dzi_xml(self, slide: str) -> str:
        self.require_slide(slide)
        return self.readers.get(slide).dz.dzi_xml()


def served_stores(paths: Sequence[str | os.PathLike[str]], heads: Sequence[str | os.PathLike[str]] = (),
                  predictions: Sequence[str | os.PathLike[str]] = ()) -> dict[str, ServedStore]:
    """Open every store (StoreNotFoundError / NotAStoreError for a bad path) under its short name,
    with the ``heads`` (directories) trained in its space and the ``predictions`` files naming its
    slides; the same directory given twice is served once; a head or file that fits no store is
    refused (ConfigError)."""
    from ..store import open_store
    from .predictions import fitting_files, fitting_heads, load_heads
    unique: list[Path] = []
    for p in paths:
        if Path(p).resolve() not in [u.resolve() for u in unique]:
            unique.append(Path(p))
    if not unique:
        raise ConfigError("serve needs at least one store")
    opened = {name: open_store(path) for name, path in zip(short_names(unique), unique)}
    loaded, files = load_heads(heads, predictions)
    fit_heads = fitting_heads(loaded, {n: st.fingerprint() for n, st in opened.items()}) if loaded else {}
    fit_files = fitting_files(files, {n: st.slides() for n, st in opened.items()}) if files else {}
    return {name: ServedStore(name, st, fit_heads.get(name), fit_files.get(name)) for name, st in opened.items()}

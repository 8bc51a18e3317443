"""DeepZoom tiles of a slide: the pyramid geometry (pure) and reading one tile from a
:class:`~embedstore.extract.wsi.SlideReader`, so TIFF and OpenSlide slides serve alike.

The geometry follows the DeepZoom image format as OpenSeadragon reads it (and as openslide's
``DeepZoomGenerator`` lays it out, without ``limit_bounds``): level ``L`` of ``L_max + 1`` is the
slide at ``2 ** (L_max - L)`` x level 0, its sides halved (rounded up) from level 0 down to 1x1,
so ``L_max = ceil(log2(max side))``. A level is cut into ``tile_size`` squares; each tile also
carries ``overlap`` pixels of its neighbours on every side that has one. A tile is read from the
coarsest slide level that is at least as fine (``wsi.best_level``, no tolerance) and resized to its DeepZoom
size when that level is not exactly the right scale.

    dz = DeepZoom.of(reader)                      # tile_size 254, overlap 1
    dz.dzi_xml()                                  # the .dzi descriptor
    img = read_dz_tile(reader, dz, dz.max_level, 0, 0)   # (h, w, 3) uint8, h, w <= 256
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UnknownKeyError

if TYPE_CHECKING:
    from ..extract.wsi import SlideReader

__all__ = ["DeepZoom", "TileRegion", "read_dz_tile", "jpeg_bytes", "TILE_SIZE", "OVERLAP"]

TILE_SIZE = 254            # DeepZoom tile side without overlap (254 + 2 = 256 with it)
OVERLAP = 1                # pixels each tile shares with each neighbour
DZI_NS = "http://schemas.microsoft.com/deepzoom/2008"


@dataclass(frozen=True)
class TileRegion:
    """Where one DeepZoom tile comes from and how large it is served."""
    slide_level: int       # the slide's pyramid level read
    x0: int                # level-0 left edge of the region read
    y0: int                # level-0 top edge
    width: int             # pixels read at ``slide_level``
    height: int
    out_width: int         # pixels of the served tile (overlap included)
    out_height: int


@dataclass(frozen=True)
class DeepZoom:
    """The DeepZoom pyramid over a slide of level-0 ``width`` x ``height``."""
    width: int                                  # level-0 pixels
    height: int
    level_dimensions: tuple[tuple[int, int], ...]   # the slide's own levels, (w, h) each
    level_downsamples: tuple[float, ...]            # their downsamples from level 0
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    @classmethod
    def of(cls, reader: SlideReader, tile_size: int = TILE_SIZE, overlap: int = OVERLAP) -> DeepZoom:
        w, h = reader.dimensions
        return cls(int(w), int(h), tuple((int(a), int(b)) for a, b in reader.level_dimensions),
                   tuple(float(d) for d in reader.level_downsamples), tile_size, overlap)

    @cached_property
    def dimensions(self) -> tuple[tuple[int, int], ...]:
        """(w, h) of every DeepZoom level, 1x1 first, level 0 of the slide last."""
        size = (max(1, self.width), max(1, self.height))
        sizes = [size]
        while size[0] > 1 or size[1] > 1:
            size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
            sizes.append(size)
        return tuple(reversed(sizes))

    @property
    def level_count(self) -> int:
        return len(self.dimensions)

    @property
    def max_level(self) -> int:
        """The full-resolution level: ceil(log2(max side))."""
        return self.level_count - 1

    def tiles(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at DeepZoom ``level``."""
        w, h = self.dimensions[self._level(level)]
        return math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of DeepZoom ``level``."""
        return float(2 ** (self.max_level - self._level(level)))

    def _level(self, level: int) -> int:
        if not 0 <= level < self.level_count:
            raise UnknownKeyError(f"DeepZoom level {level} is out of range 0..{self.max_level}")
        return level

    def slide_level(self, level: int) -> int:
        """The coarsest slide level at least as fine as DeepZoom ``level`` (never upscaled, as
        OpenSlide's ``get_best_level_for_downsample``)."""
        from ..extract.wsi.grid import best_level
        return best_level(list(self.level_downsamples), self.downsample(level), tolerance=0.0)

    def region(self, level: int, col: int, row: int) -> TileRegion:
        """Where tile (``col``, ``row``) of ``level`` is read; UnknownKeyError when out of range."""
        cols, rows = self.tiles(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise UnknownKeyError(f"DeepZoom tile {col}_{row} is outside level {level} "
                                  f"({cols} x {rows} tiles)")
        zw, zh = self.dimensions[level]
        t, o = self.tile_size, self.overlap
        left, top = o * (col > 0), o * (row > 0)                  # overlap only towards neighbours
        right, bottom = o * (col < cols - 1), o * (row < rows - 1)
        zx, zy = col * t - left, row * t - top                    # tile corner at this level
        out_w = min(t, zw - col * t) + left + right
        out_h = min(t, zh - row * t) + top + bottom
        sl = self.slide_level(level)
        ds_slide = self.level_downsamples[sl]
        scale = self.downsample(level) / ds_slide                 # slide-level px per DeepZoom px
        lx, ly = scale * zx, scale * zy                           # corner at the slide level
        lw_max, lh_max = self.level_dimensions[sl]
        width = max(1, min(math.ceil(scale * out_w), lw_max - math.ceil(lx)))
        height = max(1, min(math.ceil(scale * out_h), lh_max - math.ceil(ly)))
        return TileRegion(sl, int(ds_slide * lx), int(ds_slide * ly), int(width), int(height),
                          int(out_w), int(out_h))

    def dzi_xml(self, fmt: str = "jpeg") -> str:
        """The DZI descriptor OpenSeadragon opens (tiles at ``<name>_files/<level>/<col>_<row>.<fmt>``)."""
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="{DZI_NS}" Format="{fmt}" Overlap="{self.overlap}" '
                f'TileSize="{self.tile_size}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n')


def read_dz_tile(reader: SlideReader, dz: DeepZoom, level: int, col: int, row: int) -> np.ndarray:
    """Tile (``col``, ``row``) of DeepZoom ``level``: (out_height, out_width, 3) uint8 RGB."""
    from PIL import Image
    r = dz.region(level, col, row)
    img = reader.read_region(r.x0, r.y0, r.slide_level, r.width, r.height)
    if img.shape[:2] != (r.out_height, r.out_width):
        img = np.asarray(Image.fromarray(img).resize((r.out_width, r.out_height), Image.Resampling.LANCZOS))
    return img


def jpeg_bytes(img: np.ndarray, quality: int = 80) -> bytes:
    """(h, w, 3) uint8 -> JPEG file bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()

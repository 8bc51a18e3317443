"""Opening a slide: ``SlideReader`` picks the backend (tifffile or OpenSlide) and reads regions.

Choice. Aperio SVS files are read with tifffile (the same pixels as OpenSlide, within JPEG
rounding, much cheaper per tile), other formats with OpenSlide when it can and tifffile
otherwise; for a generic TIFF it takes tifffile when tifffile sees more pyramid levels
(OME-TIFF keeps its pyramid in SubIFDs, which OpenSlide does not read).

Processes. A reader is not fork-safe (OpenSlide handles, shared file offsets). Open it after the
fork: a pickled ``SlideReader`` carries its path only and opens itself lazily on first use, and a
reader used in a process other than the one that opened it reopens itself (the inherited handle
is left alone, never closed, in the child). DataLoader workers should therefore receive readers
(or paths) and keep one reader per slide per worker.
"""
from __future__ import annotations

import math
import os
from typing import Any, Protocol

import numpy as np

from embedstore.errors import SlideError

from .grid import best_level
from .openslide import OpenSlideBackend
from .tiff import TiffBackend, mpp_via_tifffile

__all__ = ["SlideReader", "SlideBackend", "open_backend"]

_RENDER_BLOCK = 4096        # level px a side read at once by SlideReader.render
_ABANDONED: list[Any] = []   # handles inherited through fork: kept alive, never closed


class SlideBackend(Protocol):
    """What a reader backend offers (``TiffBackend``, ``OpenSlideBackend``)."""
    name: str
    vendor: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None

    def read(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray: ...
    def associated_size(self, name: str) -> tuple[int, int] | None: ...
    def associated(self, name: str) -> np.ndarray: ...
    def close(self) -> None: ...


def open_backend(path: str, backend: str, cache_mb: float) -> SlideBackend:
    """The backend that reads ``path`` best (see the module notes); ``backend`` forces one."""
    if not os.path.isfile(path):
        raise SlideError(f"slide not found: {path}")
    problems: list[str] = []
    if backend == "auto" and path.lower().endswith(".svs"):
        try:  # Aperio: tifffile reads the same tiles, faster (see module notes)
            tfb = TiffBackend(path, cache_mb)
        except Exception as e:  # an unusual layout: OpenSlide below, tifffile not again
            problems.append("tifffile: " + " ".join(str(e).split()))
        else:
            if tfb.vendor == "aperio":
                return tfb
            tfb.close()
    if backend in ("auto", "openslide"):
        try:
            osb = OpenSlideBackend(path)
        except Exception as e:  # unsupported format, missing library
            if backend == "openslide":
                raise SlideError(f"OpenSlide cannot open slide {path}: {e}") from e
            problems.append("openslide: " + " ".join(str(e).split()))
        else:
            if backend == "openslide" or osb.vendor != "generic-tiff":
                return osb
            try:  # a generic TIFF may keep its pyramid where OpenSlide does not look
                tfb = TiffBackend(path, cache_mb)
            except Exception:
                return osb
            if (len(tfb.level_dimensions) > len(osb.level_dimensions)
                    and tfb.level_dimensions[0] == osb.level_dimensions[0]):
                osb.close()
                return tfb
            tfb.close()
            return osb
    if any(p.startswith("tifffile: ") for p in problems):
        raise SlideError(f"cannot open slide {path}: " + "; ".join(problems))
    try:
        return TiffBackend(path, cache_mb)
    except SlideError:
        raise
    except Exception as e:
        problems.append("tifffile: " + " ".join(str(e).split()))
    raise SlideError(f"cannot open slide {path}: " + "; ".join(problems))


class SlideReader:
    """A whole-slide image opened with OpenSlide or tifffile (``backend``: auto, openslide,
    tifffile). Pickles as its path; opens lazily and again after a fork (see module notes)."""

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto",
                 cache_mb: float = 64.0) -> None:
        if backend not in ("auto", "openslide", "tifffile"):
            raise SlideError(f"unknown slide backend {backend!r}; use auto, openslide or tifffile")
        self.path = os.fspath(path)
        self._backend_name = backend
        self._cache_mb = cache_mb
        self._impl: SlideBackend | None = None
        self._pid = -1
        self._mpp: float | None = None
        self._b()  # open now so a bad slide fails where it is named

    def _b(self) -> SlideBackend:
        if self._impl is not None and self._pid == os.getpid():
            return self._impl
        if self._impl is not None:  # inherited through fork: do not touch the parent's handle
            _ABANDONED.append(self._impl)
        impl = self._impl = open_backend(self.path, self._backend_name, self._cache_mb)
        self._pid = os.getpid()
        self._mpp = impl.mpp
        if self._mpp is None and impl.name == "openslide":
            self._mpp = mpp_via_tifffile(self.path)
        return impl

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "backend": self._backend_name, "cache_mb": self._cache_mb}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._backend_name = state["path"], state["backend"]
        self._cache_mb, self._impl, self._pid, self._mpp = state["cache_mb"], None, -1, None

    @property
    def backend(self) -> str:
        """'openslide' or 'tifffile'."""
        return str(self._b().name)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self._b().level_dimensions[0]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._b().level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._b().level_downsamples)

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel (x) from the metadata, or None when absent."""
        self._b()
        return self._mpp

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB at ``level``, top-left at level-0 (x0, y0); white outside."""
        b = self._b()
        if not 0 <= level < len(b.level_dimensions) or w < 1 or h < 1:
            raise SlideError(f"slide {self.path}: bad region level={level} size={w}x{h}")
        return b.read(int(x0), int(y0), int(level), int(w), int(h))

    def render(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample`` x level 0: (round(H/ds), round(W/ds), 3) uint8.

        Read from the best level in blocks of at most 4096 level px a side, so a slide with a
        missing pyramid never needs a full level in memory.
        """
        from PIL import Image
        W, H = self.dimensions
        ow, oh = max(1, round(W / downsample)), max(1, round(H / downsample))
        level = best_level(self.level_downsamples, downsample)
        dsl = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        sx, sy = W / ow, H / oh
        step = max(1, int(_RENDER_BLOCK * dsl / max(sx, sy)))
        out = np.empty((oh, ow, 3), np.uint8)
        for oy0 in range(0, oh, step):
            oy1 = min(oh, oy0 + step)
            ly0, ly1 = int(oy0 * sy / dsl), min(lh, math.ceil(oy1 * sy / dsl))
            for ox0 in range(0, ow, step):
                ox1 = min(ow, ox0 + step)
                lx0, lx1 = int(ox0 * sx / dsl), min(lw, math.ceil(ox1 * sx / dsl))
                block = self.read_region(round(lx0 * dsl), round(ly0 * dsl), level,
                                         max(1, lx1 - lx0), max(1, ly1 - ly0))
                if block.shape[:2] != (oy1 - oy0, ox1 - ox0):
                    block = np.asarray(Image.fromarray(block).resize(
                        (ox1 - ox0, oy1 - oy0), Image.Resampling.LANCZOS))
                out[oy0:oy1, ox0:ox1] = block
        return out

    def thumbnail(self, max_size: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB, longest side ``max_size`` (never upsampled)."""
        return self.overview(max(1.0, max(self.dimensions) / max_size))

    def overview(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample``, as ``render`` but from the cheapest faithful source:
        the scanner's associated ``thumbnail`` image (Aperio, Hamamatsu, ...) when it shows the
        same field (aspect within 1%), is at least as fine as asked and coarser than the level
        ``render`` would read. A pyramid-less slide then costs a small JPEG, not its full level 0
        (CMU-1-Small-Region: 0.01 s instead of 0.4 s). For masks and pictures; tiles use levels."""
        b = self._b()
        size = b.associated_size("thumbnail") if hasattr(b, "associated_size") else None
        W, H = self.dimensions
        ow, oh = max(1, round(W / downsample)), max(1, round(H / downsample))
        if size is not None and min(size) > 0:
            tw, th = size
            ds_thumb = (W / tw + H / th) / 2
            same_field = abs((tw / th) / (W / H) - 1.0) <= 0.01
            level_ds = self.level_downsamples[best_level(self.level_downsamples, downsample)]
            if same_field and level_ds < ds_thumb <= downsample * 1.01:
                from PIL import Image
                img = b.associated("thumbnail")
                if img.shape[:2] != (oh, ow):   # bilinear is enough for a tissue mask
                    img = np.asarray(Image.fromarray(img).resize((ow, oh), Image.Resampling.BILINEAR))
                return img
        return self.render(downsample)

    def close(self) -> None:
        if self._impl is not None and self._pid == os.getpid():
            self._impl.close()
        self._impl = None

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlideReader({self.path!r}, backend={self._backend_name!r})"

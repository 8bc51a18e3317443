"""Slides through tifffile: Aperio SVS, OME-TIFF and other pyramidal TIFFs.

The reader decodes only the TIFF tiles a region touches, keeping decoded chunks in an LRU cache
bounded in bytes; a level stored in strips is decoded whole once when it fits half of the cache,
else strip by strip. It reads the same pixels as OpenSlide (within JPEG rounding) at about a
fifth of the cost per tile, and opens in 1 ms instead of 30.

8-bit, 3-sample JPEG chunks are decoded with TurboJPEG through simplejpeg where it is installed
(the ``wsi`` extra): 147 against 201 us per 256 px tile through tifffile and imagecodecs (both
libjpeg-turbo; imagecodecs reads by scanline), the same bytes. Only where it is the same: a
level's chunks are decoded both ways until one with texture agrees, and a level where one
differs (a colour space read otherwise, a libjpeg-turbo built apart) keeps tifffile's decoder;
a chunk simplejpeg refuses, or one whose own JFIF/Adobe marker libjpeg would follow where
tifffile does not, falls back alone. ``EMBEDSTORE_FAST_JPEG=0`` turns it off.
"""
from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore.errors import SlideError

from ._pixels import MIB, plausible_mpp, to_rgb

if TYPE_CHECKING:
    from tifffile import TiffFrame, TiffPage

__all__ = ["TiffBackend", "tiff_mpp", "mpp_via_tifffile", "fast_jpeg_decoder"]

_UM_PER_UNIT = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "μm": 1.0,
                "nm": 1e-3, "Å": 1e-4}


def fast_jpeg_decoder() -> Callable[[bytes], np.ndarray] | None:
    """simplejpeg's RGB decode, or None where it is not installed or turned off."""
    if os.environ.get("EMBEDSTORE_FAST_JPEG", "1") == "0":
        return None
    try:
        import simplejpeg  # optional import (the wsi extra)
    except ImportError:
        return None

    def decode(stream: bytes) -> np.ndarray:
        arr: np.ndarray = simplejpeg.decode_jpeg(stream, colorspace="RGB")
        return arr
    return decode


_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"   # APP14, transform 0
_CHECKS = 8           # equal chunks that settle a level on the fast decoder, texture or not
_TEXTURE_STD = 8.0    # texture, per channel: glass is about 3 levels of noise, tissue 30-50


def _colour_marker(stream: bytes) -> bool:
    """Whether the segments of ``stream`` (from its SOI) before the frame header hold a JFIF
    APP0 or an Adobe APP14 marker: the ones that set how libjpeg reads a 3-component scan."""
    i = 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xDA:
            return False                      # SOFn or SOS: past the header segments
        length = int.from_bytes(stream[i + 2:i + 4], "big")
        body = stream[i + 4:i + 9]
        if (marker == 0xE0 and body.startswith(b"JFIF")) or (marker == 0xEE and body == b"Adobe"):
            return True
        i += 2 + length
    return False


def _stream_head(tables: bytes | None, rgb: bool) -> bytes | None:
    """What goes before a tile's own segments (its SOI dropped) to make one stream TurboJPEG
    reads, the same for every tile of a level: SOI, for ``rgb`` (where tifffile reads the
    samples as RGB: photometric RGB without JFIF, as Aperio writes them, untransformed and
    without a marker saying so) an Adobe APP14 marker with transform 0, so the decoder does
    not convert from YCbCr, then the level's shared tables (TIFF ``JPEGTables`` is an
    abbreviated stream, SOI tables EOI). None when the tables are not such a stream, or carry
    a colour marker of their own where ``rgb``."""
    if tables and (tables[:2] != b"\xff\xd8" or tables[-2:] != b"\xff\xd9"):
        return None
    if rgb and tables and _colour_marker(tables):
        return None
    return b"\xff\xd8" + (_ADOBE_RGB if rgb else b"") + (tables[2:-2] if tables else b"")


def _one_stream(head: bytes | None, data: bytes, rgb: bool) -> bytes | None:
    """A tile's JPEG as one stream: ``head`` (`_stream_head` of its level) and the tile from
    its SOI on. None without a head, when the tile does not start with SOI, or, where ``rgb``,
    when the tile carries its own JFIF or Adobe marker (libjpeg would follow it, tifffile
    does not)."""
    if head is None or data[:2] != b"\xff\xd8" or (rgb and _colour_marker(data)):
        return None
    return head + data[2:]


def tiff_mpp(tf: Any) -> float | None:
    """um/px of series 0 from OME PhysicalSizeX, Aperio 'MPP =', or resolution tags."""
    if tf.is_ome and tf.ome_metadata:
        import xml.etree.ElementTree as ET
        try:
            px = ET.fromstring(tf.ome_metadata).find(".//{*}Pixels")
        except ET.ParseError:
            px = None
        size_x = px.get("PhysicalSizeX") if px is not None else None
        if px is not None and size_x:
            unit = _UM_PER_UNIT.get(px.get("PhysicalSizeXUnit", "µm"))
            if unit is not None:
                return plausible_mpp(float(size_x) * unit)
    page = tf.series[0].levels[0].keyframe
    m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
    if tf.is_svs and m:
        return plausible_mpp(float(m.group(1)))
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    num, den = xres.value
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre; 1 = none
    if um_per_unit is None or num <= 0 or den <= 0:
        return None
    return plausible_mpp(um_per_unit * den / num)


class TiffBackend:
    name = "tifffile"

    def __init__(self, path: str, cache_mb: float) -> None:
        import tifffile  # optional import
        self._tf = tifffile.TiffFile(path)
        try:
            levels = self._tf.series[0].levels
            self._frames: list[TiffPage | TiffFrame] = []
            self._keys: list[TiffPage] = []
            for lv in levels:
                frame = lv.pages[0]
                if frame is None or frame.keyframe is None:
                    raise SlideError(f"slide {path}: level {len(self._frames)} of series 0 "
                                     "has no first page")
                self._frames.append(frame)
                self._keys.append(frame.keyframe)
            for k in self._keys:
                if k.dtype != np.uint8 or k.ndim not in (2, 3) or k.shaped[:2] != (1, 1):
                    raise SlideError(f"slide {path}: unsupported TIFF layout {k.shape} "
                                     f"{k.dtype} (need 8-bit, interleaved, 2-D)")
            self.level_dimensions = [(int(k.imagewidth), int(k.imagelength))
                                     for k in self._keys]
            self.mpp = tiff_mpp(self._tf)
        except BaseException:
            self._tf.close()
            raise
        w0, h0 = self.level_dimensions[0]
        self._ds_xy = [(w0 / w, h0 / h) for w, h in self.level_dimensions]
        self.level_downsamples = [(dx + dy) / 2 for dx, dy in self._ds_xy]
        self.vendor = "ome-tiff" if self._tf.is_ome else ("aperio" if self._tf.is_svs else "tiff")
        self._associated = {str(sr.name).lower(): sr for sr in self._tf.series[1:]
                            if self._tf.is_svs and sr.name}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_max = int(cache_mb * MIB)
        self._lock = threading.Lock()      # the cache
        self._io_lock = threading.Lock()   # the shared file position
        for k in self._keys:   # tifffile builds decoders lazily: built by concurrent threads
            # on first use, 1 fresh reader in ~40 gave a tile wrong bytes; build them now
            _ = k.decode
        fast = fast_jpeg_decoder()
        self._fast_decode = fast
        usable = [fast is not None and k.compression == 7 and k.bitspersample == 8
                  and k.samplesperpixel == 3 and not k.jpegheader for k in self._keys]
        # as tifffile decides, once per level from its first chunk: samples read as RGB
        self._rgb = [u and int(k.photometric) == 2 and not k.is_jfif for u, k in zip(usable, self._keys)]
        # per level, what goes before each tile's segments (None: tifffile's decoder only)
        self._head = [_stream_head(k.jpegtables, rgb) if u else None
                      for u, k, rgb in zip(usable, self._keys, self._rgb)]
        # per level: None unchecked, True same bytes as tifffile, False tifffile's decoder;
        # only ever None -> True or -> False (under the cache lock)
        self._fast: list[bool | None] = [None if h is not None else False for h in self._head]
        self._checked = [0] * len(self._keys)   # equal chunks seen while unchecked

    # cache ---------------------------------------------------------------
    def _cached(self, key: tuple[int, int], make: Callable[[], np.ndarray]) -> np.ndarray:
        """The decoded chunk ``key``; ``make`` runs outside the cache lock, so threads decode
        different chunks at once (two threads may both decode a chunk missing from the cache:
        the second result is dropped)."""
        with self._lock:
            arr = self._cache.get(key)
            if arr is not None:
                self._cache.move_to_end(key)
                return arr
        arr = make()
        with self._lock:
            old = self._cache.get(key)
            if old is not None:
                return old
            self._cache[key] = arr
            self._cache_bytes += arr.nbytes
            while self._cache_bytes > self._cache_max and len(self._cache) > 1:
                _, gone = self._cache.popitem(last=False)
                self._cache_bytes -= gone.nbytes
            return arr

    def _whole(self, level: int) -> np.ndarray:
        def make() -> np.ndarray:
            with self._io_lock:
                a = self._frames[level].asarray(maxworkers=1)
            return a[..., None] if a.ndim == 2 else a
        return self._cached((level, -1), make)

    def _chunk(self, level: int, index: int) -> np.ndarray | None:
        frame, key = self._frames[level], self._keys[level]
        nbytes = frame.databytecounts[index]
        if nbytes == 0:  # sparse TIFF: a chunk never written is background
            return None

        def make() -> np.ndarray:
            fh = self._tf.filehandle
            with self._io_lock:
                fh.seek(frame.dataoffsets[index])
                data = fh.read(nbytes)
            if self._fast[level] is not False:
                arr = self._fast_chunk(level, index, data)
                if arr is not None:
                    return arr
            return self._slow_chunk(level, index, data)
        return self._cached((level, index), make)

    def _slow_chunk(self, level: int, index: int, data: bytes) -> np.ndarray:
        key = self._keys[level]
        arr, _, shape = key.decode(data, index, jpegtables=key.jpegtables,
                                   jpegheader=key.jpegheader)
        if arr is None:
            raise SlideError(f"slide {self._tf.filename}: cannot decode chunk {index} "
                             f"of level {level}")
        out: np.ndarray = arr.reshape(shape[-3:])
        return out

    def _fast_chunk(self, level: int, index: int, data: bytes) -> np.ndarray | None:
        """The chunk through simplejpeg, or None for tifffile's decoder. Until the level is
        settled, every chunk is decoded both ways: one that differs settles it on tifffile's
        decoder; it is settled on simplejpeg by an equal chunk with texture (a flat glass
        corner, the first chunk an overview reads, cannot show rounding differences) or by
        ``_CHECKS`` equal chunks."""
        key, decode = self._keys[level], self._fast_decode
        stream = _one_stream(self._head[level], data, rgb=self._rgb[level])
        if stream is None or decode is None:
            return None
        try:
            arr = decode(stream)
        except ValueError:     # simplejpeg's error for a stream TurboJPEG will not read
            return None
        shape = (int(key.chunks[-3]), int(key.chunks[-2]), 3)
        if arr.shape != shape:   # a short last strip: tifffile knows its rows
            return None
        if self._fast[level] is not True:
            ref = self._slow_chunk(level, index, data)
            same = bool(np.array_equal(ref, arr))
            with self._lock:
                self._checked[level] += same
                if not same:
                    self._fast[level] = False
                elif self._fast[level] is None and (self._checked[level] >= _CHECKS
                                                    or float(arr.reshape(-1, 3).std(0).max()) > _TEXTURE_STD):
                    self._fast[level] = True
            return ref
        return arr

    # reading -------------------------------------------------------------
    def read(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        key = self._keys[level]
        lw, lh = self.level_dimensions[level]
        dx, dy = self._ds_xy[level]
        lx, ly = math.floor(x0 / dx + 0.5), math.floor(y0 / dy + 0.5)  # nearest pixel edge
        spp = int(key.samplesperpixel)
        out = np.full((h, w, spp), 255, np.uint8)
        ax0, ay0, ax1, ay1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if ax0 >= ax1 or ay0 >= ay1:
            return to_rgb(out)
        if not key.is_tiled and lw * lh * spp <= self._cache_max // 2:
            out[ay0 - ly:ay1 - ly, ax0 - lx:ax1 - lx] = self._whole(level)[ay0:ay1, ax0:ax1]
            return to_rgb(out)
        ch, cw = key.chunks[-3], key.chunks[-2]
        ncols = key.chunked[-2]
        for cy in range(ay0 // ch, (ay1 - 1) // ch + 1):
            for cx in range(ax0 // cw, (ax1 - 1) // cw + 1):
                chunk = self._chunk(level, cy * ncols + cx)
                if chunk is None:
                    continue
                bx0, by0 = max(ax0, cx * cw), max(ay0, cy * ch)
                bx1 = min(ax1, cx * cw + chunk.shape[1])
                by1 = min(ay1, cy * ch + chunk.shape[0])
                out[by0 - ly:by1 - ly, bx0 - lx:bx1 - lx] = \
                    chunk[by0 - cy * ch:by1 - cy * ch, bx0 - cx * cw:bx1 - cx * cw]
        return to_rgb(out)

    def associated_size(self, name: str) -> tuple[int, int] | None:
        """(width, height) of an SVS associated image (thumbnail, label, macro), else None."""
        sr = self._associated.get(name)
        return None if sr is None else (int(sr.shape[1]), int(sr.shape[0]))

    def associated(self, name: str) -> np.ndarray:
        with self._io_lock:
            a = self._associated[name].asarray(maxworkers=1)
        return to_rgb(a[..., None] if a.ndim == 2 else a)

    def close(self) -> None:
        self._tf.close()


def mpp_via_tifffile(path: str) -> float | None:
    try:
        import tifffile
        with tifffile.TiffFile(path) as tf:
            return tiff_mpp(tf)
    except Exception:  # not a TIFF, or no tifffile: no mpp from here
        return None

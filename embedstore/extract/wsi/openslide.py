"""Slides through OpenSlide: the vendor formats (NDPI, MRXS, SCN, ...) and generic TIFFs."""
from __future__ import annotations

import numpy as np

from ._pixels import plausible_mpp, to_rgb

__all__ = ["OpenSlideBackend"]


class OpenSlideBackend:
    name = "openslide"

    def __init__(self, path: str) -> None:
        import openslide  # heavy optional import (loads the C library)
        self._osr = openslide.OpenSlide(path)
        self.vendor = self._osr.properties.get("openslide.vendor", "")
        self.level_dimensions = [(int(d[0]), int(d[1])) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        mpp = self._osr.properties.get("openslide.mpp-x")
        self.mpp = plausible_mpp(float(mpp)) if mpp else None

    def read(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        img = self._osr.read_region((x0, y0), level, (w, h))
        return to_rgb(np.asarray(img))

    def associated_size(self, name: str) -> tuple[int, int] | None:
        """(width, height) of the scanner's associated image ``name`` without decoding it."""
        dims = self._osr.properties.get(f"openslide.associated.{name}.width"), \
            self._osr.properties.get(f"openslide.associated.{name}.height")
        if None in dims:
            return (self._osr.associated_images[name].size if name in self._osr.associated_images
                    else None)
        return int(dims[0]), int(dims[1])  # type: ignore[arg-type]

    def associated(self, name: str) -> np.ndarray:
        return to_rgb(np.asarray(self._osr.associated_images[name]))

    def close(self) -> None:
        self._osr.close()


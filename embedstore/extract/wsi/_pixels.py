"""Pixel and metadata helpers shared by the slide backends."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["to_rgb", "plausible_mpp", "MIB"]

MIB = 1 << 20
_MPP_RANGE = (0.02, 20.0)    # um/px outside this is metadata noise (72/300 dpi defaults)


def to_rgb(a: np.ndarray) -> np.ndarray:
    """(h, w, s) uint8 with s in 1/2/3/4 -> (h, w, 3) RGB; alpha composited on white."""
    s = a.shape[2]
    if s in (2, 4):
        rgb = a[..., :1].repeat(3, axis=2) if s == 2 else a[..., :3]
        alpha = a[..., s - 1:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        al = alpha.astype(np.uint16)
        out = (rgb.astype(np.uint16) * al + 255 * (255 - al) + 127) // 255
        return out.astype(np.uint8)
    if s == 1:
        return a.repeat(3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def plausible_mpp(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp) or not _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
        return None
    return float(mpp)


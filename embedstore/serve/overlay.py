"""Per-tile values painted as an RGBA overlay the size of a slide's thumbnail: what the
similarity and prediction heatmaps of ``embedstore serve`` send (the page lays them over the
thumbnail and over the DeepZoom viewer, which stretches them to the slide).

The grid comes from ``plots.paint_tiles`` (as the PNG heatmaps' does) and similarity is rescaled
by ``index.similarity.rescale``; the overlay is transparent off the tiles.
"""
from __future__ import annotations

import numpy as np

__all__ = ["overlay_rgba"]


def overlay_rgba(grid: np.ndarray, cmap: str = "inferno", alpha: float = 0.6) -> np.ndarray:
    """(h, w) values in [0, 1] (NaN: no tile) -> (h, w, 4) uint8, transparent at NaN."""
    from matplotlib import colormaps
    rgba = colormaps[cmap](np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0), bytes=True)
    rgba[..., 3] = np.where(np.isnan(grid), 0, int(round(alpha * 255))).astype(np.uint8)
    return np.asarray(rgba, dtype=np.uint8)

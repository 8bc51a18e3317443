"""Where on a slide is tissue like this? A query's cosine similarity to every tile of one slide,
drawn over the slide's thumbnail."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from embedstore.arrays import l2_normalise
from embedstore.plots import render_heatmap

if TYPE_CHECKING:
    from embedstore.store import Store

__all__ = ["Thumbnail", "slide_similarity", "similarity_heatmap", "rescale"]

# slide name -> (thumbnail (h, w, 3) uint8, level-0 pixels per thumbnail pixel)
Thumbnail = Callable[[str], tuple[np.ndarray, float]]


def slide_similarity(emb: np.ndarray, query: np.ndarray) -> np.ndarray:
    """emb (n, dim), query (dim,) -> (n,) float32 cosine similarity (0 for zero vectors)."""
    return (l2_normalise(emb) @ l2_normalise(query)[0]).astype(np.float32)


def rescale(scores: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(values, lo, hi)``: ``scores`` (n,) mapped to [0, 1] over their min ``lo`` .. max ``hi``
    (float32; all ones when they are flat), the scale a slide's similarity heatmap shows."""
    lo, hi = float(scores.min()), float(scores.max())
    values = (scores - lo) / (hi - lo) if hi > lo else np.ones_like(scores)
    return np.asarray(values, dtype=np.float32), lo, hi


def similarity_heatmap(store: Store, query: np.ndarray, slide: str, out: Path,
                       thumbnail: Thumbnail) -> Path:
    """Cosine similarity of ``query`` (dim,) to every tile of ``slide``, rescaled to [0, 1] over
    the slide and drawn over ``thumbnail(slide)``; writes the PNG ``out`` and returns it."""
    bag = store.slide(slide)
    scores = slide_similarity(bag.emb, query)
    values, lo, hi = rescale(scores)
    thumb, downsample = thumbnail(slide)
    return render_heatmap(thumb, downsample, bag.coords, values, out,
                          title=f"{slide}: similarity to the query (cosine {lo:.2f} .. {hi:.2f})",
                          label="similarity (min..max of the slide)")

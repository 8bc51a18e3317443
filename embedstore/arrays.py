"""Array helpers every part shares, in the glossary's names (``n, dim, k, emb, ids, scores``)."""
from __future__ import annotations

import numpy as np

__all__ = ["l2_normalise", "average_ranks"]


def l2_normalise(emb: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """``emb`` (n, dim) or (dim,), any float -> (n, dim) float32 C-contiguous copy, minus ``mean``
    (dim,) when given, each row scaled to unit L2 norm (zero rows stay zero)."""
    x = np.array(emb, dtype=np.float32, order="C", copy=True)
    if x.ndim == 1:
        x = x[None, :]
    if mean is not None:
        x -= np.asarray(mean, dtype=np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.divide(x, norm, out=x, where=norm > 0)
    return x


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (n,) as float64; tied values share the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)   # mean of first+1 .. first+count
    return ranks

"""Coarse centroids for many inverted lists, cheaply: two-level spherical k-means.

Flat k-means costs n * nlist * dim per iteration (1M-scale training on 4096 lists: tens of
TFLOP). Two levels — sqrt(nlist) clusters, then each split in proportion to its size — cost
about n * 2 * sqrt(nlist) * dim, with lists nearly as good for IVF (faiss's benchmarks use the
same idea). Vectors are L2-normalised, so centroids are kept on the unit sphere.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["two_level_centroids", "TWO_LEVEL_MIN_LISTS"]

TWO_LEVEL_MIN_LISTS = 1024       # below this, one flat k-means is cheap enough
NITER = 12


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    if k >= len(x):
        return np.ascontiguousarray(x[:k], dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=NITER, seed=seed, spherical=True,
                      min_points_per_centroid=1, max_points_per_centroid=256)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def _split(sizes: np.ndarray, total: int) -> np.ndarray:
    """Centroids per first-level cluster: proportional to size (largest remainders), at least
    one for a non-empty cluster, never more than its points."""
    share = sizes / max(1, sizes.sum()) * total
    counts = np.minimum(np.maximum(np.floor(share).astype(np.int64), (sizes > 0).astype(np.int64)),
                        sizes)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    while counts.sum() < total:
        room = order[counts[order] < sizes[order]]
        if not len(room):
            break
        counts[room[: total - counts.sum()]] += 1
    while counts.sum() > total:
        big = int(np.argmax(counts))
        counts[big] -= 1
    return counts


def two_level_centroids(x: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """x: (n, dim) float32, L2-normalised -> (nlist, dim) float32 unit centroids."""
    import faiss

    top = max(2, int(round(math.sqrt(nlist))))
    first = _kmeans(x, top, seed)
    _, assign = faiss.knn(x, first, 1, metric=faiss.METRIC_INNER_PRODUCT)
    assign = assign[:, 0]
    counts = _split(np.bincount(assign, minlength=top), nlist)
    parts = [_kmeans(x[assign == c], int(counts[c]), seed + 1 + c)
             for c in range(top) if counts[c] > 0]
    cent = np.concatenate(parts)
    if len(cent) < nlist:   # fewer points than lists: pad with duplicates (their lists stay empty)
        extra = cent[np.arange(nlist - len(cent)) % len(cent)]
        cent = np.concatenate([cent, extra])
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(cent[:nlist], dtype=np.float32)

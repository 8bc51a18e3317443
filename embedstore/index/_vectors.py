"""Small shared helpers: metrics and vector preparation."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from embedstore.arrays import l2_normalise
from embedstore.errors import DimensionMismatchError, ShapeError, VectorIndexError
from embedstore.store.protocol import StoreLike

log = logging.getLogger("embedstore.index")

METRICS = ("cosine", "ip")
SCAN_BATCH = 65536


def deleted(store: StoreLike, ids: np.ndarray) -> np.ndarray:
    """(m,) bool: ids that are tombstoned (or not live at all) in the store's snapshot.

    Uses ``store.is_deleted`` when the store has it, else a binary search in ``all_ids()``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    is_deleted = getattr(store, "is_deleted", None)
    if is_deleted is not None:
        return np.asarray(is_deleted(ids), dtype=bool)
    live = store.all_ids()
    if len(live) == 0:
        return np.ones(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(live, ids), len(live) - 1)
    return live[pos] != ids


def rows_after(store: StoreLike, batch_size: int, above_id: int = -1,
               skip: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``store.scan`` batches of the live rows with id > ``above_id`` and not in sorted ``skip``
    (the rows an index build or update adds); empty batches are left out."""
    for ids, emb in store.scan(batch_size):
        if len(ids) == 0 or ids[-1] <= above_id:
            continue
        ids = np.asarray(ids, dtype=np.int64)
        keep = ids > above_id
        if skip is not None and len(skip):
            keep &= ~np.isin(ids, skip)
        if not keep.all():
            ids, emb = ids[keep], emb[keep]
        if len(ids):
            yield ids, emb


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise VectorIndexError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def prepare(emb: np.ndarray, metric: str) -> np.ndarray:
    """(n, dim) float16|float32 -> (n, dim) float32 C-contiguous, L2-normalised for cosine.

    Works on one batch at a time; zero vectors stay zero.
    """
    if metric == "cosine":
        return l2_normalise(emb)
    x = np.array(emb, dtype=np.float32, copy=True, order="C")
    return x[None, :] if x.ndim == 1 else x


def as_queries(vectors: np.ndarray, dim: int, what: str = "query vectors") -> np.ndarray:
    """Validate user vectors: (dim,) or (nq, dim) -> (nq, dim), else one-line error."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise DimensionMismatchError(f"{what} must be (dim,) or (nq, dim) with dim {dim}, got "
                                     f"shape {tuple(np.shape(vectors))}")
    if arr.shape[1] != dim:
        raise DimensionMismatchError(
            f"{what} have dim {arr.shape[1]} (shape {tuple(arr.shape)}) but the store holds dim {dim};"
            " embed them with the store's backbone")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ShapeError(f"{what} must be numbers, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise VectorIndexError(f"{what} contain NaN or inf values; clean them before searching")
    return arr


def require_rows(store: StoreLike) -> int:
    n = len(store)
    if n == 0:
        raise VectorIndexError(f"store {store.path} holds no rows; extract tiles into it first")
    return n

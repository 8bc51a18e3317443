"""The kNN proxy task over rows that stay in the store: cross-validated fold scores past the
memory budget, with the same rule as :mod:`.knn` (cosine, ``exp(score / temperature)`` votes,
ties to the lowest class).

``knn_ram_bytes`` is what the in-RAM path holds; when that exceeds the budget, each fold reads
its rows from the memory-mapped store in blocks (``heads.stream.LazyRows``: each block read in
increasing id order):

- the training mean (``centre=True``) by one streaming pass, summed in float64;
- **index**: when the fold's normalised training rows fit half the budget, they are added to an
  exact ``IndexFlatIP`` block by block (in id order) and the test rows searched block by block;
- **blocked**: otherwise every block of test rows is compared with every chunk of training rows
  (an exact inner-product search per chunk) and a running top ``k`` is kept, equal scores going
  to the training row with the lower id.

Only exact score ties at the ``k``-th neighbour can differ from the in-RAM path (which keeps the
row it met first); votes agree to float rounding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..arrays import l2_normalise
from ..errors import SelectionError
from ..sizes import rows_per_pass
from .knn import KnnConfig, score_folds, vote

if TYPE_CHECKING:                      # heads (and torch) load only where a head is trained
    from ..heads.stream import LazyRows

__all__ = ["knn_ram_bytes", "block_rows", "streamed_votes", "streamed_fold_scores"]


def knn_ram_bytes(n: int, dim: int, itemsize: int) -> int:
    """Bytes the in-RAM fold scoring holds for ``n`` rows: the gathered rows in the store dtype,
    their float32 copy, one fold's training copy, its normalised copy and the index's copy."""
    return n * dim * (itemsize + 16)


def block_rows(budget: int, dim: int, itemsize: int) -> int:
    """Rows read at once: a block read, its float32 normalised copy and (blocked search) a
    chunk index of it fit a quarter of ``budget`` (:func:`sizes.rows_per_pass`)."""
    return rows_per_pass(budget, dim, itemsize)


def _blocks(pos: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for a in range(0, pos.size, size):
        yield pos[a:a + size]


def _read_unit(rows: LazyRows, pos: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Rows at ``pos`` (read in id order), minus ``mean``, L2-normalised float32."""
    x = rows.read(pos)
    if not np.isfinite(x).all():
        raise SelectionError(f"{rows.name} hold NaN or inf; re-extract the store")
    return l2_normalise(x, mean)


def _train_mean(rows: LazyRows, train: np.ndarray, size: int) -> np.ndarray:
    """(dim,) float32 mean of the training rows, summed in float64 one block at a time."""
    total = np.zeros(rows.dim, dtype=np.float64)
    for pos in _blocks(train, size):
        total += np.add.reduce(rows.read(pos), axis=0, dtype=np.float64)
    return (total / max(1, train.size)).astype(np.float32)


def _index_of(dim: int) -> Any:
    import faiss
    return faiss.IndexFlatIP(dim)


def _merge(best_s: np.ndarray, best_p: np.ndarray, s: np.ndarray, p: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The running top ``k`` (scores, positions) merged with a chunk's: largest scores first,
    equal scores to the lower position."""
    cs, cp = np.concatenate([best_s, s], axis=1), np.concatenate([best_p, p], axis=1)
    order = np.lexsort((cp, -cs.astype(np.float64)), axis=-1)[:, :k]
    return np.take_along_axis(cs, order, axis=1), np.take_along_axis(cp, order, axis=1)


def _search_blocked(rows: LazyRows, train: np.ndarray, q: np.ndarray, k: int,
                    mean: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, positions into train)`` of the ``k`` nearest training rows of the normalised
    queries ``q``, one chunk of ``size`` training rows at a time."""
    best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_p = np.zeros((q.shape[0], 0), dtype=np.int64)
    for a in range(0, train.size, size):
        index = _index_of(rows.dim)
        index.add(_read_unit(rows, train[a:a + size], mean))
        s, p = index.search(q, min(k, index.ntotal))
        best_s, best_p = _merge(best_s, best_p, s, p + a, k)
    return best_s, best_p


def streamed_votes(rows: LazyRows, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                   config: KnnConfig, n_classes: int, budget: int) -> np.ndarray:
    """(len(test), n_classes) float64 votes of the rows at positions ``test`` by their ``k``
    nearest among the rows at positions ``train`` (``rows``: the proxy's rows in the store,
    ``y``: (n,) int class of each), holding about ``budget`` bytes at a time."""
    if config.k > train.size:
        raise SelectionError(f"k={config.k} is larger than the {train.size} training rows; "
                             f"use a smaller --k")
    item = np.dtype(rows.dtype).itemsize
    size = block_rows(budget, rows.dim, item)
    train = train[np.argsort(rows.ids[train], kind="stable")]          # read in id order
    mean = _train_mean(rows, train, size) if config.centre else None
    y_train = np.asarray(y, dtype=np.int64)[train]
    out = np.empty((test.size, n_classes), dtype=np.float64)
    index = None
    if train.size * rows.dim * 4 <= budget // 2:                       # the index fits
        index = _index_of(rows.dim)
        for pos in _blocks(train, size):
            index.add(_read_unit(rows, pos, mean))
    for a in range(0, test.size, size):
        q = _read_unit(rows, test[a:a + size], mean)
        if index is not None:
            scores, nn = index.search(q, config.k)
        else:
            scores, nn = _search_blocked(rows, train, q, config.k, mean, size)
        out[a:a + q.shape[0]] = vote(scores, y_train[nn], n_classes, config.temperature)
    return out


def streamed_fold_scores(rows: LazyRows, y: np.ndarray, fold: np.ndarray, config: KnnConfig,
                         metric: str = "balanced_accuracy", n_classes: int | None = None,
                         budget: int = 1 << 30) -> tuple[np.ndarray, float]:
    """:func:`.knn.fold_scores` over rows read from the store (``rows[i]`` has class ``y[i]``
    and fold ``fold[i]``), holding about ``budget`` bytes at a time. ``(scores, seconds)``."""
    y = np.asarray(y, dtype=np.int64)
    return score_folds(y, fold, metric, n_classes, lambda train, test, c: np.argmax(
        streamed_votes(rows, y, train, test, config, c, budget), axis=1))

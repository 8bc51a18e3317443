"""Shared steps of building an index: the empty faiss index for a plan, rows gathered by id,
the held-out queries, and training (flat or two-level k-means for the lists, then codes)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedstore.index._kmeans import TWO_LEVEL_MIN_LISTS, two_level_centroids
from embedstore.index._vectors import prepare
from embedstore.index.choose import QUANTIZER_EF_SEARCH, IndexPlan
from embedstore.store.protocol import StoreLike

__all__ = ["new_index", "gather_rows", "HeldOut", "held_out_queries", "train", "random_ids"]

PQ_TRAIN_NITER = 10              # k-means iterations per PQ sub-quantizer (faiss default 25)
PQ_TRAIN_POINTS = 64             # points per PQ centroid (faiss default 256): ~10x faster, and
                                 # exact re-ranking absorbs the small loss in code quality
HELD_OUT_SHARE = 10              # at most one row in this many is held out
HELD_ROWS_PER_QUERY = 50         # whole slides held out: at most this many rows per query
HELD_MIN_SLIDES = 10             # a store of fewer slides holds out random rows instead
HELD_MAX_SKIPS = 32              # slides in a row too large to hold out: stop looking


def new_index(plan: IndexPlan) -> Any:
    import faiss

    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind in ("flat", "hnsw"):   # IVF holds ids in its lists; the others need a map
        return faiss.IndexIDMap(index)
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):        # list assignment while adding rows uses this too
        quantizer.hnsw.efSearch = QUANTIZER_EF_SEARCH
    if plan.kind == "ivf-pq":
        ivf.pq.cp.niter = PQ_TRAIN_NITER
        ivf.pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS
    return index


def random_ids(ids: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` of ``ids`` drawn without replacement by a seeded generator, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(ids[rng.choice(len(ids), size=min(size, len(ids)), replace=False)])


def gather_rows(store: StoreLike, ids: np.ndarray, metric: str, batch_size: int) -> np.ndarray:
    """(len(ids), dim) float32 prepared rows, converted batch by batch."""
    out = np.empty((len(ids), store.dim), dtype=np.float32)
    for s in range(0, len(ids), batch_size):
        out[s:s + batch_size] = prepare(store.gather(ids[s:s + batch_size]), metric)
    return out


@dataclass
class HeldOut:
    """The rows every measurement leaves out of the index it measures, and the queries drawn
    from them: ``qids`` (nq,) sorted ids, ``q`` (nq, dim) float32 prepared, ``rows`` sorted ids
    of every row left out (``qids`` itself, or every row of the held-out slides)."""
    qids: np.ndarray
    q: np.ndarray
    rows: np.ndarray
    slides: int = 0                  # slides held out whole (0: random rows)

    def batches(self, store: StoreLike, metric: str, batch_size: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, prepared rows) of every held-out row, batch by batch: what joins the index
        once it was measured."""
        if self.rows is self.qids:
            yield self.qids, self.q
            return
        for s in range(0, len(self.rows), batch_size):
            ids = self.rows[s:s + batch_size]
            yield ids, gather_rows(store, ids, metric, batch_size)


def held_out_queries(store: StoreLike, n_queries: int, seed: int, metric: str) -> HeldOut:
    """Seeded stored rows that every measurement leaves out of the index it measures, nq =
    min(n_queries, n / HELD_OUT_SHARE) (>= 1) queries among them.

    Where the store has slides, whole slides are held out (``_held_slides``) and the queries
    drawn from their rows: a tile's neighbours on its own slide (overlapping and adjacent
    tiles, its stored views) are near-copies of it, and a query whose near-copies are in the
    index finds its neighbours more easily than a tile of a slide the archive does not hold,
    so random rows overstate the recall new slides get (bench_index's pcam set, HNSW at
    efSearch 16: 0.98 on held-out stored rows, 0.93 on tiles of other slides). Else seeded
    random rows."""
    all_ids = store.all_ids()
    nq = max(1, min(n_queries, len(all_ids) // HELD_OUT_SHARE))
    rows, slides = _held_slides(store, len(all_ids), nq, seed)
    if rows is None:
        qids = random_ids(all_ids, nq, seed + 1)
        return HeldOut(qids, prepare(store.gather(qids), metric), qids)
    qids = random_ids(rows, nq, seed + 1)
    return HeldOut(qids, prepare(store.gather(qids), metric), rows, slides)


def _held_slides(store: StoreLike, n: int, nq: int, seed: int) -> tuple[np.ndarray | None, int]:
    """(sorted ids of every row of whole slides taken in a seeded order until they hold at
    least ``HELD_ROWS_PER_QUERY * nq`` rows or ``n / HELD_OUT_SHARE``, skipping slides that
    would pass that bound (``HELD_MAX_SKIPS`` in a row end the search); the number of
    slides), or (None, 0) when the store has fewer than ``HELD_MIN_SLIDES`` slides or the
    slides taken hold fewer than ``nq`` rows."""
    slides = getattr(store, "slides", None)
    if slides is None:
        return None, 0
    try:
        names = slides()
    except (NotImplementedError, AttributeError):
        return None, 0
    if len(names) < HELD_MIN_SLIDES:
        return None, 0
    cap = min(n // HELD_OUT_SHARE, HELD_ROWS_PER_QUERY * nq)
    order = np.random.default_rng(seed + 3).permutation(len(names))
    parts: list[np.ndarray] = []
    count = skips = 0
    slide_ids = getattr(store, "slide_ids", None) or (lambda name: store.slide(name).ids)
    for i in order.tolist():
        ids = np.asarray(slide_ids(names[i]), dtype=np.int64)
        if count + len(ids) > cap:
            skips += 1
            if skips >= HELD_MAX_SKIPS:
                break
            continue
        skips = 0
        parts.append(ids)
        count += len(ids)
        if cap - count < count / len(parts) / 4:      # no room for another slide of this size
            break
    if count < nq:
        return None, 0
    return np.sort(np.concatenate(parts)), len(parts)


def train(work: Any, sample: np.ndarray, plan: IndexPlan, seed: int, on_gpu: bool,
          two_level_min: int = TWO_LEVEL_MIN_LISTS) -> None:
    """Train ``work`` (the index of ``plan``, maybe on a GPU) on ``sample`` (float32 rows).
    From ``two_level_min`` lists (CPU, no OPQ) the lists come from two-level k-means and
    ``train`` then sees a full quantizer and fits only the codes."""
    import faiss

    if not on_gpu and plan.nlist >= two_level_min and not plan.factory.startswith("OPQ"):
        ivf = faiss.extract_index_ivf(work)
        ivf.quantizer.add(two_level_centroids(sample, plan.nlist, seed))
    work.train(sample)

"""Shared steps of building an index: the empty faiss index for a plan, rows gathered by id,
the held-out queries, and training (flat or two-level k-means for the lists, then codes)."""
from __future__ import annotations

import numpy as np
from typing import Any

from embedstore.index._kmeans import TWO_LEVEL_MIN_LISTS, two_level_centroids
from embedstore.index._vectors import prepare
from embedstore.index.choose import QUANTIZER_EF_SEARCH, IndexPlan
from embedstore.store.protocol import StoreLike

__all__ = ["new_index", "gather_rows", "held_out_queries", "train", "random_ids"]

PQ_TRAIN_NITER = 10              # k-means iterations per PQ sub-quantizer (faiss default 25)
PQ_TRAIN_POINTS = 64             # points per PQ centroid (faiss default 256): ~10x faster, and
                                 # exact re-ranking absorbs the small loss in code quality
HELD_OUT_SHARE = 10              # at most one row in this many is held out as a query


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


def held_out_queries(store: StoreLike, n_queries: int, seed: int, metric: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random stored rows that every measurement leaves out of the index it measures:
    (ids (nq,), vectors (nq, dim) float32), nq = min(n_queries, n / HELD_OUT_SHARE) (>= 1)."""
    all_ids = store.all_ids()
    nq = max(1, min(n_queries, len(all_ids) // HELD_OUT_SHARE))
    qids = random_ids(all_ids, nq, seed + 1)
    return qids, prepare(store.gather(qids), metric)


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

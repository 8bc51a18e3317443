"""Build, update and measure the store's FAISS index.

Everything streams from the store: the training sample is gathered by random ids, rows are
added batch by batch (float16 -> float32, L2-normalised, per batch), and recall is measured
against an exact search that is itself a streamed scan. FAISS ids are the store's tile ids.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from embedstore.index._kmeans import TWO_LEVEL_MIN_LISTS, two_level_centroids
from embedstore.index._vectors import SCAN_BATCH, check_metric, log, prepare, require_rows
from embedstore.index.choose import QUANTIZER_EF_SEARCH, IndexPlan, parse_memory, plan_index
from embedstore.index.recall import exact_scan, tune
from embedstore.index.stored import (IndexInfo, VectorIndex, index_dir, load_index, now_iso,
                                     require_gpu, save_index, to_gpu)
from embedstore.sizes import format_bytes
from embedstore.store.protocol import StoreLike

__all__ = ["build_index", "update_index"]

RECALL_K = 10
PQ_TRAIN_NITER = 10              # k-means iterations per PQ sub-quantizer (faiss default 25)
PQ_TRAIN_POINTS = 64             # points per PQ centroid (faiss default 256): ~10x faster, and
                                 # exact re-ranking absorbs the small loss in code quality


def _new_index(plan: IndexPlan) -> Any:
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


def _training_sample(store: StoreLike, size: int, seed: int, metric: str,
                     batch_size: int) -> np.ndarray:
    """(size, dim) float32 rows gathered by seeded random ids, converted batch by batch."""
    all_ids = store.all_ids()
    rng = np.random.default_rng(seed)
    pick = np.sort(all_ids[rng.choice(len(all_ids), size=size, replace=False)])
    sample = np.empty((size, store.dim), dtype=np.float32)
    for s in range(0, size, batch_size):
        sample[s:s + batch_size] = prepare(store.gather(pick[s:s + batch_size]), metric)
    return sample


def _query_sample(store: StoreLike, n_queries: int, seed: int, metric: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Held-out queries: seeded random stored rows -> (ids (nq,), vectors (nq, dim) float32)."""
    all_ids = store.all_ids()
    rng = np.random.default_rng(seed + 1)
    nq = min(n_queries, len(all_ids))
    qids = np.sort(all_ids[rng.choice(len(all_ids), size=nq, replace=False)])
    return qids, prepare(store.gather(qids), metric)


def _without_self(ids: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    """(nq, m) ids -> (nq, k): each query's own row removed, so a stored query is scored like
    a new one (its own row would otherwise be a free hit in every top-k)."""
    keep = ids != qids[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1)


def _add_rows(index: Any, store: StoreLike, metric: str, batch_size: int,
              above_id: int = -1) -> tuple[int, int]:
    """Add every live row with id > above_id; returns (rows added, largest id seen)."""
    added, max_id = 0, above_id
    for ids, emb in store.scan(batch_size):
        if len(ids) == 0 or ids[-1] <= above_id:
            continue
        ids = np.asarray(ids, dtype=np.int64)
        if ids[0] <= above_id:
            keep = ids > above_id
            ids, emb = ids[keep], emb[keep]
        index.add_with_ids(prepare(emb, metric), ids)
        added += len(ids)
        max_id = max(max_id, int(ids[-1]))
    return added, max_id


def _train_and_fill(store: StoreLike, plan: IndexPlan, metric: str, seed: int, gpu: bool,
                    batch_size: int) -> tuple[Any, int, int]:
    import faiss

    index = _new_index(plan)
    work, res = index, None
    if gpu and plan.kind != "hnsw":
        work, res = to_gpu(index, plan.kind)
    elif gpu:
        log.warning("faiss has no GPU HNSW; building %s on CPU", plan.factory)
    if plan.needs_training:
        t0 = time.perf_counter()
        sample = _training_sample(store, plan.train_size, seed, metric, batch_size)
        if res is None and plan.nlist >= TWO_LEVEL_MIN_LISTS and not plan.factory.startswith("OPQ"):
            # lists from two-level k-means; train() then sees a full quantizer and fits only codes
            ivf = faiss.extract_index_ivf(work)
            ivf.quantizer.add(two_level_centroids(sample, plan.nlist, seed))
        work.train(sample)
        del sample
        log.info("trained %s on %d sampled rows in %.1fs", plan.factory, plan.train_size,
                 time.perf_counter() - t0)
    added, max_id = _add_rows(work, store, metric, batch_size)
    if res is not None:
        index = faiss.index_gpu_to_cpu(work)
    return index, added, max_id


def build_index(store: StoreLike, kind: str = "auto", memory_budget: str | int = "8G",
                target_recall: float = 0.95, gpu: bool = False, metric: str = "cosine",
                seed: int = 0, *, n_queries: int = 1000,
                batch_size: int = SCAN_BATCH) -> IndexInfo:
    """Plan, train, fill, tune and save the index of ``store`` under ``store.path/index``.

    Recall@10 against exact search is measured on ``n_queries`` seeded stored rows (each
    query's own row left out of both lists, so the figure holds for new queries), and the
    search parameter (nprobe / efSearch, and re-rank depth for IVF-PQ) is the cheapest that met
    ``target_recall`` in an increasing sweep; every point tried is kept in ``info.curve``.
    """
    check_metric(metric)
    n = require_rows(store)
    if gpu:
        require_gpu()
    plan = plan_index(n, store.dim, parse_memory(memory_budget), target_recall, kind)
    log.info("index plan for %d x %d: %s (~%s): %s", n, store.dim, plan.factory,
             format_bytes(plan.memory_bytes), plan.reason)
    committed = int(store.n_rows_committed)
    t0 = time.perf_counter()
    index, added, max_id = _train_and_fill(store, plan, metric, seed, gpu, batch_size)
    build_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    qids, q = _query_sample(store, n_queries, seed, metric)
    _, truth = exact_scan(store, q, RECALL_K + 1, metric, batch_size=batch_size)
    truth = _without_self(truth, qids, RECALL_K)
    info = IndexInfo(factory=plan.factory, kind=plan.kind, metric=metric, dim=store.dim,
                     nlist=plan.nlist, params={}, n_covered=int(index.ntotal), max_id=max_id,
                     n_rows_committed=committed, recall_at_10=0.0, target_recall=target_recall,
                     recall_met=False, qps=0.0, n_queries=len(qids),
                     build_seconds=round(build_seconds, 3), tune_seconds=0.0, memory_bytes=0,
                     reason=plan.reason, seed=seed, gpu=gpu, created=now_iso())
    vindex = VectorIndex(index, info)
    tuned = tune(lambda qq, k, params: _without_self(vindex.query(store, qq, k + 1, params)[1],
                                                     qids, k),
                 plan, q, truth, target_recall, RECALL_K)
    info = replace(info, params=tuned.params, recall_at_10=tuned.recall, recall_met=tuned.met,
                   qps=tuned.qps, curve=tuned.curve,
                   tune_seconds=round(time.perf_counter() - t1, 3))
    if not tuned.met:
        log.warning("%s reached recall@10 %.3f < target %.3f at its widest setting %s; "
                    "consider --kind ivf-flat or a larger --memory-budget", plan.factory,
                    tuned.recall, target_recall, tuned.params)
    info = save_index(index, info, index_dir(store))
    log.info("built %s over %d rows in %.1fs: recall@10 %.3f at %s, %.0f QPS", info.factory,
             added, build_seconds, info.recall_at_10, info.params, info.qps)
    return info


def update_index(store: StoreLike, batch_size: int = SCAN_BATCH) -> IndexInfo:
    """Add rows committed since the build (ids above the covered max id), without retraining."""
    vindex = load_index(store, check_stale=False)
    info = vindex.info
    committed = int(store.n_rows_committed)
    if committed <= info.n_rows_committed:
        return info
    added, max_id = _add_rows(vindex.index, store, info.metric, batch_size, info.max_id)
    info = replace(info, n_covered=int(vindex.ntotal), max_id=max_id,
                   n_rows_committed=committed, updated=now_iso(), n_added=info.n_added + added)
    info = save_index(vindex.index, info, index_dir(store))
    grown = info.n_covered / max(1, info.n_covered - info.n_added)
    log.info("added %d rows to %s (now %d)", added, info.factory, info.n_covered)
    if grown >= 2.0:
        log.warning("the index has grown %.1fx since it was built and trained; recall was "
                    "measured on the original rows: consider `embedstore index %s` to rebuild",
                    grown, store.path)
    return info

"""Exact search by streaming the store, recall@k, and the build-time parameter sweep.

Exact search is the reference every index is measured against: the store is scanned in id
order, batch by batch (float16 -> float32 per batch), and each batch's top-k is merged into a
running heap, so the full float32 matrix never exists in memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from embedstore.index._vectors import SCAN_BATCH, as_queries, check_metric, prepare
from embedstore.index.choose import IndexPlan
from embedstore.store.protocol import StoreLike

__all__ = ["exact_search", "exact_scan", "recall_at_k", "tune", "Tuned"]

# ids (b,) -> allowed (b,) for all queries, or (nq, b) per query
AllowFn = Callable[[np.ndarray], np.ndarray]
# (queries (nq, dim) float32, k, params) -> ids (nq, k) int64
RunFn = Callable[[np.ndarray, int, dict], np.ndarray]

_FILTER_QUERY_CHUNK = 256


def exact_search(store: StoreLike, queries: np.ndarray, k: int = 10,
                 metric: str = "cosine", batch_size: int = SCAN_BATCH
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over every live row: queries (nq, dim) -> (scores (nq, k) float32, ids (nq, k)
    int64), best first; ids are -1 (scores -inf) where the store has fewer than k rows."""
    q = prepare(as_queries(queries, store.dim), check_metric(metric))
    return exact_scan(store, q, k, metric, batch_size=batch_size)


def exact_scan(store: StoreLike, q: np.ndarray, k: int, metric: str,
               allow: AllowFn | None = None, batch_size: int = SCAN_BATCH,
               skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """exact_search on prepared queries (nq, dim) float32, optionally restricted by ``allow``;
    the rows ``skip`` (sorted ids: held-out queries) are left out for every query."""
    import faiss

    nq = len(q)
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    for batch_ids, emb in store.scan(batch_size):
        if len(batch_ids) == 0:
            continue
        batch_ids = np.asarray(batch_ids, dtype=np.int64)
        if skip is not None and len(skip):
            keep = ~np.isin(batch_ids, skip)
            batch_ids, emb = batch_ids[keep], emb[keep]
            if not len(batch_ids):
                continue
        x = prepare(emb, metric)
        kb = min(k, len(batch_ids))
        if allow is None:
            scores, local = faiss.knn(q, x, kb, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, np.where(local >= 0, batch_ids[np.maximum(local, 0)], -1))
            continue
        mask = np.asarray(allow(batch_ids), dtype=bool)
        for s in range(0, nq, _FILTER_QUERY_CHUNK):
            e = min(nq, s + _FILTER_QUERY_CHUNK)
            block = q[s:e] @ x.T                     # (chunk, b) scores of this batch
            block[~(mask if mask.ndim == 1 else mask[s:e])] = -np.inf
            top = np.argpartition(-block, kb - 1, axis=1)[:, :kb]
            scores = np.take_along_axis(block, top, axis=1)
            ids = np.where(np.isfinite(scores), batch_ids[top], -1)
            heap.add_result_subset(np.arange(s, e, dtype=np.int64), scores, ids)
    heap.finalize()
    scores, ids = heap.D.copy(), heap.I.copy()
    scores[ids < 0] = -np.inf
    return scores.astype(np.float32), ids.astype(np.int64)


def recall_at_k(ids: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's true top-k ids (truth (nq, >=k), ids >= 0) present in its
    found top-k ``ids`` (nq, >=k)."""
    ids, truth = np.asarray(ids)[:, :k], np.asarray(truth)[:, :k]
    hits = (ids[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)
    per_query = hits.any(axis=1).sum(axis=1)
    denom = np.maximum((truth >= 0).sum(axis=1), 1)
    return float(np.mean(per_query / denom))


@dataclass
class Tuned:
    """Outcome of the build-time sweep."""

    params: dict                      # {"nprobe"|"efSearch": int, "k_factor": int}
    recall: float                     # recall@k at params on the held-out queries
    qps: float                        # queries per second at params (batch of all queries)
    met: bool                         # whether recall >= target
    curve: list[dict] = field(default_factory=list)   # every setting tried, in order


def _measure(run: RunFn, q: np.ndarray, truth: np.ndarray, k: int, params: dict) -> dict:
    t0 = time.perf_counter()
    ids = run(q, k, params)
    dt = max(time.perf_counter() - t0, 1e-9)
    return {**params, "recall": round(recall_at_k(ids, truth, k), 4),
            "qps": round(len(q) / dt, 1)}


def tune(run: RunFn, plan: IndexPlan, q: np.ndarray, truth: np.ndarray, target: float,
         k: int = 10, budget_s: float = 600.0) -> Tuned:
    """Sweep the plan's search parameter upwards (per re-rank depth), stop at the first value
    meeting ``target`` (or when recall stops improving), and keep the fastest that met it.
    The sweep stops early, keeping the best so far, once it has run ``budget_s`` seconds."""
    curve: list[dict] = []
    deadline = time.perf_counter() + budget_s
    if not plan.sweep_name:
        point = _measure(run, q, truth, k, {"k_factor": 1})
        curve.append(point)
        return Tuned({"k_factor": 1}, point["recall"], point["qps"],
                     point["recall"] >= target, curve)
    winners: list[dict] = []
    for k_factor in plan.k_factors:
        prev, flat_steps = -1.0, 0
        for value in plan.sweep:
            point = _measure(run, q, truth, k, {plan.sweep_name: value, "k_factor": k_factor})
            curve.append(point)
            if point["recall"] >= target:
                winners.append(point)
                break
            flat_steps = flat_steps + 1 if point["recall"] - prev < 0.002 else 0
            if flat_steps >= 2:   # plateau twice running: more probing buys nothing here
                break
            prev = point["recall"]
            if time.perf_counter() > deadline:
                break
        if time.perf_counter() > deadline:
            break
        if len(winners) >= 2 and winners[-1]["qps"] < winners[-2]["qps"]:
            break  # deeper re-ranking met the target, but more slowly: stop going deeper
    if winners:
        best = max(winners, key=lambda p: p["qps"])
        met = True
    else:
        best = max(curve, key=lambda p: (p["recall"], p["qps"]))
        met = False
    params = {key: best[key] for key in (plan.sweep_name, "k_factor")}
    return Tuned(params, best["recall"], best["qps"], met, curve)

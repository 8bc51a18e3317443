"""Choose the index by measurement: every candidate that fits the budget is built on a sample
of the store, tuned to the target recall on held-out queries, timed, and its full-size speed
predicted; ``choose.pick`` then keeps the fastest that met the target.

The sample: ``s = min(n - nq, max(SAMPLE_MIN, SAMPLE_PER_LIST * nlist), SAMPLE_MAX, half the
budget as float32)`` seeded random rows, none of them one of the ``nq`` queries (whose ground
truth is the exact top-10 within the sample). Why it predicts the full-size index:

- Inverted lists are built with the ``nlist`` planned for the full ``n``, not one re-derived for
  ``s``: the partition is as fine as the full one, so the share of lists a query must probe to
  find its neighbours — the tuned nprobe — carries over. With fewer rows per list the sample's
  10th neighbour lies a little farther out, so its recall at a given nprobe errs low (the safe
  side). HNSW recall at a fixed efSearch decays only with log n; PQ codes and the re-rank depth
  are trained and tuned alike at either size.
- Speed does not carry over as is. A query's time is split into the part that does not grow
  with n — the coarse quantizer over the nlist centroids and the exact re-ranking of
  k * k_factor candidates — and the scan that does: by n / s for Flat and inverted lists, by
  log n / log s for an HNSW graph. ``qps`` is the prediction from that split (``sample_qps``
  what the sample itself ran at).

The winner is then built at full size and measured again on the same held-out queries; that
is the saved recall. tests/test_index_choose.py checks the sample's recall against it.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from embedstore.errors import VectorIndexError
from embedstore.index._make import gather_rows, new_index, random_ids, train
from embedstore.index._vectors import log
from embedstore.index.choose import IndexPlan, sample_size
from embedstore.index.recall import tune
from embedstore.index.stored import IndexInfo, VectorIndex, now_iso, rerank, to_gpu
from embedstore.store.protocol import StoreLike

__all__ = ["measure_candidates", "predicted_seconds", "gpu_count", "RECALL_K"]

RECALL_K = 10
TUNE_BUDGET_S = 120.0            # parameter sweep time per candidate on the sample
TIMING_REPEATS = 2               # best of: the box is shared, the first run warms caches


def gpu_count() -> int:
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def predicted_seconds(kind: str, total_s: float, fixed_s: float, n: int, s: int) -> float:
    """Full-size time of a batch measured at ``total_s`` on ``s`` rows, of which ``fixed_s``
    (quantizer, re-ranking) does not grow with the rows: the rest grows by n / s, or by
    log n / log s for an HNSW graph."""
    if s <= 1 or n <= s:
        return total_s
    growth = math.log(n) / math.log(s) if kind == "hnsw" else n / s
    fixed = min(max(fixed_s, 0.0), total_s)
    return fixed + (total_s - fixed) * growth


def _stub_info(plan: IndexPlan, metric: str, rows: int, target: float, nq: int) -> IndexInfo:
    return IndexInfo(factory=plan.factory, kind=plan.kind, metric=metric, dim=plan.dim,
                     nlist=plan.nlist, params={}, n_covered=rows, max_id=-1, n_rows_committed=0,
                     recall_at_10=0.0, target_recall=target, recall_met=False, qps=0.0,
                     n_queries=nq, build_seconds=0.0, tune_seconds=0.0, memory_bytes=0,
                     gpu=plan.gpu, created=now_iso())


def _sample_index(plan: IndexPlan, xs: np.ndarray, sids: np.ndarray, seed: int
                  ) -> tuple[Any, Any]:
    """``plan`` (its full-size nlist) trained and filled on the sample: (index, gpu resources)."""
    index = new_index(plan)
    work, res = (to_gpu(index, plan.kind) if plan.gpu else (index, None))
    if plan.needs_training:
        train(work, xs[:min(plan.train_size, len(xs))], plan, seed, res is not None)
    work.add_with_ids(xs, sids)
    return work, res


def _fixed_seconds(vindex: VectorIndex, store: StoreLike, q: np.ndarray, params: dict,
                   ids: np.ndarray) -> float:
    """Time of the parts that do not grow with n: the coarse quantizer for nprobe lists (timed
    on random vectors of its dimension: the cost does not depend on their values), and the
    exact re-ranking of ``ids``' candidates."""
    import faiss

    fixed = 0.0
    if "nprobe" in params and vindex.info.nlist:
        try:
            ivf = faiss.extract_index_ivf(vindex.index)
            qf = np.random.default_rng(0).standard_normal((len(q), ivf.d)).astype(np.float32)
            t0 = time.perf_counter()
            ivf.quantizer.search(qf, int(params["nprobe"]))
            fixed += time.perf_counter() - t0
        except (RuntimeError, AttributeError):   # a GPU index keeps its quantizer to itself
            pass
    if vindex.info.kind == "ivf-pq":
        t0 = time.perf_counter()
        rerank(store, q, ids, vindex.info.metric)
        fixed += time.perf_counter() - t0
    return fixed


def _measure_one(store: StoreLike, plan: IndexPlan, xs: np.ndarray, sids: np.ndarray,
                 q: np.ndarray, truth: np.ndarray, target: float, metric: str,
                 seed: int) -> dict:
    t0 = time.perf_counter()
    index, res = _sample_index(plan, xs, sids, seed)
    build_s = time.perf_counter() - t0
    vindex = VectorIndex(index, _stub_info(plan, metric, len(sids), target, len(q)), res)
    t1 = time.perf_counter()
    tuned = tune(lambda qq, k, params: vindex.query(store, qq, k, params)[1],
                 plan, q, truth, target, RECALL_K, budget_s=TUNE_BUDGET_S)
    tune_s = time.perf_counter() - t1
    total = math.inf
    ids = np.empty((0, 0), np.int64)
    for _ in range(TIMING_REPEATS):
        t2 = time.perf_counter()
        _, ids = vindex.query(store, q, RECALL_K, tuned.params)
        total = min(total, time.perf_counter() - t2)
    fixed = _fixed_seconds(vindex, store, q, tuned.params, ids)
    seconds = predicted_seconds(plan.kind, total, fixed, plan.n, len(sids))
    return {"label": plan.label, "kind": plan.kind, "factory": plan.factory, "gpu": plan.gpu,
            "params": tuned.params, "recall": tuned.recall, "met": tuned.met,
            "qps": round(len(q) / max(seconds, 1e-9), 1),
            "sample_qps": round(len(q) / max(total, 1e-9), 1),
            "memory_bytes": plan.memory_bytes, "build_seconds": round(build_s, 3),
            "tune_seconds": round(tune_s, 3), "chosen": False}


def measure_candidates(store: StoreLike, plans: list[IndexPlan], qids: np.ndarray,
                       q: np.ndarray, target: float, metric: str, seed: int, budget: int,
                       batch_size: int) -> tuple[list[dict], int]:
    """Each of ``plans`` built on one sample of the store (rows other than ``qids``), tuned to
    ``target`` on the queries ``q`` (prepared rows ``qids``) and timed: (one dict per plan, in
    order — label, params, recall, met, qps (predicted at full size), sample_qps,
    memory_bytes (planned at full size), build_seconds, tune_seconds — and the sample size)."""
    import faiss

    pool = np.setdiff1d(store.all_ids(), qids, assume_unique=True)
    size = sample_size(len(store), len(qids), plans, store.dim, budget)
    sids = random_ids(pool, size, seed + 2)
    xs = gather_rows(store, sids, metric, batch_size)
    _, local = faiss.knn(q, xs, min(RECALL_K, len(xs)), metric=faiss.METRIC_INNER_PRODUCT)
    truth = np.where(local >= 0, sids[np.maximum(local, 0)], -1)
    log.info("measuring %d candidate indexes on %d sampled rows, %d held-out queries",
             len(plans), len(sids), len(qids))
    measured = []
    for plan in plans:
        try:
            row = _measure_one(store, plan, xs, sids, q, truth, target, metric, seed)
        except (RuntimeError, MemoryError, VectorIndexError) as exc:   # e.g. faiss refuses it
            why = " ".join(str(exc).split())[:160]
            log.warning("candidate %s could not be measured: %s", plan.label, why)
            row = {"label": plan.label, "kind": plan.kind, "factory": plan.factory,
                   "gpu": plan.gpu, "params": {}, "recall": 0.0, "met": False, "qps": 0.0,
                   "sample_qps": 0.0, "memory_bytes": plan.memory_bytes, "build_seconds": 0.0,
                   "tune_seconds": 0.0, "chosen": False, "error": why}
        log.info("candidate %s: recall@10 %.3f at %s, %.0f QPS predicted (%.0f on the sample)",
                 row["label"], row["recall"], row["params"], row["qps"], row["sample_qps"])
        measured.append(row)
    return measured, len(sids)

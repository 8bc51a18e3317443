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
  side). HNSW recall at a fixed efSearch decays with n, on hard data steeply (0.957 on 50k
  rows, 0.772 on 300k): the loss from s / 2 to s rows is measured and extrapolated per
  doubling (``_tune_graph``), efSearch re-tuned for it, and the predicted full-size recall is
  what the pick compares. PQ codes and the re-rank depth are trained and tuned alike at
  either size.
- Speed does not carry over as is. A query's time is split into the part that does not grow
  with n — the coarse quantizer over the nlist centroids and the exact re-ranking of
  k * k_factor candidates — and the scan that does: by n / s for Flat and inverted lists, by
  log n / log s for an HNSW graph. ``qps`` is the prediction from that split (``sample_qps``
  what the sample itself ran at).
- Timing: the tuned candidates are kept (while their sample indexes fit half the budget) and
  timed on one thread in ``TIMING_ROUNDS`` interleaved rounds, each keeping its best, so that
  a burst of load on a shared machine slows all of them alike rather than the one it happened
  to hit, and a multi-threaded BLAS scan is not charged for the barriers a busy machine makes
  it wait at (``_time_rounds``); the QPS are one thread's times faiss's thread count.
  Their search parameter is swept over ``choose.sweep_grid`` (steps of at most 1.5x).

The winner is then built at full size and measured again on the same held-out queries; that
is the saved recall. tests/test_index_choose.py checks the sample's recall against it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from embedstore.errors import VectorIndexError
from embedstore.index._make import HeldOut, gather_rows, new_index, random_ids, train
from embedstore.index._vectors import log
from embedstore.index.choose import IndexPlan, graph_recall_at, sample_size
from embedstore.index.recall import Tuned, recall_at_k, tune
from embedstore.index.stored import IndexInfo, VectorIndex, now_iso, rerank, to_gpu
from embedstore.store.protocol import StoreLike

__all__ = ["measure_candidates", "predicted_seconds", "gpu_count", "RECALL_K"]

RECALL_K = 10
TUNE_BUDGET_S = 120.0            # parameter sweep time per candidate on the sample
GRAPH_RETUNES = 2                # HNSW: re-tunes of efSearch for its predicted full-size loss
GRAPH_MAX_TARGET = 0.999         # ... never for more than this sample recall
TIMING_ROUNDS = 3                # rounds of timing all tuned candidates in turn, best kept:
                                 # the box may be shared, and the first round warms caches


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


def _build_and_tune(store: StoreLike, plan: IndexPlan, xs: np.ndarray, sids: np.ndarray,
                    q: np.ndarray, truth: np.ndarray, target: float, metric: str,
                    seed: int) -> tuple[dict, VectorIndex]:
    """``plan`` built on the sample and tuned to ``target``: (its row, untimed; its index)."""
    t0 = time.perf_counter()
    index, res = _sample_index(plan, xs, sids, seed)
    build_s = time.perf_counter() - t0
    vindex = VectorIndex(index, _stub_info(plan, metric, len(sids), target, len(q)), res)
    t1 = time.perf_counter()
    tuned = tune(lambda qq, k, params: vindex.query(store, qq, k, params)[1],
                 plan, q, truth, target, RECALL_K, budget_s=TUNE_BUDGET_S)
    predicted = None
    if plan.kind == "hnsw" and plan.n >= 2 * len(sids):
        tuned, predicted = _tune_graph(store, plan, vindex, xs, sids, q, truth, target, metric,
                                       seed, tuned)
    row = {"label": plan.label, "kind": plan.kind, "factory": plan.factory, "gpu": plan.gpu,
           "params": tuned.params, "recall": tuned.recall, "met": tuned.met, "qps": 0.0,
           "sample_qps": 0.0, "memory_bytes": plan.memory_bytes,
           "build_seconds": round(build_s, 3), "tune_seconds": round(time.perf_counter() - t1, 3),
           "chosen": False}
    if predicted is not None:
        row["predicted_recall"] = round(predicted, 4)
        row["met"] = predicted >= target
    return row, vindex


def _tune_graph(store: StoreLike, plan: IndexPlan, vindex: VectorIndex, xs: np.ndarray,
                sids: np.ndarray, q: np.ndarray, truth: np.ndarray, target: float, metric: str,
                seed: int, tuned: Tuned) -> tuple[Tuned, float]:
    """An HNSW graph's recall at a fixed efSearch decays with its rows: the same graph is built
    on every other sampled row, the loss from s / 2 to s measured at the tuned efSearch and
    extrapolated to n (``choose.graph_recall_at``); while that misses the target, efSearch is
    re-tuned on the sample for the target plus the predicted loss (at most GRAPH_RETUNES
    times, the loss re-measured each time): (tuned, predicted full-size recall)."""
    import faiss

    hx, hids = xs[::2], sids[::2]
    _, local = faiss.knn(q, hx, min(RECALL_K, len(hx)), metric=faiss.METRIC_INNER_PRODUCT)
    htruth = np.where(local >= 0, hids[np.maximum(local, 0)], -1)
    half, _ = _sample_index(plan, hx, hids, seed)          # HNSW: a CPU graph, searched as is
    predicted = tuned.recall
    for attempt in range(GRAPH_RETUNES + 1):
        faiss.ParameterSpace().set_index_parameter(
            half, "efSearch", max(RECALL_K, int(tuned.params["efSearch"])))
        found = half.search(q, RECALL_K)[1]
        predicted = graph_recall_at(plan.n, len(sids), tuned.recall,
                                    recall_at_k(found, htruth, RECALL_K))
        want = min(GRAPH_MAX_TARGET, target + (tuned.recall - predicted))
        if predicted >= target or attempt == GRAPH_RETUNES or want <= tuned.recall:
            break
        tuned = tune(lambda qq, k, params: vindex.query(store, qq, k, params)[1],
                     plan, q, truth, want, RECALL_K, budget_s=TUNE_BUDGET_S)
    log.info("%s: sample recall %.3f at %s predicts %.3f at %d rows", plan.label,
             tuned.recall, tuned.params, predicted, plan.n)
    return tuned, predicted


def _time_once(vindex: VectorIndex, store: StoreLike, q: np.ndarray, params: dict
               ) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    _, ids = vindex.query(store, q, RECALL_K, params)
    return time.perf_counter() - t0, ids


def _predict(row: dict, plan: IndexPlan, vindex: VectorIndex, store: StoreLike, q: np.ndarray,
             total: float, ids: np.ndarray, s: int, threads: int) -> None:
    """Fill ``row``'s sample QPS (best one-thread timing ``total``, times ``threads`` on CPU)
    and its full-size prediction."""
    fixed = _fixed_seconds(vindex, store, q, row["params"], ids)
    seconds = predicted_seconds(plan.kind, total, fixed, plan.n, s)
    scale = 1 if plan.gpu else threads
    row["qps"] = round(scale * len(q) / max(seconds, 1e-9), 1)
    row["sample_qps"] = round(scale * len(q) / max(total, 1e-9), 1)


@contextmanager
def _one_thread() -> Iterator[int]:
    """faiss (and its BLAS) on one thread while candidates are timed; yields the threads it
    had, restored after."""
    import faiss

    before = int(faiss.omp_get_max_threads())
    faiss.omp_set_num_threads(1)
    try:
        yield before
    finally:
        faiss.omp_set_num_threads(before)


def _failed_row(plan: IndexPlan, exc: Exception) -> dict:
    why = " ".join(str(exc).split())[:160]
    log.warning("candidate %s could not be measured: %s", plan.label, why)
    return {"label": plan.label, "kind": plan.kind, "factory": plan.factory, "gpu": plan.gpu,
            "params": {}, "recall": 0.0, "met": False, "qps": 0.0, "sample_qps": 0.0,
            "memory_bytes": plan.memory_bytes, "build_seconds": 0.0, "tune_seconds": 0.0,
            "chosen": False, "error": why}


def _time_rounds(held: list[tuple[dict, IndexPlan, VectorIndex]], store: StoreLike,
                 q: np.ndarray, s: int) -> None:
    """Time the tuned candidates on one thread in TIMING_ROUNDS interleaved rounds (each its
    best round), so that a burst of load on a shared machine slows all of them alike, not one.
    One thread: with its cores shared, a multi-threaded BLAS scan (Flat) waits at every
    barrier for a thread the others preempted, and measured 8x slower than on a quiet box
    while an HNSW search, parallel over queries, measured as fast; one thread each ranks them
    as a quiet box does. The QPS reported are one thread's times faiss's threads."""
    best: list[tuple[float, np.ndarray]] = [(math.inf, np.empty((0, 0), np.int64))] * len(held)
    with _one_thread() as threads:
        for _ in range(TIMING_ROUNDS):
            for i, (row, _, vindex) in enumerate(held):
                seconds, ids = _time_once(vindex, store, q, row["params"])
                if seconds < best[i][0]:
                    best[i] = (seconds, ids)
        for (row, plan, vindex), (total, ids) in zip(held, best):
            _predict(row, plan, vindex, store, q, total, ids, s, threads)


def measure_candidates(store: StoreLike, plans: list[IndexPlan], out: HeldOut,
                       target: float, metric: str, seed: int, budget: int,
                       batch_size: int) -> tuple[list[dict], int]:
    """Each of ``plans`` built on one sample of the store (rows other than ``out.rows``,
    the held-out rows), tuned to ``target`` on the queries ``out.q`` and timed: (one dict per plan, in
    order — label, params, recall, met, qps (predicted at full size), sample_qps,
    memory_bytes (planned at full size), build_seconds, tune_seconds — and the sample size)."""
    import faiss

    q = out.q
    pool = np.setdiff1d(store.all_ids(), out.rows, assume_unique=True)
    size = sample_size(len(store), len(out.rows), plans, store.dim, budget)
    sids = random_ids(pool, size, seed + 2)
    xs = gather_rows(store, sids, metric, batch_size)
    _, local = faiss.knn(q, xs, min(RECALL_K, len(xs)), metric=faiss.METRIC_INNER_PRODUCT)
    truth = np.where(local >= 0, sids[np.maximum(local, 0)], -1)
    log.info("measuring %d candidate indexes on %d sampled rows, %d held-out queries",
             len(plans), len(sids), len(q))
    measured: list[dict] = []
    held: list[tuple[dict, IndexPlan, VectorIndex]] = []   # timed together at the end
    room, held_bytes = budget // 2, 0                       # the other half holds the sample
    for plan in plans:
        try:
            row, vindex = _build_and_tune(store, plan, xs, sids, q, truth, target, metric, seed)
        except (RuntimeError, MemoryError, VectorIndexError) as exc:   # e.g. faiss refuses it
            measured.append(_failed_row(plan, exc))
            continue
        measured.append(row)
        size = plan.memory_bytes * len(sids) // max(1, plan.n)    # its size at the sample
        if held_bytes + size <= room:
            held.append((row, plan, vindex))
            held_bytes += size
        else:                              # no room to keep it: timed now, on its own
            _time_rounds([(row, plan, vindex)], store, q, len(sids))
        log.info("candidate %s: recall@10 %.3f at %s", row["label"], row["recall"], row["params"])
    _time_rounds(held, store, q, len(sids))
    for row in measured:
        log.info("candidate %s: %.0f QPS predicted at full size (%.0f on the sample)",
                 row["label"], row["qps"], row["sample_qps"])
    return measured, len(sids)

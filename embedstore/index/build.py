"""Build, update and measure the store's FAISS index.

Everything streams from the store: the training sample is gathered by random ids, rows are
added batch by batch (float16 -> float32, L2-normalised, per batch), and recall is measured
against an exact search that is itself a streamed scan. FAISS ids are the store's tile ids.

``kind="auto"`` measures every candidate that fits the budget on a sample of the store
(``index/measure.py``) and builds the fastest that met the target recall. Every recall figure,
the sample's and the saved one, is measured on held-out stored rows that the measured index
does not contain: they are added to the full-size index only after its recall was measured.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from embedstore.index._kmeans import TWO_LEVEL_MIN_LISTS
from embedstore.index._make import HeldOut, gather_rows, held_out_queries, new_index, random_ids, train
from embedstore.index._vectors import (SCAN_BATCH, check_metric, log, prepare, require_rows,
                                       rows_after)
from embedstore.index.choose import (ON_DISK_KINDS, EXACT_MAX_ROWS, SHARD_MAX_ROWS, IndexPlan, fits_in_memory, parse_memory,
                                     TIE, pick, plan_candidates, plan_index, plan_on_disk,
                                     prediction_held)
from embedstore.index.measure import RECALL_K, gpu_count, measure_candidates
from embedstore.index.ondisk import OnDiskBuild, empty_copy, lists_of, train_empty
from embedstore.index.recall import Tuned, exact_scan, recall_at_k, tune
from embedstore.index.stored import (IndexInfo, VectorIndex, index_dir, index_file, load_index,
                                     now_iso, require_gpu, save_index, to_gpu)
from embedstore.errors import VectorIndexError
from embedstore.sizes import format_bytes
from embedstore.store.protocol import StoreLike

__all__ = ["build_index", "update_index"]

CONFIRM_MAX = 1     # runner-up candidates built at full size when the winner falls short


def _add_rows(index: Any, store: StoreLike, metric: str, batch_size: int,
              above_id: int = -1, skip: np.ndarray | None = None) -> tuple[int, int]:
    """Add every live row with id > above_id (and not in sorted ``skip``); returns (rows
    added, largest id seen)."""
    added, max_id = 0, above_id
    for ids, emb in rows_after(store, batch_size, above_id, skip):
        index.add_with_ids(prepare(emb, metric), ids)
        added += len(ids)
        max_id = max(max_id, int(ids[-1]))
    return added, max_id


def _train_and_fill(store: StoreLike, plan: IndexPlan, metric: str, seed: int,
                    batch_size: int, skip: np.ndarray) -> tuple[Any, int, int]:
    """The full-size index of ``plan`` over every row but ``skip`` (CPU index returned)."""
    import faiss

    index = new_index(plan)
    work, res = index, None
    if plan.gpu and plan.kind != "hnsw":
        work, res = to_gpu(index, plan.kind)
    elif plan.gpu:
        log.warning("faiss has no GPU HNSW; building %s on CPU", plan.factory)
    if plan.needs_training:
        t0 = time.perf_counter()
        pool = store.all_ids()
        pick_ids = random_ids(pool, plan.train_size, seed)
        sample = gather_rows(store, pick_ids, metric, batch_size)
        train(work, sample, plan, seed, res is not None, TWO_LEVEL_MIN_LISTS)
        del sample
        log.info("trained %s on %d sampled rows in %.1fs", plan.factory, len(pick_ids),
                 time.perf_counter() - t0)
    added, max_id = _add_rows(work, store, metric, batch_size, skip=skip)
    if res is not None:
        index = faiss.index_gpu_to_cpu(work)
    return index, added, max_id


def _choose(store: StoreLike, kind: str, budget: int, target_recall: float, gpu: bool,
            metric: str, seed: int, held: HeldOut, batch_size: int,
            measure: bool, on_disk: bool | None) -> tuple[IndexPlan, list[dict], int, list[IndexPlan]]:
    """(plan to build, every candidate measured, sample rows, the measured plans in the order of
    the candidates): the on-disk IVF (forced, or when no in-memory index fits the budget), a
    forced kind, the static plan (``measure=False``), the only candidate, or the winner of the
    measurement."""
    n, dim = len(store), store.dim
    if on_disk is None:
        on_disk = kind in ON_DISK_KINDS and \
            not fits_in_memory(n, dim, budget, target_recall, kind)
        if on_disk:
            log.info("no in-memory %s index of %d x %d fits %s: building it on disk", kind, n,
                     dim, format_bytes(budget))
    if on_disk:
        if gpu:
            raise VectorIndexError("an on-disk index is built and searched on CPU; drop --gpu")
        return plan_on_disk(n, dim, budget, target_recall, kind), [], 0, []
    if kind != "auto" or not measure:
        plan = plan_index(n, dim, budget, target_recall, kind)
        return replace(plan, gpu=gpu), [], 0, []
    plans = plan_candidates(n, dim, budget, target_recall, gpus=gpu_count() if gpu else 0)
    if len(plans) == 1:      # below EXACT_MAX_ROWS, or the budget leaves one: nothing to compare
        only = plans[0]
        why = only.reason if only.kind == "flat" and n < EXACT_MAX_ROWS else \
            f"the only candidate that fits the memory budget of {format_bytes(budget)}"
        return replace(only, reason=why), [], 0, []
    measured, sample = measure_candidates(store, plans, held, target_recall, metric, seed,
                                          budget, batch_size)
    win = pick(measured, target_recall)
    measured[win]["chosen"] = True
    best = measured[win]
    met = "met" if best["recall"] >= target_recall else "NOT met by any candidate"
    reason = (f"measured {len(plans)} candidates on a {sample:,}-row sample: {plans[win].label}"
              f" predicted {best['qps']:,.0f} QPS at recall@10 {best['recall']:.3f} (target "
              f"{target_recall}: {met}), {format_bytes(best['memory_bytes'])}")
    return replace(plans[win], reason=reason), measured, sample, plans


def build_index(store: StoreLike, kind: str = "auto", memory_budget: str | int = "8G",
                target_recall: float = 0.95, gpu: bool = False, metric: str = "cosine",
                seed: int = 0, *, n_queries: int = 1000, batch_size: int = SCAN_BATCH,
                measure: bool = True, on_disk: bool | None = None,
                shard_rows: int | None = None) -> IndexInfo:
    """Choose (or take the forced ``kind``), train, fill, tune and save the index of ``store``
    under ``store.path/index``.

    Recall@10 against exact search is measured on up to ``n_queries`` seeded stored rows that
    the index does not yet hold (they are added after), and the search parameter (nprobe /
    efSearch, and re-rank depth for IVF-PQ) is the cheapest that met ``target_recall`` in an
    increasing sweep; every point tried is kept in ``info.curve``, every candidate measured
    by the auto chooser in ``info.candidates``.

    ``on_disk``: True builds the IVF with memory-mapped on-disk lists (``index/ondisk.py``),
    False never does, None (default) does when no in-memory index of ``kind`` fits the budget;
    ``shard_rows`` overrides the rows it encodes in memory before writing a shard.
    """
    check_metric(metric)
    n = require_rows(store)
    if gpu:
        require_gpu()
    budget = parse_memory(memory_budget)
    held = held_out_queries(store, n_queries, seed, metric)
    if held.slides:
        log.info("holding out %d whole slides (%d rows) for %d queries", held.slides,
                 len(held.rows), len(held.qids))
    plan, candidates, sample, plans = _choose(store, kind, budget, target_recall, gpu, metric,
                                              seed, held, batch_size, measure, on_disk)
    if shard_rows is not None and plan.on_disk:
        plan = replace(plan, shard_rows=max(1, int(shard_rows)))
    log.info("index plan for %d x %d: %s (~%s): %s", n, store.dim, plan.label,
             format_bytes(plan.memory_bytes), plan.reason)
    committed = int(store.n_rows_committed)
    staging = OnDiskBuild(index_dir(store)) if plan.on_disk else None
    with staging or nullcontext():
        return _build(store, plan, candidates, sample, metric, seed, batch_size, target_recall,
                      held, committed, staging, plans, budget)


@dataclass
class _Full:
    """One candidate built over every row but the held-out queries, and tuned."""
    plan: IndexPlan
    index: Any
    tuned: Tuned
    added: int
    max_id: int
    build_seconds: float

    def beats(self, other: "_Full") -> bool:
        """Met the target when ``other`` did not, else faster (both met) or higher recall."""
        if self.tuned.met != other.tuned.met:
            return self.tuned.met
        if self.tuned.met:
            return self.tuned.qps > other.tuned.qps
        return self.tuned.recall > other.tuned.recall


def _vindex(index: Any, info: IndexInfo, plan: IndexPlan) -> VectorIndex:
    return VectorIndex(index, replace(info, factory=plan.factory, kind=plan.kind, nlist=plan.nlist))


def _tuned(store: StoreLike, index: Any, info: IndexInfo, plan: IndexPlan, q: np.ndarray,
           truth: np.ndarray, target_recall: float) -> Tuned:
    vindex = _vindex(index, info, plan)
    return tune(lambda qq, k, params: vindex.query(store, qq, k, params)[1],
                plan, q, truth, target_recall, RECALL_K)


def _full_row(row: dict, full: _Full, store: StoreLike, info: IndexInfo, q: np.ndarray,
              truth: np.ndarray) -> None:
    """The candidate's sample prediction checked at full size: ``full_recall`` at the sample's
    parameters, and what tuning at full size reached (``full_params``, ``full_tuned_recall``,
    ``full_qps``)."""
    found = _vindex(full.index, info, full.plan).query(store, q, RECALL_K, row["params"])[1]
    row["full_recall"] = round(recall_at_k(found, truth, RECALL_K), 4)
    row["full_params"] = dict(full.tuned.params)
    row["full_tuned_recall"] = round(full.tuned.recall, 4)
    row["full_qps"] = round(full.tuned.qps, 1)
    row["full_build_seconds"] = round(full.build_seconds, 3)


def _confirm(store: StoreLike, first: _Full, win: int, candidates: list[dict],
             plans: list[IndexPlan], info: IndexInfo, q: np.ndarray, truth: np.ndarray,
             target_recall: float, budget: int,
             fill: Callable[[IndexPlan], tuple[Any, int, int, float]]) -> _Full:
    """The sample's winner ``candidates[win]``, built and tuned at full size, which did not hold
    its prediction (``prediction_held``), against the other candidates' predictions. A sample
    predicts some kinds badly (an HNSW graph's recall falls as it grows; an IVF's lists hold
    few rows each on a sample): while the best built one missed the target or a candidate not
    built yet was predicted more than TIE faster than what the best reached, the next such
    candidate (fastest predicted first; at most CONFIRM_MAX of them, each only when it fits the
    budget beside the best) is built and tuned too, and the faster at the target is kept. Every
    full-size figure goes into its candidate's row."""
    best, best_i, built = first, win, 0
    others = sorted((i for i, c in enumerate(candidates)
                     if i != win and c.get("predicted_recall", c["recall"]) >= target_recall),
                    key=lambda i: -candidates[i]["qps"])
    for i in others:
        row = candidates[i]
        if built >= CONFIRM_MAX or (best.tuned.met and row["qps"] <= (1 + TIE) * best.tuned.qps):
            break
        if best.plan.memory_bytes + plans[i].memory_bytes > budget:
            log.info("not building %s beside %s: both exceed the memory budget", plans[i].label,
                     best.plan.label)
            continue
        log.info("%s reached %.0f QPS at recall@10 %.3f at full size; %s was predicted %.0f QPS:"
                 " building it too", best.plan.label, best.tuned.qps, best.tuned.recall,
                 plans[i].label, row["qps"])
        index, added, max_id, seconds = fill(plans[i])
        alt = _Full(plans[i], index, _tuned(store, index, info, plans[i], q, truth, target_recall),
                    added, max_id, seconds)
        built += 1
        _full_row(row, alt, store, info, q, truth)
        if alt.beats(best):
            best, best_i = alt, i
        del index, alt
    if best_i != win:
        candidates[win]["chosen"] = False
        candidates[best_i]["chosen"] = True
        row = candidates[best_i]
        best = replace(best, plan=replace(best.plan, reason=(
            f"{info.reason}; at full size {first.plan.label} reached {first.tuned.qps:,.0f} QPS at "
            f"recall@10 {first.tuned.recall:.3f}, {best.plan.label} (predicted {row['qps']:,.0f}) "
            f"{best.tuned.qps:,.0f} QPS at {best.tuned.recall:.3f}: built {best.plan.label}")))
    return best


def _build(store: StoreLike, plan: IndexPlan, candidates: list[dict], sample: int, metric: str,
           seed: int, batch_size: int, target_recall: float, held: HeldOut, committed: int,
           staging: OnDiskBuild | None, plans: list[IndexPlan], budget: int) -> IndexInfo:
    """Fill, measure, tune and save the index of ``plan`` (on disk when ``staging``); with
    measured ``candidates``, confirm the choice at full size (``_confirm``). The ``held`` rows
    are left out of every index until it was measured."""
    q, skip = held.q, held.rows
    def fill(p: IndexPlan) -> tuple[Any, int, int, float]:
        t0 = time.perf_counter()
        if staging is not None:
            work = train_empty(store, p, metric, seed, batch_size)
            added, max_id = staging.encode(work, store, metric, batch_size, p.shard_rows, skip)
            del work
            index = staging.merge([])
        else:
            index, added, max_id = _train_and_fill(store, p, metric, seed, batch_size, skip)
        return index, added, max_id, time.perf_counter() - t0

    index, added, max_id, build_seconds = fill(plan)
    t1 = time.perf_counter()
    _, truth = exact_scan(store, q, RECALL_K, metric, batch_size=batch_size, skip=skip)
    info = IndexInfo(factory=plan.factory, kind=plan.kind, metric=metric, dim=store.dim,
                     nlist=plan.nlist, params={}, n_covered=int(index.ntotal), max_id=max_id,
                     n_rows_committed=committed, recall_at_10=0.0, target_recall=target_recall,
                     recall_met=False, qps=0.0, n_queries=len(q),
                     build_seconds=round(build_seconds, 3), tune_seconds=0.0, memory_bytes=0,
                     reason=plan.reason, seed=seed, gpu=plan.gpu, created=now_iso(),
                     candidates=candidates, sample_size=sample)
    full = _Full(plan, index, _tuned(store, index, info, plan, q, truth, target_recall),
                 added, max_id, build_seconds)
    del index
    if candidates:                              # the sample's prediction, checked at full size
        win = next(i for i, c in enumerate(candidates) if c.get("chosen"))
        _full_row(candidates[win], full, store, info, q, truth)
        if staging is None and not prediction_held(candidates[win], target_recall):
            full = _confirm(store, full, win, candidates, plans, info, q, truth, target_recall,
                            budget, fill)
    plan, index, tuned = full.plan, full.index, full.tuned
    if staging is not None:                     # the held-out rows join once measured
        index = staging.merge([lists_of(index)], held.batches(store, metric, batch_size), final=True)
    else:
        for ids, rows in held.batches(store, metric, batch_size):
            index.add_with_ids(rows, ids)
    info = replace(info, factory=plan.factory, kind=plan.kind, nlist=plan.nlist, gpu=plan.gpu,
                   reason=plan.reason, build_seconds=round(full.build_seconds, 3),
                   params=tuned.params, recall_at_10=tuned.recall, recall_met=tuned.met,
                   qps=tuned.qps, curve=tuned.curve, n_covered=int(index.ntotal),
                   max_id=max(full.max_id, int(skip[-1])),
                   tune_seconds=round(time.perf_counter() - t1, 3))
    if not tuned.met:
        log.warning("%s reached recall@10 %.3f < target %.3f at its widest setting %s; "
                    "consider --kind ivf-flat or a larger --memory-budget", plan.factory,
                    tuned.recall, target_recall, tuned.params)
    info = save_index(index, info, index_dir(store),
                      staging.ivfdata_name if staging is not None else "")
    log.info("built %s over %d rows in %.1fs: recall@10 %.3f at %s, %.0f QPS", info.factory,
             full.added + len(skip), full.build_seconds, info.recall_at_10, info.params, info.qps)
    return info


def _update_on_disk(store: StoreLike, vindex: VectorIndex, batch_size: int
                    ) -> tuple[Any, int, int, str]:
    """New rows encoded in shards with the published quantizer and codebooks, merged with the
    published lists into a new ``.ivfdata``: (index over it, rows added, max id, its name)."""
    import faiss

    info = vindex.info
    with OnDiskBuild(index_dir(store)) as staging:
        work = empty_copy(index_file(store, info), faiss.IO_FLAG_SKIP_IVF_DATA)
        added, max_id = staging.encode(work, store, info.metric, batch_size, SHARD_MAX_ROWS,
                                       above_id=info.max_id)
        del work
        index = staging.merge([lists_of(vindex.index)], final=True)
    return index, added, max_id, staging.ivfdata_name


def update_index(store: StoreLike, batch_size: int = SCAN_BATCH) -> IndexInfo:
    """Add rows committed since the build (ids above the covered max id), without retraining
    (an on-disk index: into a new merged ``.ivfdata``, published like a build)."""
    vindex = load_index(store, check_stale=False)
    info = vindex.info
    committed = int(store.n_rows_committed)
    if committed <= info.n_rows_committed:
        return info
    if info.on_disk:
        index, added, max_id, ivfdata = _update_on_disk(store, vindex, batch_size)
    else:
        added, max_id = _add_rows(vindex.index, store, info.metric, batch_size, info.max_id)
        index, ivfdata = vindex.index, ""
    info = replace(info, n_covered=int(index.ntotal), max_id=max_id,
                   n_rows_committed=committed, updated=now_iso(), n_added=info.n_added + added)
    info = save_index(index, info, index_dir(store), ivfdata)
    grown = info.n_covered / max(1, info.n_covered - info.n_added)
    log.info("added %d rows to %s (now %d)", added, info.factory, info.n_covered)
    if grown >= 2.0:
        log.warning("the index has grown %.1fx since it was built and trained; recall was "
                    "measured on the original rows: consider `embedstore index %s` to rebuild",
                    grown, store.path)
    return info

"""Nearest tiles for many queries at once, with metadata filters.

Filters (same-slide exclusion, a set of slides, a label of a task) are applied to candidates by
metadata, so the index over-fetches: k * k_factor candidates, widened (more candidates, wider
nprobe / efSearch) for the queries still short of k, until every query has k or the candidate
cap is hit; those left are finished by an exact filtered scan of the store, so a selective
filter is slow, never wrong. Tombstoned rows are always dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from embedstore.errors import VectorIndexError
from embedstore.index._vectors import as_queries, deleted, log, prepare, require_rows
from embedstore.index.recall import exact_scan
from embedstore.index.stored import VectorIndex, check_fresh, load_index, read_index_info
from embedstore.store.geometry import level0_sides
from embedstore.store.protocol import StoreLike

__all__ = ["SearchResult", "search"]

FETCH_CAP = 4096            # candidates per query before handing over to the exact scan
_CACHE: dict[tuple, VectorIndex] = {}
_CACHE_SIZE = 4


@dataclass(frozen=True)
class SearchResult:
    """One query's neighbours, best first."""

    ids: np.ndarray                   # (k',) int64 tile ids (k' < k only if filters leave fewer)
    keys: list[str]                   # tile keys, aligned with ids
    scores: np.ndarray                # (k',) float32 cosine similarity (inner product if "ip")
    meta: dict = field(default_factory=dict)   # slide, x, y, label arrays aligned with ids
    query_id: int | None = None       # the query's tile id when given by id or key
    method: str = ""                  # "index <factory params>" or "exact scan (...)"


def json_value(value: object) -> object:
    """A JSON value: numpy scalars as Python ones, NaN (an unknown tile side) as null."""
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and value != value else value


def neighbours_json(hit: "SearchResult") -> list[dict[str, Any]]:
    """One dict per neighbour: id, key, score and its metadata (slide, x, y, label, ...)."""
    return [{"id": int(i), "key": key, "score": round(float(s), 6),
             **{col: json_value(vals[j]) for col, vals in hit.meta.items()}}
            for j, (i, key, s) in enumerate(zip(hit.ids, hit.keys, hit.scores))]


class _Filter:
    """Which candidate ids each query may return; metadata is looked up once per unique id."""

    def __init__(self, store: StoreLike, qids: np.ndarray | None, same_slide: bool,
                 slides: Collection[str] | None, label: object, task: str | None,
                 exclude_self: bool) -> None:
        self.store, self.task, self.label = store, task, label
        self.slides = None if slides is None else {str(s) for s in slides}
        self.codes: dict[str, int] = {}
        self.qids = qids if exclude_self else None
        self.qslide = None
        if same_slide:
            if qids is None:
                raise VectorIndexError("exclude_same_slide needs queries given by id or key (a raw "
                                  "vector has no slide); pass ids= or keys=")
            slides_q = store.metadata(qids, columns=("slide",))["slide"]
            self.qslide = np.array([self._code(s) for s in slides_q], dtype=np.int64)
        self.restrictive = bool(same_slide or slides is not None or label is not None
                                or exclude_self)
        self.needs_slide = same_slide or slides is not None

    def _code(self, slide: object) -> int:
        return self.codes.setdefault(str(slide), len(self.codes))

    def _rows(self, uniq: np.ndarray, live: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """For unique ids (u,): (allowed by global filters (u,) bool, slide codes (u,) int64).
        ``live``: the ids come from a scan of live rows, so tombstones need no check."""
        ok = np.ones(len(uniq), dtype=bool) if live else ~deleted(self.store, uniq)
        codes = np.full(len(uniq), -1, dtype=np.int64)
        alive = uniq[ok]                    # the store serves metadata for live rows only
        if self.needs_slide and len(alive):
            row_slides = self.store.metadata(alive, columns=("slide",))["slide"]
            codes[ok] = [self._code(s) for s in row_slides]
            if self.slides is not None:
                ok[ok] = [str(s) in self.slides for s in row_slides]
                alive = uniq[ok]
        if self.label is not None and len(alive):
            labels = self.store.labels(self.store.keys_of(alive), task=self.task)
            want = str(self.label)
            ok[ok] = [lab is not None and str(lab) == want for lab in labels]
        return ok, codes

    def allowed(self, cand: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """cand (m, kk) ids of queries ``rows`` (m,) -> (m, kk) bool; -1 ids are never allowed."""
        ok = np.zeros(cand.shape, dtype=bool)
        valid = cand >= 0
        if not valid.any():
            return ok
        uniq, inv = np.unique(cand[valid], return_inverse=True)
        row_ok, codes = self._rows(uniq)
        keep = row_ok[inv]
        owner = np.broadcast_to(rows[:, None], cand.shape)[valid]
        if self.qslide is not None:
            keep &= codes[inv] != self.qslide[owner]
        if self.qids is not None:
            keep &= cand[valid] != self.qids[owner]
        ok[valid] = keep
        return ok

    def allow_scan(self, rows: np.ndarray):
        """For exact_scan over queries ``rows``: unique ids (b,) -> (len(rows), b) bool."""
        def allow(ids: np.ndarray) -> np.ndarray:
            row_ok, codes = self._rows(ids, live=True)
            keep = np.repeat(row_ok[None, :], len(rows), axis=0)
            if self.qslide is not None:
                keep &= codes[None, :] != self.qslide[rows][:, None]
            if self.qids is not None:
                keep &= ids[None, :] != self.qids[rows][:, None]
            return keep
        return allow


def _cached_index(store: StoreLike, gpu: bool) -> VectorIndex | None:
    info = read_index_info(store)
    if info is None:
        return None
    check_fresh(store, info)
    key = (str(Path(store.path).resolve()), info.file, gpu)
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = load_index(store, gpu=gpu)
    return _CACHE[key]


def _take(scores: np.ndarray, ids: np.ndarray, ok: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    return scores[ok][:k].astype(np.float32), ids[ok][:k].astype(np.int64)


def _query_ids(store: StoreLike, ids: Sequence[int] | np.ndarray | None,
               keys: Sequence[str] | str | None) -> np.ndarray:
    if keys is not None:
        return np.asarray(store.ids([keys] if isinstance(keys, str) else list(keys)), np.int64)
    return np.atleast_1d(np.asarray(ids, dtype=np.int64))


def search(store: StoreLike, vectors: np.ndarray | None = None,
           ids: Sequence[int] | np.ndarray | None = None, k: int = 10,
           exclude_same_slide: bool = False, slides: Collection[str] | None = None,
           label: object = None, task: str | None = None, exclude_self: bool = False, *,
           keys: Sequence[str] | str | None = None, gpu: bool = False,
           exact: bool = False) -> list[SearchResult]:
    """The k nearest live tiles for each query: ``vectors`` (nq, dim) or (dim,), or stored
    ``ids`` / ``keys`` (these find themselves first unless ``exclude_self``).

    Uses the saved index (StaleIndexError if rows were added since); without one, or with
    ``exact=True``, scans the store exactly. ``result.method`` says which.
    """
    require_rows(store)
    if sum(x is not None for x in (vectors, ids, keys)) != 1:
        raise VectorIndexError("search needs exactly one of vectors=, ids= or keys=")
    if int(k) < 1:
        raise VectorIndexError(f"k must be at least 1, got {k}")
    k = int(k)
    qids = None if vectors is not None else _query_ids(store, ids, keys)
    raw = store.gather(qids) if qids is not None else as_queries(np.asarray(vectors), store.dim)
    vindex = None if exact else _cached_index(store, gpu)
    metric = vindex.info.metric if vindex is not None else "cosine"
    q = prepare(raw, metric)
    nq = len(q)
    filt = _Filter(store, qids, exclude_same_slide, slides, label, task, exclude_self)
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0, np.float32), np.empty(0, np.int64))] * nq
    pending = np.arange(nq)
    if vindex is None:
        method = "exact scan (requested)" if exact else \
            "exact scan (no index built: `embedstore index STORE` makes one)"
    else:
        method = f"index {vindex.info.describe()}"
        pending = _index_rounds(store, vindex, q, k, filt, out)
        if pending.size:
            method += f" + exact scan for {pending.size} filtered queries"
            log.info("%d queries short of %d after over-fetching; scanning exactly",
                     pending.size, k)
    if pending.size:
        allow = filt.allow_scan(pending) if filt.restrictive else None
        scan_scores, scan_ids = exact_scan(store, q[pending], k, metric, allow=allow)
        for j, row in enumerate(pending):
            out[row] = _take(scan_scores[j], scan_ids[j], scan_ids[j] >= 0, k)
    if qids is not None and not exclude_self and metric == "cosine":
        out = _self_first(store, q, qids, filt, out, k)   # (under "ip" a row may beat itself)
    return _assemble(store, out, qids, task, method)


def _index_rounds(store: StoreLike, vindex: VectorIndex, q: np.ndarray, k: int,
                  filt: _Filter, out: list) -> np.ndarray:
    """Fill ``out`` from the index, widening for queries the filters leave short of k;
    returns the rows still short when the candidate cap is reached."""
    info = vindex.info
    exhaustive = info.kind != "hnsw"      # IVF at nprobe=nlist and Flat see every row
    pending = np.arange(len(q))
    widen = 4 if filt.restrictive else 1
    for _ in range(12):
        scores, cand = vindex.query(store, q[pending], k, widen=widen)
        ok = filt.allowed(cand, pending)
        probed_all = info.nlist == 0 or int(info.params.get("nprobe", 0)) * widen >= info.nlist
        everything = exhaustive and probed_all and cand.shape[1] >= vindex.ntotal
        done = (ok.sum(axis=1) >= k) | everything
        for j in np.nonzero(done)[0]:
            out[pending[j]] = _take(scores[j], cand[j], ok[j], k)
        pending = pending[~done]
        if not pending.size or cand.shape[1] >= FETCH_CAP or \
                (not exhaustive and cand.shape[1] >= vindex.ntotal):
            break
        widen *= 4
    return pending


def _self_first(store: StoreLike, q: np.ndarray, qids: np.ndarray, filt: _Filter,
                out: list, k: int) -> list:
    """A query given by id is its own best match whenever the filters allow it."""
    self_ok = filt.allowed(qids[:, None], np.arange(len(qids)))[:, 0]
    self_score = np.einsum("ij,ij->i", q, q).astype(np.float32)
    fixed = []
    for j, (scores, ids) in enumerate(out):
        if self_ok[j]:
            other = ids != qids[j]
            scores = np.concatenate([[self_score[j]], scores[other]])[:k].astype(np.float32)
            ids = np.concatenate([[qids[j]], ids[other]])[:k].astype(np.int64)
        fixed.append((scores, ids))
    return fixed


def _assemble(store: StoreLike, out: list, qids: np.ndarray | None, task: str | None,
              method: str) -> list[SearchResult]:
    sizes = [len(ids) for _, ids in out]
    every = np.concatenate([ids for _, ids in out]) if out else np.empty(0, np.int64)
    meta: dict[str, np.ndarray] = {}
    keys: list[str] = []
    if len(every):
        meta = dict(store.metadata(every, columns=("key", "slide", "x", "y")))
        keys = [str(key) for key in meta.pop("key")]
        meta["label"] = np.asarray(store.labels(keys, task=task), dtype=object)
        sides = level0_sides(store)(meta["slide"])
        if sides is not None:
            meta["tile_size_level0"] = sides      # level-0 px per tile side (NaN: unknown)
    results, start = [], 0
    for j, ((scores, ids), size) in enumerate(zip(out, sizes)):
        part = slice(start, start + size)
        start += size
        results.append(SearchResult(
            ids=ids, keys=keys[part], scores=scores,
            meta={name: np.asarray(col)[part] for name, col in meta.items()}
            if meta else {"slide": np.empty(0, object), "x": np.empty(0, np.int64),
                          "y": np.empty(0, np.int64), "label": np.empty(0, object)},
            query_id=None if qids is None else int(qids[j]), method=method))
    return results

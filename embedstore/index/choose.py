"""Plan FAISS indexes from sizes alone: pure planning, no I/O, no faiss import.

``plan_candidates`` lists every configuration worth measuring for ``(n, dim)`` within a memory
budget (``build_index(kind="auto")`` measures them on a sample: ``index/measure.py``), and
``pick`` chooses among measured ones: the fastest that meets the target recall, ties to the
smallest. ``plan_index`` plans one forced kind; its ``kind="auto"`` is the static plan from
sizes alone (``build_index(..., measure=False)``), whose rules follow autofaiss: exact search while it is cheap, then an inverted file sized by
``4 * sqrt(n)`` lists, with codes as large as the memory budget allows. Recall that a compressed
code cannot reach on its own is bought back by exact re-ranking of the top candidates from the
store's memory-mapped vectors (which cost disk, not index memory).

    plan = plan_index(1_000_000, 768, parse_memory("8G"), target_recall=0.95)
    plan.factory  # 'IVF4096,PQ64np'  (rerank_k=100)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from embedstore.errors import BudgetError, ConfigError, VectorIndexError
from embedstore.index._rules import graph_recall_at, sweep_grid
from embedstore.sizes import format_bytes, parse_size

__all__ = [
    "KINDS", "FLAT_MAX_ROWS", "EXACT_MAX_ROWS", "IndexPlan", "plan_index", "plan_candidates",
    "parse_memory", "sample_size", "pick", "plan_on_disk", "fits_in_memory", "ON_DISK_KINDS",
    "sweep_grid", "graph_recall_at",
]

KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-sq8", "ivf-pq")
GPU_KINDS = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq")    # faiss has no GPU HNSW
EXACT_MAX_ROWS = 20_000          # auto: exact below this (1,000 queries scan it in < 1 s)
SAMPLE_MIN = 50_000              # chooser sample: at least this many rows ...
SAMPLE_PER_LIST = 20             # ... and this many per inverted list of the full-size nlist
SAMPLE_MAX = 1 << 20             # ... but never more than ~1M rows
TIE = 0.05                       # predicted QPS within 5%: a tie, broken by memory
SHORTFALL = 1 / 3                # a winner below this share of its predicted QPS at full size
                                 # is checked against the runner-up (build.py)
FLAT_MAX_ROWS = 100_000          # exact search below this many rows (autofaiss does the same)
HNSW_M = 32                      # graph neighbours per node
HNSW_RECALL_CEILING = 0.92       # HNSW32 on clustered 768-d plateaus near here
HNSW_MAX_ROWS = 2_000_000        # CPU graph construction grows too slow past this
IVF_FLAT_MIN_RECALL = 0.99       # above this, keep exact codes rather than deep PQ re-ranking
PQ_M_CHOICES = (8, 12, 16, 24, 32, 48, 64, 96, 128)   # bytes per PQ code, smallest first
PQ_DIMS_PER_SUB = 12             # preferred dims per PQ sub-quantizer (768 -> PQ64)
MIN_POINTS_PER_LIST = 39         # faiss k-means wants >= 39 training points per centroid
MAX_TRAIN = 1 << 18              # training sample cap (262,144 vectors)
MIN_TRAIN_PER_LIST = 10          # a tight budget may shrink the sample down to this per list
ID_BYTES = 8                     # int64 id per row (IDMap or inverted lists)
RERANK_FACTORS = (5, 10, 20, 40) # PQ candidates re-ranked per result, swept at build time
NPROBE_MAX = 1024
HNSW_QUANTIZER_MIN_LISTS = 1 << 16  # from here, assign to lists through an HNSW32 graph; below,
                                    # a flat quantizer (BLAS) is as fast: in 768-d an HNSW
                                    # over 4096 centroids needs efSearch ~256 to find the right
                                    # lists, which costs more than scanning the 4096 centroids
QUANTIZER_EF_SEARCH = 256        # efSearch of an HNSW quantizer (at least 2 * nprobe at search)
EF_SEARCH_RANGE = (16, 1024)      # HNSW efSearch swept over sweep_grid(16, 1024)
ON_DISK_KINDS = ("auto", "ivf-flat", "ivf-sq8", "ivf-pq")   # an on-disk index is an IVF
ON_DISK_DIMS_PER_SUB = 4         # on disk: dims per PQ sub-quantizer (256-d -> PQ64)
SHARD_MAX_ROWS = 1 << 21         # on disk: rows per shard (also at most a quarter of the budget)



@dataclass(frozen=True)
class IndexPlan:
    """What to build for ``n`` rows of ``dim``; every field follows from sizes alone."""

    kind: str                          # "flat" | "hnsw" | "ivf-flat" | "ivf-pq"
    factory: str                       # faiss.index_factory string (ids via IDMap or IVF lists)
    n: int                             # rows planned for
    dim: int                           # vector dimension
    nlist: int                         # inverted lists (0 unless IVF)
    m: int                             # PQ bytes per code (0 unless ivf-pq)
    hnsw_m: int                        # HNSW neighbours per node (0 unless hnsw)
    rerank_k: int                      # planned candidates re-ranked exactly at k=10 (0 = none)
    train_size: int                    # vectors sampled by random id for training (0 = none)
    memory_bytes: int                  # estimated resident size of the built index
    train_bytes: int                   # float32 training sample held while training
    sweep_name: str                    # search parameter tuned at build: nprobe | efSearch | ""
    sweep: tuple[int, ...]             # its values, increasing
    k_factors: tuple[int, ...]         # re-rank depths swept (candidates per result; 1 = none)
    reason: str                        # one line: why this kind
    gpu: bool = False                  # trained, filled and searched on a GPU
    on_disk: bool = False              # inverted lists in an .ivfdata file, memory-mapped
    shard_rows: int = 0                # on disk: rows added in memory before a shard is written
    disk_bytes: int = 0                # on disk: size of the .ivfdata file (codes + ids)

    @property
    def needs_training(self) -> bool:
        return self.train_size > 0

    @property
    def label(self) -> str:
        return self.factory + (" (gpu)" if self.gpu else "")


def parse_memory(value: str | int | float) -> int:
    """A memory budget (``"8G"`` or bytes) -> bytes; a bad one is a one-line VectorIndexError."""
    try:
        return parse_size(value, "memory budget")
    except ConfigError as exc:
        raise VectorIndexError(str(exc)) from None


def _nlist(n: int) -> int:
    """Inverted lists: a power of two near 4 * sqrt(n), with enough training points per list."""
    target = 4.0 * math.sqrt(max(n, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    while nlist > 1 and nlist * MIN_POINTS_PER_LIST > n:
        nlist //= 2
    return nlist


def _pq_m_options(dim: int) -> list[int]:
    """PQ code sizes worth trying, largest (most accurate) first, none past dim / 12 or dim.
    A code that does not divide dim needs an OPQ rotation, whose training (tens of rounds of
    PQ training plus an SVD) costs more than the rest of the index (1280-d: OPQ96 minutes,
    PQ64 seconds), so it is dropped when a code dividing dim keeps at least half its bytes;
    the exact re-ranking absorbs the coarser code."""
    cap = max(PQ_M_CHOICES[0], dim // PQ_DIMS_PER_SUB)
    options = [m for m in reversed(PQ_M_CHOICES) if m <= cap and m <= dim]
    even = next((m for m in options if dim % m == 0), 0)
    return [m for m in options if m <= even or 2 * even < m]


def _train_size(n: int, nlist: int, pq_bits: int) -> int:
    want = max(MIN_POINTS_PER_LIST * nlist, MIN_POINTS_PER_LIST * (1 << pq_bits))
    return min(n, want, MAX_TRAIN)


def _pq_bits(n: int) -> int:
    """8-bit codes unless there are too few rows to train 256 centroids per sub-quantizer."""
    bits = 8
    while bits > 4 and n < MIN_POINTS_PER_LIST * (1 << bits):
        bits -= 1
    return bits


def _nprobe_sweep(nlist: int) -> tuple[int, ...]:
    return sweep_grid(1, min(nlist, NPROBE_MAX))


def _coarse(nlist: int, dim: int) -> tuple[str, int]:
    """The IVF part of the factory string and its memory: flat centroids, or an HNSW graph over
    them when there are many lists (adding 1M rows then costs ~log(nlist), not nlist, each)."""
    if nlist >= HNSW_QUANTIZER_MIN_LISTS:
        return f"IVF{nlist}_HNSW{HNSW_M}", nlist * (dim * 4 + int(2 * HNSW_M * 4 * 1.1) + 12)
    return f"IVF{nlist}", nlist * dim * 4


def _flat(n: int, dim: int, reason: str) -> IndexPlan:
    return IndexPlan("flat", "Flat", n, dim, 0, 0, 0, 0, 0, n * (4 * dim + ID_BYTES), 0,
                     "", (), (1,), reason)


def _hnsw(n: int, dim: int, reason: str) -> IndexPlan:
    # level-0 links (2M int32) plus ~10% upper levels, the vectors, level table and ids
    per_row = 4 * dim + ID_BYTES + int(2 * HNSW_M * 4 * 1.1) + 12
    sweep = sweep_grid(*EF_SEARCH_RANGE)
    return IndexPlan("hnsw", f"HNSW{HNSW_M},Flat", n, dim, 0, 0, HNSW_M, 0, 0, n * per_row, 0,
                     "efSearch", sweep, (1,), reason)


def _ivf_flat(n: int, dim: int, reason: str) -> IndexPlan:
    nlist = _nlist(n)
    train = _train_size(n, nlist, 0)
    coarse, coarse_bytes = _coarse(nlist, dim)
    mem = n * (4 * dim + ID_BYTES) + coarse_bytes
    return IndexPlan("ivf-flat", f"{coarse},Flat", n, dim, nlist, 0, 0, 0, train, mem,
                     train * dim * 4, "nprobe", _nprobe_sweep(nlist), (1,), reason)


def _ivf_sq8(n: int, dim: int, reason: str) -> IndexPlan:
    nlist = _nlist(n)
    train = _train_size(n, nlist, 0)
    coarse, coarse_bytes = _coarse(nlist, dim)
    mem = n * (dim + ID_BYTES) + coarse_bytes + 2 * dim * 4     # 1 byte a dim + per-dim range
    return IndexPlan("ivf-sq8", f"{coarse},SQ8", n, dim, nlist, 0, 0, 0, train, mem,
                     train * dim * 4, "nprobe", _nprobe_sweep(nlist), (1,), reason)


def _ivf_pq(n: int, dim: int, m: int, reason: str) -> IndexPlan:
    nlist = _nlist(n)
    bits = _pq_bits(n)
    # "np": no polysemous training (only useful for Hamming pre-filtering, and slow to train)
    code = f"PQ{m}np" if bits == 8 else f"PQ{m}x{bits}np"
    coarse, coarse_bytes = _coarse(nlist, dim)
    if dim % m == 0:
        factory = f"{coarse},{code}"
        rotation = 0
    else:  # OPQ rotates into a dimension the sub-quantizers divide
        d_out = m * max(1, dim // m)
        factory = f"OPQ{m}_{d_out},{coarse},{code}"
        rotation = dim * d_out * 4
    train = _train_size(n, nlist, bits)
    code_bytes = math.ceil(m * bits / 8)
    mem = n * (code_bytes + ID_BYTES) + coarse_bytes + (1 << bits) * dim * 4 + rotation
    return IndexPlan("ivf-pq", factory, n, dim, nlist, m, 0, 10 * RERANK_FACTORS[1], train, mem,
                     train * dim * 4, "nprobe", _nprobe_sweep(nlist), RERANK_FACTORS, reason)


def _train_floor(plan: IndexPlan) -> int:
    """Fewest training vectors worth using: 10 per list and 10 per PQ centroid."""
    if not plan.needs_training:
        return 0
    per_code = 10 * (1 << _pq_bits(plan.n)) if plan.kind == "ivf-pq" else 0
    return min(plan.train_size, max(MIN_TRAIN_PER_LIST * plan.nlist, per_code))


def _needed(plan: IndexPlan) -> int:
    return plan.memory_bytes + _train_floor(plan) * plan.dim * 4


def _fit(plan: IndexPlan, budget: int) -> IndexPlan | None:
    """The plan, with its training sample shrunk if that makes it fit; None if nothing does."""
    if plan.memory_bytes + plan.train_bytes <= budget:
        return plan
    if _needed(plan) > budget:
        return None
    room = (budget - plan.memory_bytes) // (plan.dim * 4)
    return replace(plan, train_size=int(room), train_bytes=int(room) * plan.dim * 4)


def _first_fitting(plans: list[IndexPlan], budget: int,
                   refusal: Callable[[IndexPlan], str]) -> IndexPlan:
    """The first of ``plans`` (in order of preference) that fits ``budget``, shrunk if need be;
    BudgetError(``refusal(smallest plan)``) when none does."""
    for plan in plans:
        fitted = _fit(plan, budget)
        if fitted is not None:
            return fitted
    raise BudgetError(refusal(min(plans, key=_needed)))


def _needed_mb(plan: IndexPlan) -> int:
    return math.ceil(_needed(plan) / (1 << 20))


def _check(n: int, dim: int, target_recall: float, kind: str = "auto") -> None:
    if kind not in KINDS:
        raise VectorIndexError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if n <= 0:
        raise VectorIndexError(f"cannot plan an index for {n} rows; the store is empty")
    if dim <= 0:
        raise VectorIndexError(f"cannot plan an index for dim {dim}")
    if not 0.0 < target_recall <= 1.0:
        raise VectorIndexError(f"target recall must be in (0, 1], got {target_recall}")


def _pq_plans(n: int, dim: int) -> list[IndexPlan]:
    pqs = []
    for m in _pq_m_options(dim):
        plan = _ivf_pq(n, dim, m, "")
        pqs.append(replace(plan, reason=f"IVF-PQ{m} + exact re-ranking of the top candidates:"
                                        f" {format_bytes(plan.memory_bytes)} for {n:,} rows"))
    return pqs


def _nothing_fits(n: int, dim: int, budget: int) -> Callable[[IndexPlan], str]:
    return lambda p: (
        f"no index for {n:,} x {dim} fits a memory budget of {format_bytes(budget)}; the smallest"
        f" ({p.factory}) needs {format_bytes(_needed(p))}: raise --memory-budget to at least"
        f" {_needed_mb(p)}M")


def plan_candidates(n: int, dim: int, memory_budget_bytes: int, target_recall: float = 0.95,
                    gpus: int = 0) -> list[IndexPlan]:
    """Every configuration worth measuring for ``n`` x ``dim`` that fits the budget (training
    samples shrunk if need be): Flat, HNSW32 (up to HNSW_MAX_ROWS), IVF-Flat, IVF-SQ8 and the
    largest IVF-PQ that fits (re-ranked exactly from the store), plus GPU copies of all but
    HNSW when ``gpus > 0``. Below EXACT_MAX_ROWS only Flat (when it fits): nothing beats exact
    search worth measuring there. BudgetError (one line, with the minimum) when none fits."""
    _check(n, dim, target_recall)
    budget = int(memory_budget_bytes)
    if n < EXACT_MAX_ROWS:
        flat = _fit(_flat(n, dim, f"exact search: {n:,} rows is below {EXACT_MAX_ROWS:,}"), budget)
        if flat is not None:
            return [flat]
    why = "measured fastest at the target recall on a sample"
    wanted = [_flat(n, dim, why)]
    if n <= HNSW_MAX_ROWS:
        wanted.append(_hnsw(n, dim, why))
    wanted += [_ivf_flat(n, dim, why), _ivf_sq8(n, dim, why)]
    fitted = [p for p in (_fit(plan, budget) for plan in wanted) if p is not None]
    pqs = _pq_plans(n, dim)
    pq = next((p for p in (_fit(plan, budget) for plan in pqs) if p is not None), None)
    if pq is not None:
        fitted.append(replace(pq, reason=why))
    if not fitted:
        raise BudgetError(_nothing_fits(n, dim, budget)(min(wanted + pqs, key=_needed)))
    if gpus > 0:
        fitted += [replace(p, gpu=True) for p in fitted if p.kind in GPU_KINDS]
    return fitted


def sample_size(n: int, n_queries: int, plans: list[IndexPlan], dim: int,
                memory_budget_bytes: int) -> int:
    """Rows the chooser indexes per candidate: max(SAMPLE_MIN, SAMPLE_PER_LIST * the largest
    full-size nlist), capped by SAMPLE_MAX, by the rows left once the queries are held out, and
    by half the budget as float32 (the sample is held while candidates are measured)."""
    nlist = max((p.nlist for p in plans), default=0)
    want = max(SAMPLE_MIN, SAMPLE_PER_LIST * nlist)
    room = max(1, int(memory_budget_bytes) // 2 // (4 * dim))
    return max(1, min(n - n_queries, want, SAMPLE_MAX, room))


def pick(measured: list[dict], target_recall: float) -> int:
    """Index of the winner among measured candidates (dicts with ``recall``, ``qps`` and
    ``memory_bytes``): the fastest with recall >= target, a tie (QPS within TIE) going to the
    least memory; when none meets it, the highest recall (then the fastest). A candidate's
    ``predicted_recall`` (its full-size recall, when the sample's is known not to carry over:
    HNSW) stands in for ``recall`` where present."""
    if not measured:
        raise VectorIndexError("no candidate index was measured")
    recall = [c.get("predicted_recall", c["recall"]) for c in measured]
    met = [i for i, r in enumerate(recall) if r >= target_recall]
    if not met:
        return max(range(len(measured)), key=lambda i: (recall[i], measured[i]["qps"]))
    best = max(measured[i]["qps"] for i in met)
    close = [i for i in met if measured[i]["qps"] >= (1.0 - TIE) * best]
    return min(close, key=lambda i: (measured[i]["memory_bytes"], -measured[i]["qps"]))


def prediction_held(row: dict, target_recall: float) -> bool:
    """Whether the chosen candidate, built at full size (``row``'s ``full_recall`` at the
    sample's parameters, ``full_qps`` once tuned), kept the sample's prediction well enough to
    trust the pick: it met the target at the sample's parameters and reached at least
    SHORTFALL of its predicted QPS. When not (an HNSW graph's recall falls as it grows), the
    other candidates' predictions are checked by building the fastest of them."""
    return row["full_recall"] >= target_recall and row["full_qps"] >= SHORTFALL * row["qps"]


def plan_index(n: int, dim: int, memory_budget_bytes: int, target_recall: float = 0.95,
               kind: str = "auto") -> IndexPlan:
    """The index to build for ``n`` rows of ``dim`` within a budget (index + float32 training
    sample, which a tight budget shrinks down to 10 vectors per list).

    ``kind="auto"`` here is the static plan, from sizes alone (``build_index(kind="auto")``
    measures ``plan_candidates`` instead unless ``measure=False``): Flat below FLAT_MAX_ROWS;
    above, HNSW32 when the target is within its ceiling, IVF-Flat when the target is near
    exact, else IVF-PQ with exact re-ranking (the largest code that fits). Raises BudgetError
    (one line, with the minimum needed) when nothing fits.
    """
    _check(n, dim, target_recall, kind)
    budget = int(memory_budget_bytes)
    pqs = _pq_plans(n, dim)
    if kind != "auto":
        forced = {"flat": [_flat(n, dim, "kind=flat requested")],
                  "hnsw": [_hnsw(n, dim, "kind=hnsw requested")],
                  "ivf-flat": [_ivf_flat(n, dim, "kind=ivf-flat requested")],
                  "ivf-sq8": [_ivf_sq8(n, dim, "kind=ivf-sq8 requested")],
                  "ivf-pq": pqs}[kind]
        return _first_fitting(forced, budget, lambda p: (
            f"kind={kind} ({p.factory}) for {n:,} x {dim} needs {format_bytes(_needed(p))} but the"
            f" memory budget is {format_bytes(budget)}; raise --memory-budget to at least"
            f" {_needed_mb(p)}M or choose another kind"))

    wanted: list[IndexPlan] = []
    if n < FLAT_MAX_ROWS:
        wanted.append(_flat(n, dim, f"exact search: {n:,} rows is below {FLAT_MAX_ROWS:,}"))
    if target_recall <= HNSW_RECALL_CEILING and n <= HNSW_MAX_ROWS:
        wanted.append(_hnsw(n, dim, f"HNSW{HNSW_M}: target recall {target_recall} is within its"
                                    f" ceiling (~{HNSW_RECALL_CEILING}) and it is fastest per query"))
    if target_recall >= IVF_FLAT_MIN_RECALL:
        wanted.append(_ivf_flat(n, dim, f"IVF-Flat: target recall {target_recall} needs exact"
                                        " codes"))
    wanted.extend(pqs)
    return _first_fitting(wanted, budget, _nothing_fits(n, dim, budget))


def fits_in_memory(n: int, dim: int, memory_budget_bytes: int, target_recall: float = 0.95,
                   kind: str = "auto") -> bool:
    """Whether some in-memory index of ``kind`` fits the budget (auto: any candidate). When none
    does, ``build_index(on_disk=None)`` builds the on-disk IVF instead (``plan_on_disk``)."""
    try:
        if kind == "auto":
            plan_candidates(n, dim, memory_budget_bytes, target_recall)
        else:
            plan_index(n, dim, memory_budget_bytes, target_recall, kind)
    except BudgetError:
        return False
    return True


def _on_disk_m(dim: int) -> int:
    """PQ bytes per code on disk: the largest choice up to dim / ON_DISK_DIMS_PER_SUB (codes
    cost disk there, and finer codes need less re-ranking: 256-d at PQ16 missed 0.95 at
    nprobe 1024 x 400 re-ranked candidates)."""
    cap = max(PQ_M_CHOICES[0], dim // ON_DISK_DIMS_PER_SUB)
    return next(m for m in reversed(PQ_M_CHOICES) if m <= cap and m <= dim)


def plan_on_disk(n: int, dim: int, memory_budget_bytes: int, target_recall: float = 0.95,
                 kind: str = "auto") -> IndexPlan:
    """An IVF whose inverted lists (codes + ids) live in an ``.ivfdata`` file, memory-mapped at
    search time, for stores whose vectors, or even codes, exceed the budget. ``auto``: IVF-PQ
    with a fine code (dim / 4 bytes, up to 128: the codes cost disk, not RAM) and exact re-ranking
    from the store. What must fit the budget is what stays resident while building: the coarse
    centroids, the codebooks, the float32 training sample (shrunk down to 10 rows per list if
    need be) and one shard of codes (``shard_rows``: at most a quarter of the budget, and what
    the rest leaves)."""
    _check(n, dim, target_recall, kind)
    if kind not in ON_DISK_KINDS:
        raise VectorIndexError(f"an on-disk index is an inverted file; kind={kind} keeps every "
                               f"vector in memory: choose --kind {' | '.join(ON_DISK_KINDS)}")
    budget = int(memory_budget_bytes)
    why = (f"on disk: inverted lists memory-mapped from STORE/index, {n:,} x {dim} trained on a "
           "sample and added shard by shard")
    plan = {"ivf-flat": lambda: _ivf_flat(n, dim, why), "ivf-sq8": lambda: _ivf_sq8(n, dim, why),
            }.get(kind, lambda: _ivf_pq(n, dim, _on_disk_m(dim), why))()
    per_row = {"ivf-flat": 4 * dim, "ivf-sq8": dim}.get(plan.kind, math.ceil(plan.m * _pq_bits(n) / 8))
    per_row += ID_BYTES
    disk = n * per_row
    resident = plan.memory_bytes - disk            # centroids, codebooks, rotation
    room = budget - resident - _train_floor(plan) * dim * 4     # what the shard may take
    shard = max(1, min(SHARD_MAX_ROWS, n, (budget // 4) // per_row, room // per_row))
    plan = replace(plan, on_disk=True, disk_bytes=disk, shard_rows=shard,
                   memory_bytes=resident + shard * per_row)
    return _first_fitting([plan], budget, lambda p: (
        f"an on-disk {p.factory} for {n:,} x {dim} still needs {format_bytes(_needed(p))} "
        f"resident (centroids, codebooks, training sample) but the memory budget is "
        f"{format_bytes(budget)}; raise --memory-budget to at least {_needed_mb(p)}M"))

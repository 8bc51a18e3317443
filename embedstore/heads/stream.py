"""Training data that stays in the store: rows and views read on demand, in an order that reads
nearby ids together, with the next batches prepared in a background thread.

``LazyRows`` stands in for an (n, dim) embedding matrix (``X[rows]`` gives another one, nothing
is read until ``read``); ``LazyViews`` for a ``ViewBank`` (where each view lives, not its
embedding). ``stream_budget`` decides whether a training set fits a memory budget; when it does
not, ``train_head`` trains through :mod:`.stream_train`. ``locality_order`` arranges an epoch's
rows in shuffled blocks of consecutive ids; ``Prefetcher`` runs a batch generator ahead in a
thread and re-raises its errors in the caller.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

import numpy as np

from .augment import ViewBank
from ..errors import HeadError
from ..sizes import parse_size, physical_memory, rows_per_pass
from ..store.protocol import StoreLike

__all__ = ["LazyRows", "LazyViews", "default_memory_budget", "resolve_budget", "in_ram_bytes",
           "stream_budget", "scan_rows", "locality_order", "Prefetcher", "DEFAULT_BUDGET_FRACTION"]

DEFAULT_BUDGET_FRACTION = 0.25     # --memory-budget default: this share of the machine's RAM
Reader = Callable[[np.ndarray], np.ndarray]
T = TypeVar("T")


def default_memory_budget(fraction: float = DEFAULT_BUDGET_FRACTION) -> int:
    """``fraction`` of physical memory in bytes (8 GiB assumed where the OS does not say)."""
    return max(1, int(physical_memory() * fraction))


def resolve_budget(value: int | str | None) -> int:
    """Bytes of a ``--memory-budget`` value ("8G", 512000000); None: the default fraction of RAM."""
    return default_memory_budget() if value is None else parse_size(value)


def in_ram_bytes(n_rows: int, n_views: int, dim: int, itemsize: int) -> int:
    """What the in-RAM path holds: the gathered rows and views in the store's dtype, their float32
    standardised copies, and one epoch's augmented float32 matrix."""
    return (n_rows + n_views) * dim * (itemsize + 4) + n_rows * dim * 4


def scan_rows(budget: int, dim: int, itemsize: int = 4) -> int:
    """Rows read at once by a pass over a set (statistics, scoring): :func:`sizes.rows_per_pass`."""
    return rows_per_pass(budget, dim, itemsize)


def _unique_read(read: Reader, ids: np.ndarray, dim: int, dtype: np.dtype[Any]) -> np.ndarray:
    """``read(ids)`` with each id read once, in increasing order, whatever the order given."""
    if ids.size == 0:
        return np.empty((0, dim), dtype=dtype)
    uniq, inverse = np.unique(ids, return_inverse=True)
    rows = np.asarray(read(uniq))
    return rows[inverse.reshape(-1)] if uniq.size != ids.size or not np.array_equal(uniq, ids) else rows


class LazyRows:
    """(n, dim) embedding rows read on demand: row ``i`` is the row with id ``ids[i]``.

    ``of_store``: ids are store ids, read with ``store.gather``; ``of_array``: ids are row
    positions of an array (an ``np.memmap`` stays on disk). ``chunk_rows``: rows a pass reads at once.
    """
    ndim = 2

    def __init__(self, ids: np.ndarray, read: Reader, dim: int, dtype: np.dtype[Any], *,
                 chunk_rows: int = 65536, name: str = "embeddings") -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self._read, self.dim, self.dtype = read, int(dim), np.dtype(dtype)
        self.chunk_rows, self.name = max(1, int(chunk_rows)), name

    @classmethod
    def of_store(cls, store: StoreLike, ids: np.ndarray, *, chunk_rows: int = 65536) -> "LazyRows":
        return cls(ids, lambda i: np.asarray(store.gather(i)), store.dim, store.dtype,
                   chunk_rows=chunk_rows, name=f"embeddings in store {str(store.path)!r}")

    @classmethod
    def of_array(cls, emb: np.ndarray, *, chunk_rows: int = 65536) -> "LazyRows":
        if emb.ndim != 2:
            raise HeadError(f"embeddings must be (n, dim), got shape {emb.shape}")
        return cls(np.arange(emb.shape[0]), lambda i: np.asarray(emb[i]), emb.shape[1], emb.dtype,
                   chunk_rows=chunk_rows)

    def with_chunks(self, chunk_rows: int) -> "LazyRows":
        """The same rows, read ``chunk_rows`` at a time by a pass."""
        if chunk_rows == self.chunk_rows:
            return self
        return LazyRows(self.ids, self._read, self.dim, self.dtype, chunk_rows=chunk_rows, name=self.name)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.ids.size), self.dim

    def __len__(self) -> int:
        return int(self.ids.size)

    def __getitem__(self, rows: np.ndarray) -> "LazyRows":
        """The rows at positions ``rows`` (an index array), still unread."""
        return LazyRows(self.ids[np.asarray(rows)], self._read, self.dim, self.dtype,
                        chunk_rows=self.chunk_rows, name=self.name)

    def read(self, pos: np.ndarray) -> np.ndarray:
        """(len(pos), dim) rows at positions ``pos`` in the order given (repeats allowed); the
        read itself goes in increasing id order."""
        return _unique_read(self._read, self.ids[np.asarray(pos, dtype=np.int64)], self.dim, self.dtype)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(pos, rows)`` for consecutive blocks of ``chunk_rows`` positions."""
        for a in range(0, len(self), self.chunk_rows):
            pos = np.arange(a, min(a + self.chunk_rows, len(self)))
            yield pos, self.read(pos)

    def materialise(self) -> np.ndarray:
        """Every row at once (the in-RAM path, when the set fits the budget)."""
        return self.read(np.arange(len(self)))


@dataclass(frozen=True)
class LazyViews:
    """The views of a set of rows, laid out like a ``ViewBank`` (row ``i`` has views
    ``offsets[i]:offsets[i+1]``) but holding where each view lives (``src``), not its embedding."""
    ids: np.ndarray        # (n,) int64 tile id of each row
    offsets: np.ndarray    # (n + 1,) int64 CSR offsets, one segment per row
    base_ids: np.ndarray   # (m,) int64 tile id of each view
    src: np.ndarray        # (m,) int64 what ``read`` takes for each view
    read: Reader           # src -> (k, dim) view embeddings

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_bank(cls, bank: ViewBank) -> "LazyViews":
        return cls(bank.ids, bank.offsets, bank.base_ids, np.arange(bank.emb.shape[0]),
                   lambda p: np.asarray(bank.emb[p]))

    @classmethod
    def of_store(cls, store: Any, ids: np.ndarray) -> "LazyViews | None":
        """The views ``store.views()`` holds of the tiles ``ids`` (None when there are none);
        only index arrays are read. (``store``: Any, it reads ``views()``.)"""
        bank = store.views()
        if isinstance(bank, tuple):
            view_ids, _num, view_emb = bank
            read: Reader = lambda j: np.asarray(view_emb[j])  # noqa: E731
        else:
            view_ids, read = bank.ids, bank.gather
        view_ids = np.asarray(view_ids, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        if np.unique(ids).size != ids.size:
            raise HeadError("tile ids repeat; each tile may appear once in a view bank")
        j = np.flatnonzero(np.isin(view_ids, ids))
        if j.size == 0:
            return None
        order = j[np.argsort(view_ids[j], kind="stable")]
        lo = np.searchsorted(view_ids[order], ids, side="left")
        counts = np.searchsorted(view_ids[order], ids, side="right") - lo
        offsets = np.zeros(ids.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        src = order[np.repeat(lo - offsets[:-1], counts) + np.arange(offsets[-1])]
        return cls(ids, offsets, view_ids[src], src, read)

    def take(self, rows: np.ndarray) -> "LazyViews":
        """The views of a subset of rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.counts[rows]
        offsets = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        pos = np.repeat(self.offsets[rows] - offsets[:-1], counts) + np.arange(offsets[-1])
        return LazyViews(self.ids[rows], offsets, self.base_ids[pos], self.src[pos], self.read)

    def read_views(self, k: np.ndarray, dim: int, dtype: np.dtype[Any]) -> np.ndarray:
        """(len(k), dim) embeddings of views ``k`` (positions in this layout)."""
        return _unique_read(self.read, self.src[np.asarray(k, dtype=np.int64)], dim, dtype)

    def materialise(self, dim: int, dtype: np.dtype[Any]) -> ViewBank:
        return ViewBank(self.ids, self.read_views(np.arange(self.src.size), dim, dtype),
                        self.offsets, self.base_ids)


def stream_budget(X: np.ndarray | LazyRows, views: ViewBank | LazyViews | None, use_views: bool,
                  memory_budget: int | str | None) -> int | None:
    """The budget in bytes when training on ``X`` (and its views) in RAM would exceed it, else
    None (train in RAM). ``memory_budget=None``: arrays train in RAM as always; ``LazyRows`` get
    the default fraction of RAM."""
    if memory_budget is None and not isinstance(X, LazyRows):
        return None
    budget = resolve_budget(memory_budget)
    n_views = 0
    if use_views and views is not None:
        n_views = int(views.src.size if isinstance(views, LazyViews) else views.emb.shape[0])
    need = in_ram_bytes(X.shape[0], n_views, X.shape[1], np.dtype(X.dtype).itemsize)
    return budget if need > budget else None


def locality_order(ids: np.ndarray, pos: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    """``pos`` (positions into ``ids``, repeats allowed) arranged in blocks of ``block``
    consecutive rows by id, the blocks in a random order, by id within a block; the caller
    shuffles within each window of blocks it reads."""
    rank = np.empty(ids.size, dtype=np.int64)
    rank[np.argsort(ids, kind="stable")] = np.arange(ids.size)
    r = rank[pos]
    shuffled = rng.permutation(-(-ids.size // block))[r // block]
    return pos[np.lexsort((r, shuffled))]


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()


class Prefetcher(Generic[T]):
    """Iterate ``items`` in a background thread at most ``depth`` items ahead of the consumer.
    An exception raised there is raised here; leaving the loop early stops the thread."""

    def __init__(self, items: Iterator[T], depth: int = 3) -> None:
        self.items, self.depth = items, max(1, depth)

    def __iter__(self) -> Iterator[T]:
        q: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self.items:
                    if not put(item):
                        return
            except BaseException as e:       # handed to the consumer, raised there
                put(_Failure(e))
                return
            put(_END)

        thread = threading.Thread(target=produce, name="embedstore-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()

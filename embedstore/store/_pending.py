"""Rows handed to ``StoreWriter.add``: checked, screened for duplicate keys, and held per unit
until they are written into a shard.

Built for speed: the embeddings are copied once, straight into blocks of the batch size in the
store dtype (each block becomes one record batch: no concatenation later); every metadata
column becomes Arrow arrays when it arrives (numpy arrays and lists converted in C, a scalar
repeated), never a Python list per row.
"""
from __future__ import annotations

import threading
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pyarrow as pa

from ..errors import ConfigError, DimensionMismatchError, DuplicateKeyError, ShapeError, WriterError
from .catalog import Catalog
from .schema import META_COLUMNS

__all__ = ["Pending", "BlockPool", "is_seq", "meta_column", "slide_runs", "take_rows", "check_rows", "screen_keys"]


def is_seq(v: Any) -> TypeGuard[Collection[Any]]:
    """Whether a metadata value is one value per row (else one value for all rows)."""
    return isinstance(v, (list, tuple, np.ndarray, pa.Array))


def meta_column(name: str, v: Any, n: int, unit: str | None = None) -> pa.Array:
    """Metadata column ``name`` of n rows from what ``add`` was given: None, one value for
    all rows, or a sequence of n (list, tuple, numpy or Arrow array)."""
    typ = META_COLUMNS[name]
    if is_seq(v) and len(v) != n:
        raise ShapeError(f"metadata column {name!r} has {len(v)} values for {n} rows")
    try:
        if v is None:
            return pa.nulls(n, typ)
        if isinstance(v, pa.Array):
            return v if v.type == typ else v.cast(typ)
        if is_seq(v):
            return pa.array(v, typ)
        return pa.repeat(pa.scalar(v, typ), n)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as e:
        raise WriterError(f"unit {unit!r}: bad metadata column {name!r} ({str(e).splitlines()[0]})") from e


def slide_runs(slides: pa.Array | pa.ChunkedArray, first: int) -> list[list[Any]]:
    """[slide, first + start, count] for each run of consecutive rows of one slide (rows
    without a slide are in none): what the catalog's slide -> ids map is made of."""
    if isinstance(slides, pa.ChunkedArray):
        slides = slides.combine_chunks()
    if len(slides) == 0:
        return []
    enc = slides.dictionary_encode()
    idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(idx[1:] != idx[:-1]) + 1])
    ends = np.append(starts[1:], len(idx))
    names = enc.dictionary.to_pylist()
    return [[names[idx[a]], first + a, b - a] for a, b in zip(starts.tolist(), ends.tolist()) if idx[a] >= 0]


class BlockPool:
    """Embedding blocks given back once written and handed out again, so that a writer copies
    every unit into the same memory rather than into fresh pages (which a busy or virtual
    machine is slow to hand over). Keeps at most ``keep`` idle blocks."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, rows: int, dim: int, dtype: np.dtype[Any]) -> np.ndarray:
        with self._lock:
            for i, b in enumerate(self._free):
                if b.shape == (rows, dim) and b.dtype == dtype:
                    return self._free.pop(i)
        return np.empty((rows, dim), dtype)

    def give(self, blocks: list[np.ndarray]) -> None:
        """Take back blocks nothing refers to any more (their rows are written)."""
        with self._lock:
            self._free.extend(blocks[:max(self.keep - len(self._free), 0)])


class Pending:
    """Rows of one unit not yet written to a file: ``blocks`` of ``block_rows`` embeddings
    (the last one partly filled; from ``pool`` when given), the metadata columns as Arrow
    chunks, views per add."""

    def __init__(self, dim: int, dtype: str, block_rows: int, pool: BlockPool | None = None) -> None:
        self.dim, self.dtype, self.block_rows = dim, np.dtype(dtype), block_rows
        self.pool = pool
        self.keys: list[str] = []
        self.kbytes: list[bytes] = []   # the keys encoded, for the commit
        self.cols: dict[str, list[pa.Array]] = {c: [] for c in META_COLUMNS}
        self.blocks: list[np.ndarray] = []
        self.views: list[np.ndarray] = []   # (n, K, dim) per add, in the store dtype
        self.rows = 0

    def extend(self, keys: list[str], kb: list[bytes], emb: np.ndarray, views: np.ndarray | None,
               meta: dict[str, Any], unit: str | None) -> None:
        """Add rows of ``keys`` (``kb``: the same encoded): ``emb`` (n, dim) and ``views``
        (n, K, dim) of any float dtype (copied here, into the store dtype); ``meta`` maps
        columns of META_COLUMNS to one value for all rows or a sequence of n."""
        n = len(keys)
        if (views is None) != (not self.views) and self.rows:
            raise ShapeError(f"unit {unit!r}: views given for some rows and not others")
        cols = {c: meta_column(c, keys if c == "key" else meta.get(c), n, unit) for c in META_COLUMNS}
        for c, a in cols.items():  # every column checked first: a bad one adds nothing
            self.cols[c].append(a)
        self._copy(emb)
        if views is not None:
            self.views.append(views.astype(self.dtype, copy=True))
        self.keys.extend(keys)
        self.kbytes.extend(kb)
        self.rows += n

    def _copy(self, emb: np.ndarray) -> None:
        """Copy ``emb`` after the rows held (converting to the store dtype)."""
        a, n = 0, len(emb)
        while a < n:
            pos = self.rows + a
            if pos == len(self.blocks) * self.block_rows:
                self.blocks.append(self.pool.get(self.block_rows, self.dim, self.dtype) if self.pool
                                   else np.empty((self.block_rows, self.dim), self.dtype))
            used = pos % self.block_rows
            m = min(n - a, self.block_rows - used)
            self.blocks[pos // self.block_rows][used:used + m] = emb[a:a + m]
            a += m

    def column(self, name: str) -> pa.Array:
        """Metadata column ``name`` of every row, one array."""
        chunks = self.cols[name]
        return chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)

    def written(self) -> None:
        """Every row is in a file now: the blocks go back to the pool."""
        if self.pool is not None:
            self.pool.give(self.blocks)
        self.blocks = []

    def batches(self) -> Iterable[tuple[int, int, np.ndarray]]:
        """(start row, end row, embeddings (end - start, dim)) per block."""
        for i, blk in enumerate(self.blocks):
            a = i * self.block_rows
            b = min(a + self.block_rows, self.rows)
            yield a, b, blk[:b - a]


def take_rows(v: Any, keep: np.ndarray) -> Any:
    """The rows of metadata value ``v`` where ``keep`` (bool (n,)) is set (a scalar as it is)."""
    if isinstance(v, pa.Array):
        return v.filter(pa.array(keep))
    if isinstance(v, np.ndarray):
        return v[keep]
    if is_seq(v):
        return [x for x, m in zip(v, keep) if m]
    return v


def check_rows(emb: Any, n: int, views: Any, meta: dict[str, Any], dim: int,
               root: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """What ``add`` was given for n keys: ``emb`` (n, dim) floating point, ``views`` (n, K, dim)
    or None, ``meta`` naming only columns of META_COLUMNS. Returns emb and views as arrays."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] != n:
        raise DimensionMismatchError(f"{root}: embeddings must be (n={n}, {dim}), got {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise DimensionMismatchError(f"embeddings must be floating point, got {emb.dtype}")
    if views is not None:
        views = np.asarray(views)
        if views.ndim != 3 or views.shape[0] != n or views.shape[2] != dim:
            raise DimensionMismatchError(f"views must be (n={n}, K, {dim}), got {views.shape}")
    unknown = set(meta) - set(META_COLUMNS)
    if unknown:
        raise ConfigError(f"unknown metadata columns {sorted(unknown)}; known: {sorted(META_COLUMNS)[1:]}")
    return emb, views


def screen_keys(cat: Catalog | None, keys: list[str], kb: list[bytes], unit: str | None,
                pending: set[str], on_duplicate: str, root: Path) -> tuple[bool, np.ndarray | None]:
    """For one ``add`` of ``keys`` (``kb``: encoded), in one catalog read (none for a staged writer, ``cat`` None): whether
    ``unit`` is done (finished by another writer: nothing else is done), else which ``keys`` to
    keep (None: all), which join ``pending`` (the writer's keys not committed yet). A key twice
    in the call is an error; one already committed or pending is an error too, or skipped with
    ``on_duplicate='skip'``."""
    found: list[bytes] = []
    if cat is not None:
        def probe(t: Any) -> tuple[bool, list[bytes]]:
            if unit is not None and t.get(unit.encode(), db=cat.db["units"]) is not None:
                return True, []
            return False, cat.present(t, kb)
        done, found = cat.read(probe)
        if done:
            return True, None
    if not found and pending.isdisjoint(keys):   # the common case: nothing to drop
        n0 = len(pending)
        pending.update(keys)
        if len(pending) - n0 == len(keys):
            return False, None
        pending.difference_update(keys)   # none was there before: a key twice in the call
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup_in = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DuplicateKeyError(f"duplicate tile key {dup_in!r} within one add() call")
    there = {k.decode() for k in found}
    dup = np.fromiter((k in there or k in pending for k in keys), bool, len(keys))
    if on_duplicate == "error":
        k = keys[int(np.argmax(dup))]
        raise DuplicateKeyError(f"tile key {k!r} is already in {root} "
                                "(keys are unique; delete it first or pass on_duplicate='skip')")
    pending.update(k for k, d in zip(keys, dup) if not d)
    return False, ~dup

"""Memory-mapped shards and the embedding matrix view over them.

A shard file is mapped once (``mmap``, read-only) and read with Arrow's IPC file reader over
that buffer, so every record batch's embedding column is a zero-copy ``(rows, dim)`` numpy view
of the page cache. A :class:`Matrix` stitches such pieces into one row-addressable matrix:
slices inside one piece are views, gathers group the wanted rows by piece.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import CorruptShardError

__all__ = ["MappedShard", "Piece", "Matrix"]


class MappedShard:
    """One shard file, memory-mapped. ``batches`` are zero-copy Arrow record batches."""

    def __init__(self, path: Path, expected_size: int | None = None) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptShardError(f"shard {path} is missing (the catalog lists it); "
                                    "run `embedstore verify` on the store") from None
        try:
            size = os.fstat(fd).st_size
            if expected_size is not None and size != expected_size:
                raise CorruptShardError(f"shard {path} is {size} bytes, the catalog recorded "
                                        f"{expected_size}: truncated or overwritten")
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)
        try:
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self.mm)))
            self.schema = reader.schema
            self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except (pa.ArrowInvalid, TypeError) as e:
            raise CorruptShardError(f"shard {path} is not a readable Arrow file ({e})") from None
        self.rows = sum(b.num_rows for b in self.batches)

    def advise(self, advice: int) -> None:
        if self.mm is not None and hasattr(self.mm, "madvise"):
            self.mm.madvise(advice)


def embedding_view(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    """The ``embedding`` column of a batch as a zero-copy (rows, dim) array."""
    col = batch.column(batch.schema.get_field_index("embedding"))
    assert col.offset == 0 and col.null_count == 0
    flat = col.values.to_numpy(zero_copy_only=True)
    return flat[: batch.num_rows * dim].reshape(batch.num_rows, dim)


@dataclass
class Piece:
    """A contiguous block of matrix rows: one record batch of one shard."""
    start: int                 # position of the first row in the matrix
    emb: np.ndarray            # (rows, dim) zero-copy view
    batch: pa.RecordBatch      # the batch's columns (metadata)
    shard: MappedShard

    @property
    def stop(self) -> int:
        return self.start + self.emb.shape[0]


class Matrix:
    """Row-addressable ``(n, dim)`` view over pieces; nothing is loaded until rows are read.

    ``m[i:j]`` is a zero-copy view when the rows lie in one piece; ``m[rows]`` (int array) and
    ``m.take(rows)`` gather; ``m.batches(size)`` scans in order; ``np.asarray(m)`` loads it all.
    """

    def __init__(self, pieces: Sequence[Piece], dim: int, dtype: np.dtype) -> None:
        self.pieces = list(pieces)
        self.dim, self.dtype = dim, np.dtype(dtype)
        self.starts = np.array([p.start for p in self.pieces] + [self.pieces[-1].stop if self.pieces else 0],
                               dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    @property
    def nbytes(self) -> int:
        return len(self) * self.dim * self.dtype.itemsize

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self[0:len(self)]
        return out.astype(dtype) if dtype is not None else out

    def __getitem__(self, idx: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (len(self) if idx < 0 else 0)
            return self.take(np.array([i]))[0]
        if isinstance(idx, slice):
            a, b, step = idx.indices(len(self))
            if step != 1:
                return self.take(np.arange(a, b, step))
            return self._slice(a, b)
        return self.take(np.asarray(idx, dtype=np.int64))

    def _slice(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.empty((0, self.dim), self.dtype)
        k = int(np.searchsorted(self.starts, a, side="right")) - 1
        p = self.pieces[k]
        if b <= p.stop:
            return p.emb[a - p.start: b - p.start]
        out = np.empty((b - a, self.dim), self.dtype)
        o = 0
        while a < b:
            p = self.pieces[k]
            n = min(b, p.stop) - a
            out[o:o + n] = p.emb[a - p.start: a - p.start + n]
            o, a, k = o + n, a + n, k + 1
        return out

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sort ``rows`` and split them by piece: (order, sorted rows, group bounds, piece per group)."""
        if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
            order = np.argsort(rows, kind="stable")
            srows = rows[order]
        else:
            order, srows = None, rows  # type: ignore[assignment]
        piece = np.searchsorted(self.starts, srows, side="right") - 1
        cut = np.flatnonzero(piece[1:] != piece[:-1]) + 1
        bounds = np.concatenate([[0], cut, [len(srows)]])
        return order, srows, bounds, piece  # type: ignore[return-value]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Gather rows by position: (len(rows), dim) copy in the store dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(self)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row out of range [0, {n})")
        if len(self.pieces) == 1:
            return np.take(self.pieces[0].emb, rows, axis=0)
        order, srows, bounds, piece = self.locate(rows)
        out = np.empty((rows.size, self.dim), self.dtype)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:
                continue
            p = self.pieces[piece[a]]
            np.take(p.emb, srows[a:b] - p.start, axis=0, out=out[a:b])
        if order is None:
            return out
        res = np.empty_like(out)
        res[order] = out
        return res

    def batches(self, batch_size: int = 65536, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, zero-copy block) in order; blocks never straddle pieces."""
        stop = len(self) if stop is None else stop
        for p in self.pieces:
            a, b = max(start, p.start), min(stop, p.stop)
            for s in range(a, b, batch_size):
                e = min(s + batch_size, b)
                yield s, p.emb[s - p.start: e - p.start]

    def advise(self, advice: int) -> None:
        seen = set()
        for p in self.pieces:
            if id(p.shard) not in seen:
                seen.add(id(p.shard))
                p.shard.advise(advice)

"""Memory-mapped shards and the embedding matrix view over them.

A shard file is mapped once (``mmap``, read-only) and read with Arrow's IPC file reader over
that buffer, so every record batch's embedding column is a zero-copy ``(rows, dim)`` numpy view
of the page cache. A :class:`Matrix` stitches such pieces into one row-addressable matrix:
slices inside one piece are views, gathers group the wanted rows by piece.

Sparse gathers do not go through the mapping. A page fault on a mapped file maps far more
than the page it needs: 16 pages of fault-around, or, where the page cache holds the file in
2 MB folios (large folios, the default for ext4/xfs on recent kernels), the whole 2 MB folio.
10,000 random rows of a 7.5 GB store thus mapped ~6 GB into the process (``RssFile``) to
return 15 MB. Rows far apart are read with ``preadv`` from a second descriptor of the shard
(one call per run of adjacent rows), straight into the rows of the result: nothing is mapped,
the process grows by the rows it returns, and no bytes object is made per row (a warm 10k-row
gather of 1M x 768 float16 is then ~1 syscall per row, on par with a numpy memmap's first
gather). Rows dense enough that most of their span is wanted anyway are copied from the map.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import CorruptShardError, RowRangeError
from ..sizes import physical_memory
from . import uring

__all__ = ["MappedShard", "Piece", "Matrix"]

PREFETCH_MIN_ROWS = 16   # gathers at least this large check whether their rows are cached
# A piece's rows are copied from the map when their bytes times DENSE cover the span they lie
# in plus MAP_SLACK (the folios a fault may map beyond it); else they are read with pread.
DENSE = 8
MAP_SLACK = 4 << 20
# a cold scan keeps up to this many block reads in flight (a deeper queue: the disk measured
# 0.33-0.62 GB/s with one, 0.73-0.82 with four, bench_archive's 10M store), within READ_AHEAD_BYTES
READ_AHEAD, READ_AHEAD_BYTES = 4, 256 << 20
URING_MIN_ROWS = 64      # sparse reads of at least this many rows go through io_uring (uring.py)
IOV_MAX = 1024           # buffers one preadv call takes (POSIX's minimum IOV_MAX is 16; Linux: 1024)
_MINCORE: Any = None


def _mincore() -> Any:
    """libc's ``mincore`` (None where unavailable)."""
    global _MINCORE
    if _MINCORE is None:
        try:
            f = ctypes.CDLL(None, use_errno=True).mincore
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], ctypes.c_int
            _MINCORE = f
        except (OSError, AttributeError, TypeError):
            _MINCORE = False
    return _MINCORE or None


class MappedShard:
    """One shard file, memory-mapped. ``batches`` are zero-copy Arrow record batches."""

    def __init__(self, path: Path, expected_size: int | None = None) -> None:
        self.path = path
        self.fd: int | None = None   # a second descriptor, for positional reads of sparse rows
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
            if size:
                self.fd = _reopen(fd)
        finally:
            os.close(fd)
        # address of the mapping: a row's offset in the file is its address minus this
        self.base = (np.frombuffer(self.mm, np.uint8).__array_interface__["data"][0]
                     if self.mm is not None else 0)
        # Opening reads the footer and every batch header: a few pages spread over the file.
        # With the default advice each first touch of a cold page reads a whole readahead
        # window around it (read_ahead_kb, often megabytes), so a cold open would read much
        # of the shard; random advice reads just those pages. Normal advice is restored after.
        self.advise(getattr(mmap, "MADV_RANDOM", None))
        try:
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self.mm)))
            self.schema = reader.schema
            self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except (pa.ArrowInvalid, OSError, TypeError) as e:  # OSError: a corrupt footer
            raise CorruptShardError(f"shard {path} is not a readable Arrow file ({e})") from None
        finally:
            self.advise(getattr(mmap, "MADV_NORMAL", None))
        self.rows = sum(b.num_rows for b in self.batches)

    def open_for_scan(self) -> int:
        """A new descriptor for one block read of a cold scan (the caller closes it), with
        sequential advice: the kernel's readahead runs ahead within the block. The sparse
        gathers' descriptor keeps random advice (there a readahead window would be read per
        row), and each block read gets its own file description because the reads in flight
        at once would share one's readahead state and look random to it. 10M store, first
        6 GB cold, three interleaved runs: the gathers' descriptor 0.35/0.43 GB/s (numpy memmap
        0.42/0.36), one shared sequential descriptor 0.56/0.49/0.36, one per read 0.73/0.64/0.67."""
        if self.fd is None:
            raise CorruptShardError(f"shard {self.path} is empty: no rows to read")
        return _reopen(self.fd, "POSIX_FADV_SEQUENTIAL")

    def __del__(self) -> None:
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def row_ids(self, first_id: int) -> np.ndarray:
        """(rows,) int64 ids of the rows: a compacted shard's ``id`` column, else consecutive
        from ``first_id`` (recorded in the catalog at commit)."""
        if "id" in self.schema.names:
            return (np.concatenate([b.column("id").to_numpy() for b in self.batches])
                    if self.batches else np.empty(0, np.int64))
        return np.arange(first_id, first_id + self.rows, dtype=np.int64)

    def advise(self, advice: int | None) -> None:
        if advice is not None and self.mm is not None and hasattr(self.mm, "madvise"):
            self.mm.madvise(advice)

    def release(self, block: np.ndarray) -> None:
        """Unmap the pages under ``block`` (a view into this shard) from the process: a shared
        read-only file mapping refaults them from the page cache when touched again."""
        dontneed = getattr(mmap, "MADV_DONTNEED", None)
        if dontneed is None or self.mm is None or not hasattr(self.mm, "madvise") or not block.nbytes:
            return
        offset = block.__array_interface__["data"][0] - self.base
        first = offset - offset % mmap.PAGESIZE
        self.mm.madvise(dontneed, first, offset + block.nbytes - first)


def _reopen(fd: int, advice: str = "POSIX_FADV_RANDOM") -> int:
    """A new descriptor (its own file description, so its own readahead state) of the file
    open as ``fd``, with ``advice``: random access (read just the pages asked for) for sparse
    gathers, sequential (a doubled readahead window) for scans; either leaves the mapping's
    readahead alone."""
    try:
        new = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    except OSError:
        new = os.dup(fd)
        return new
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(new, 0, 0, getattr(os, advice))
    return new


def _read_runs(fds: np.ndarray, offset: np.ndarray, bufs: Sequence[Sequence[memoryview]],
               nbytes: int) -> None:
    """Runs of adjacent rows read with ``preadv`` straight into the caller's array: call ``j``
    reads from descriptor ``fds[j]`` at file offset ``offset[j]`` into the buffers ``bufs[j]``
    (slices of the output, in file order). Copied from the page cache (from disk where absent),
    mapping nothing, with no intermediate bytes objects; ``nbytes``: the total expected."""
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        got = sum(map(preadv, fds.tolist(), bufs, offset.tolist()))
    else:                                            # no preadv (macOS < 11): pread and copy
        got = 0
        for f, o, views in zip(fds.tolist(), offset.tolist(), bufs):
            data = os.pread(f, sum(v.nbytes for v in views), o)
            at = 0
            for v in views:
                part = data[at:at + v.nbytes]
                v[:len(part)] = part
                at += len(part)
            got += len(data)
    if got != nbytes:
        raise CorruptShardError("a shard is shorter than its rows (truncated after it was "
                                "opened?); run `embedstore verify` on the store")


def _stretches(new_run: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stretches of sorted rows that are adjacent in the file (``new_run`` False) and
    go to consecutive rows ``dst`` of the output: (first row of each, its length in rows)."""
    seg_new = new_run.copy()
    seg_new[1:] |= np.diff(dst) != 1
    seg = np.flatnonzero(seg_new)
    return seg, np.diff(np.append(seg, new_run.size))


def _iovecs(out: np.ndarray, r: np.ndarray, dst: np.ndarray, new_run: np.ndarray,
            rb: int) -> tuple[np.ndarray, Sequence[Sequence[memoryview]]]:
    """The ``preadv`` calls that read the sorted rows ``r`` into rows ``dst`` of ``out``:
    ``(first row of each call (positions into r), its buffers)``. ``new_run`` (len(r),) marks
    the rows that do not continue the previous one in the file. A call reads one run of
    adjacent rows; its buffers are the stretches whose destinations are consecutive too, at
    most ``IOV_MAX`` per call."""
    n = r.size
    mv = out.data.cast("B")                          # out is C-contiguous

    def cut(a: np.ndarray, m: np.ndarray) -> list[memoryview]:   # mv[a:a + m], in C loops
        return list(map(mv.__getitem__, map(slice, a.tolist(), (a + m).tolist())))
    if new_run.all():                                # sparse rows: one row, one call
        a = dst * rb
        return np.arange(n), list(zip(cut(a, np.full(n, rb))))
    seg, seg_len = _stretches(new_run, dst)
    run_first = np.flatnonzero(new_run[seg])         # first stretch of each run
    rank = np.arange(seg.size) - run_first[np.cumsum(new_run[seg]) - 1]
    calls = np.flatnonzero(rank % IOV_MAX == 0)      # first stretch of each call
    views = cut(dst[seg] * rb, seg_len * rb)
    if calls.size == seg.size:                       # every call reads one stretch
        return seg, list(zip(views))
    bounds = np.append(calls, seg.size).tolist()
    return seg[calls], [views[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def embedding_view(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    """The ``embedding`` column of a batch as a zero-copy (rows, dim) array."""
    col = batch.column(batch.schema.get_field_index("embedding"))
    assert col.offset == 0 and col.null_count == 0
    flat = primitive_view(col.values)   # not values.to_numpy(): that imports pandas
    return flat[: batch.num_rows * dim].reshape(batch.num_rows, dim)


_FLOATS: dict[str, np.dtype[Any]] = {"halffloat": np.dtype(np.float16), "float": np.dtype(np.float32),
                                     "double": np.dtype(np.float64)}


def primitive_view(arr: pa.Array) -> np.ndarray:
    """A numeric Arrow array without nulls as a zero-copy numpy array, read from its buffer:
    ``Array.to_numpy`` imports pandas on first use (a quarter of a second at every open)."""
    if arr.null_count == 0 and (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        dtype: np.dtype[Any] = (_FLOATS[str(arr.type)] if pa.types.is_floating(arr.type) else
                 np.dtype(f"{'i' if pa.types.is_signed_integer(arr.type) else 'u'}{arr.type.bit_width // 8}"))
        data: Any = arr.buffers()[1]
        return np.frombuffer(data, dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
    return np.asarray(arr.to_numpy(zero_copy_only=False))


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
        # per piece: the descriptor to pread its rows from (-1: none), the file offset of its
        # first row, and whether this process has mapped all of it already (a full scan)
        self._fd = np.array([-1 if p.shard.fd is None else p.shard.fd for p in self.pieces], np.int64)
        self._off = np.array([p.emb.__array_interface__["data"][0] - p.shard.base for p in self.pieces],
                             np.int64)
        self._mapped = np.zeros(len(self.pieces), bool)
        # past a quarter of RAM, scans and dense gathers unmap what they read once it is copied
        # or consumed: the process holds what it uses, not every page it ever touched
        self.release_behind = self.nbytes > physical_memory() // 4

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
        self._mapped[:] = True
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

    def locate(self, rows: np.ndarray
               ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
        """Sort ``rows`` and split them by piece: (order, sorted rows, group bounds, piece per group).

        ``order`` is None when ``rows`` are sorted already."""
        order: np.ndarray | None
        if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
            order = np.argsort(rows, kind="stable")
            srows = rows[order]
        else:
            order, srows = None, rows
        piece = np.searchsorted(self.starts, srows, side="right") - 1
        cut = np.flatnonzero(piece[1:] != piece[:-1]) + 1
        bounds = np.concatenate([[0], cut, [len(srows)]])
        return order, srows, bounds, piece

    def take(self, rows: np.ndarray, prefetch: bool | None = None) -> np.ndarray:
        """Gather rows by position: (len(rows), dim) copy in the store dtype.

        Rows far apart are read with ``pread`` (nothing mapped: see the module's docstring),
        dense ones copied from the map. ``prefetch``: first ask the kernel for all the rows'
        pages at once (see :meth:`prefetch`). None (default): do so when a sample of those
        pages is not in the page cache (``mincore``), for gathers of at least
        ``PREFETCH_MIN_ROWS`` rows."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(self)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise RowRangeError(f"row out of range [0, {n})")
        out = np.empty((rows.size, self.dim), self.dtype)
        if not rows.size:
            return out
        order, srows, bounds, piece = self.locate(rows)
        check = prefetch or (prefetch is None and rows.size >= PREFETCH_MIN_ROWS)
        cold = bool(check and (prefetch or not self._cached(srows, piece)))
        if cold:
            self._prefetch_sorted(srows, bounds, piece)
        first, stop = bounds[:-1], bounds[1:]
        gp = piece[first]                                      # the piece of each group
        rb = self.dim * self.dtype.itemsize
        span = (srows[stop - 1] - srows[first] + 1) * rb
        by_map = (self._fd[gp] < 0) | self._mapped[gp] | ((stop - first) * rb * DENSE >= span + MAP_SLACK)
        for g in np.flatnonzero(by_map).tolist():
            a, b = int(first[g]), int(stop[g])
            p = self.pieces[gp[g]]
            if order is None:   # rows were range-checked: mode="clip" is safe and copies nothing
                np.take(p.emb, srows[a:b] - p.start, axis=0, out=out[a:b], mode="clip")
            else:
                out[order[a:b]] = p.emb[srows[a:b] - p.start]
            if self.release_behind and not self._mapped[gp[g]]:
                p.shard.release(p.emb[int(srows[a]) - p.start:int(srows[b - 1]) - p.start + 1])
        if not by_map.all():
            self._pread_into(out, srows, piece, order, ~by_map, bounds, ring=not cold)
        return out

    def _pread_into(self, out: np.ndarray, srows: np.ndarray, piece: np.ndarray,
                    order: np.ndarray | None, groups: np.ndarray, bounds: np.ndarray,
                    ring: bool = True) -> None:
        """Read the sorted rows of the ``groups`` marked with ``pread`` straight into their
        rows of ``out`` (``order[i]``: where sorted row ``i`` goes; None: in place): through
        io_uring when ``ring`` (the rows are thought cached) and there are enough of them,
        else (and for whatever the ring did not read) one ``preadv`` call per run of rows."""
        dst = np.arange(srows.size) if order is None else order
        if not groups.all():
            sel = np.repeat(groups, np.diff(bounds))
            srows, piece, dst = srows[sel], piece[sel], dst[sel]
        rb = self.dim * self.dtype.itemsize
        new_run = np.ones(srows.size, bool)
        new_run[1:] = (np.diff(srows) != 1) | (np.diff(piece) != 0)
        if ring and srows.size >= URING_MIN_ROWS and self._ring_read(out, srows, piece, dst, new_run, rb):
            return
        first, bufs = _iovecs(out, srows, dst, new_run, rb)
        pc = piece[first]
        off = self._off[pc] + (srows[first] - self.starts[pc]) * rb
        _read_runs(self._fd[pc], off, bufs, srows.size * rb)

    def _ring_read(self, out: np.ndarray, srows: np.ndarray, piece: np.ndarray, dst: np.ndarray,
                   new_run: np.ndarray, rb: int) -> bool:
        """:meth:`_pread_into` through io_uring, one read per stretch (False: the ring is off,
        nothing read). The stretches it did not read whole (not cached, short) get ``preadv``."""
        seg, rows = _stretches(new_run, dst)
        pc = piece[seg]
        fd, length = self._fd[pc], rows * rb
        off = self._off[pc] + (srows[seg] - self.starts[pc]) * rb
        at = dst[seg] * rb                                     # byte offset in out
        got = uring.read(fd, off, out.__array_interface__["data"][0] + at, length, out)
        if got is None:
            return False
        short = np.flatnonzero(got != length)
        if short.size:
            done = np.maximum(got[short], 0)                   # an error or -EAGAIN: all of it
            mv = out.data.cast("B")
            a, b = at[short] + done, at[short] + length[short]
            bufs = [[mv[i:j]] for i, j in zip(a.tolist(), b.tolist())]
            _read_runs(fd[short], off[short] + done, bufs, int((b - a).sum()))
        return True

    def prefetch(self, rows: np.ndarray) -> None:
        """Start reading the pages that hold ``rows``: all at once, without waiting
        (``MADV_WILLNEED`` on each row's pages). A gather of rows that are not in the page
        cache then waits on one deep queue of reads, instead of one page fault (or one
        readahead window) at a time. It costs a few microseconds per row when the rows are
        cached already, which is why :meth:`take` checks a sample of them first."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size:
            _, srows, bounds, piece = self.locate(rows)
            self._prefetch_sorted(srows, bounds, piece)

    def _cached(self, srows: np.ndarray, piece: np.ndarray, samples: int = 16) -> bool:
        """Whether the pages of a sample of the (sorted) rows are all in the page cache
        (True where that cannot be known)."""
        mincore = _mincore()
        if mincore is None or not len(srows):
            return True
        rb, page = self.dim * self.dtype.itemsize, mmap.PAGESIZE
        vec = ctypes.c_ubyte(0)
        for i in np.linspace(0, len(srows) - 1, min(samples, len(srows))).astype(np.int64).tolist():
            p = self.pieces[piece[i]]
            addr = p.emb.__array_interface__["data"][0] + int(srows[i] - p.start) * rb
            if mincore(addr - addr % page, page, ctypes.byref(vec)) == 0 and not vec.value & 1:
                return False
        return True

    def _prefetch_sorted(self, srows: np.ndarray, bounds: np.ndarray, piece: np.ndarray) -> None:
        advice = getattr(mmap, "MADV_WILLNEED", None)
        if advice is None:
            return
        rb, page = self.dim * self.dtype.itemsize, mmap.PAGESIZE
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            p = self.pieces[piece[a]] if a < b else None
            if p is None or p.shard.mm is None or not hasattr(p.shard.mm, "madvise"):
                continue
            first = p.emb.__array_interface__["data"][0] - p.shard.base
            off = first + (srows[a:b] - p.start) * rb
            lo, hi = off - off % page, off + rb          # page-aligned start, end of each row
            new = np.flatnonzero(lo[1:] > hi[:-1]) + 1   # merge overlapping ranges
            for s, e in zip(lo[np.r_[0, new]].tolist(), hi[np.r_[new - 1, b - a - 1]].tolist()):
                p.shard.mm.madvise(advice, s, e - s)

    def batches(self, batch_size: int = 65536, start: int = 0, stop: int | None = None,
                release: bool | None = None, read_ahead: bool | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, block) in order; blocks never straddle pieces.

        A block of a piece in the page cache is a zero-copy view of the map. A piece that is
        not (``read_ahead`` None: a sample of its pages is not resident, ``mincore``) is read
        with ``preadv`` into a new array per block, the next blocks' reads (up to ``READ_AHEAD``,
        within ``READ_AHEAD_BYTES``) running in helper threads while the consumer works on this
        one: the disk then sees large reads, queued ahead, instead of one page fault (one
        readahead window) at a time. True/False: read every piece so / map every piece.
        With ``release`` each mapped block's pages leave this process once the consumer asks
        for the next (they stay in the page cache; a block still held reads back from it), so a
        scan of a matrix larger than memory holds one block mapped, not the whole file. None:
        when the matrix is larger than a quarter of RAM (``release_behind``)."""
        release = self.release_behind if release is None else release
        stop = len(self) if stop is None else stop
        blocks = [(k, s, min(s + batch_size, b)) for k, p in enumerate(self.pieces)
                  for a, b in [(max(start, p.start), min(stop, p.stop))] for s in range(a, b, batch_size)]
        cold: dict[int, bool] = {}

        def is_cold(i: int) -> bool:
            k = blocks[i][0]
            if k not in cold:
                cold[k] = bool(self._fd[k] >= 0) and (
                    read_ahead if read_ahead is not None else not self._piece_cached(k))
            return cold[k]
        # blocks end at pieces (record batches), so they may be far smaller than batch_size
        rows = max((e - s for _, s, e in blocks), default=1)
        depth = max(1, min(READ_AHEAD, READ_AHEAD_BYTES // max(1, rows * self.dim * self.dtype.itemsize)))
        pool: ThreadPoolExecutor | None = None
        ahead: dict[int, Future[np.ndarray]] = {}      # block number -> its read in flight
        try:
            for i, (k, s, e) in enumerate(blocks):
                p = self.pieces[k]
                if is_cold(i):
                    got = ahead.pop(i, None)
                    block = got.result() if got is not None else self._read_block(k, s, e)
                else:
                    block = p.emb[s - p.start: e - p.start]
                for j in range(i + 1, min(i + 1 + depth, len(blocks))):
                    if j not in ahead and is_cold(j):
                        pool = pool or ThreadPoolExecutor(depth, thread_name_prefix="embedstore-scan")
                        ahead[j] = pool.submit(self._read_block, *blocks[j])
                yield s, block
                if release and not cold[k]:
                    p.shard.release(block)
                if e == p.stop and start <= p.start and not (release or cold[k]):
                    self._mapped[k] = True        # all of it handed out as views, and mapped
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _read_block(self, k: int, s: int, e: int) -> np.ndarray:
        """Rows ``s:e`` (matrix positions) of piece ``k``, read with ``preadv`` into a new array.

        The array has its own private anonymous mapping, unmapped when its last reference
        goes, rather than memory from malloc: the blocks are made in helper threads and freed
        by the consumer, and glibc's heaps grew with them."""
        n = (e - s) * self.dim
        anon = getattr(mmap, "MAP_ANONYMOUS", None)
        if anon is None:                                 # Windows: no such flags
            out = np.empty((e - s, self.dim), self.dtype)
        else:
            buf = mmap.mmap(-1, max(n * self.dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | anon)
            out = np.frombuffer(buf, self.dtype, count=n).reshape(e - s, self.dim)
        off = int(self._off[k]) + (s - self.pieces[k].start) * self.dim * self.dtype.itemsize
        fd = self.pieces[k].shard.open_for_scan()
        try:
            _read_runs(np.array([fd]), np.array([off]), [[out.data.cast("B")]], out.nbytes)
        finally:
            os.close(fd)
        return out

    def _piece_cached(self, k: int, samples: int = 16) -> bool:
        """Whether a sample of piece ``k``'s pages is in the page cache (see :meth:`_cached`)."""
        p = self.pieces[k]
        rows = np.linspace(p.start, p.stop - 1, min(samples, p.stop - p.start)).astype(np.int64)
        return self._cached(rows, np.full(rows.size, k))

    def advise(self, advice: int) -> None:
        seen = set()
        for p in self.pieces:
            if id(p.shard) not in seen:
                seen.add(id(p.shard))
                p.shard.advise(advice)

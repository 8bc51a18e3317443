"""Batched positional reads through Linux's io_uring, for warm sparse gathers.

A warm 10k-row gather is 10k small reads from the page cache. Issued one ``preadv`` call at a
time from Python, they cost about 1 µs each in the kernel plus a memoryview and a call per row
in the interpreter (1M x 768 float16, 10k random rows: 17 ms against a numpy memmap's 8). Here
the reads are described in one vectorised numpy write into a submission ring and handed to
the kernel with one ``io_uring_enter`` per ring-full, which releases the GIL: with the rows
split over two threads, a ring each, the gather ran in 9-11 ms on this 2-core machine.

Every read carries ``RWF_NOWAIT``: a page that is not in the page cache fails the read with
``-EAGAIN`` instead of sending it to the kernel's worker threads, so each read is complete
when ``io_uring_enter`` returns and no kernel write can land in an array after its gather
has given up on it (Ctrl-C, an error). The caller reads what did not complete (``-EAGAIN``,
short reads, errors) with ``preadv``: :func:`read` reports, per read, the bytes it got.

Where io_uring is missing or refused (not Linux, kernels before 5.6, ``ENOSYS``/``EPERM`` from
a seccomp filter such as Docker's default, ``kernel.io_uring_disabled``), or on anything
unexpected, the module turns itself off for the process (:func:`disabled` says why) and
:func:`read` returns None: the caller's ``preadv`` path is the whole story. So does
``EMBEDSTORE_IO_URING=0``.

Rings are per thread and per process: a forked worker (a DataLoader's) makes its own rather
than submitting to its parent's, and its own thread pool (a pool's threads do not survive a
fork).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..sizes import usable_cores

__all__ = ["read", "disabled", "SPLIT_ROWS"]

ENV = "EMBEDSTORE_IO_URING"
ENTRIES = 2048            # submission ring size (64 B a slot: 128 KB, within an 8 MB memlock)
SPLIT_ROWS = 2000         # reads split over threads only past this many per thread
MAX_THREADS = 4
MAX_LEN = 1 << 30         # a longer read goes to preadv (the kernel caps one read near 2 GB)
_SETUP, _ENTER = 425, 426                   # the same on every architecture (since 5.1)
_OP_READ = 22                               # IORING_OP_READ, Linux 5.6
_ENTER_GETEVENTS = 1
_RWF_NOWAIT = 0x8
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000

_SQE = np.dtype({"names": ["opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags",
                           "user_data", "buf_index", "personality", "splice_fd_in", "addr3", "pad"],
                 "formats": ["u1", "u1", "<u2", "<i4", "<u8", "<u8", "<u4", "<u4", "<u8", "<u2",
                             "<u2", "<i4", "<u8", "<u8"],
                 "offsets": [0, 1, 2, 4, 8, 16, 24, 28, 32, 40, 42, 44, 48, 56], "itemsize": 64})
_CQE = np.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4")])


class _SqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")
                ] + [("user_addr", ctypes.c_uint64)]


class _CqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")
                ] + [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", _SqOffsets), ("cq_off", _CqOffsets)]


class _Broken(Exception):
    """The ring answered in a way it should not: turn io_uring off for the process."""


_lock = threading.Lock()
_why_off: str | None = None if os.environ.get(ENV, "1") != "0" else f"${ENV}=0"
_syscall: Any = None
_local = threading.local()
_pool: tuple[int, ThreadPoolExecutor] | None = None
_kept: list[Any] = []      # buffers a failed ring may still write into: never freed


def disabled() -> str | None:
    """Why io_uring reads are off in this process (None: on, or not tried yet)."""
    return _why_off


def _turn_off(why: str) -> None:
    global _why_off
    _why_off = _why_off or why


def _libc_syscall() -> Any:
    global _syscall
    if _syscall is None:
        if not sys.platform.startswith("linux") or platform.machine() not in (
                "x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x"):
            _turn_off(f"io_uring: not Linux on a known architecture ({sys.platform}, "
                      f"{platform.machine()})")
            return None
        try:
            f = ctypes.CDLL(None, use_errno=True).syscall   # CDLL: the GIL is released
        except (OSError, AttributeError):
            _turn_off("io_uring: no libc syscall()")
            return None
        f.restype = ctypes.c_long
        _syscall = f
    return _syscall


class _Ring:
    """One io_uring instance, used by one thread of one process."""

    def __init__(self) -> None:
        sc = _libc_syscall()
        if sc is None:
            raise OSError(errno.ENOSYS, "no io_uring")
        p = _Params()
        fd = sc(ctypes.c_long(_SETUP), ctypes.c_uint(ENTRIES), ctypes.byref(p))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd, self.pid, self.sc, self.inflight = int(fd), os.getpid(), sc, 0
        self.maps: list[mmap.mmap] = []
        try:
            sq = self._map(p.sq_off.array + p.sq_entries * 4, _OFF_SQ_RING)
            cq = self._map(p.cq_off.cqes + p.cq_entries * _CQE.itemsize, _OFF_CQ_RING)
            sqes = self._map(p.sq_entries * _SQE.itemsize, _OFF_SQES)
        except OSError:
            self.close()
            raise
        u32 = lambda m, at, n=1: np.frombuffer(m, np.uint32, n, at)  # noqa: E731
        self.sq_head, self.sq_tail = u32(sq, p.sq_off.head), u32(sq, p.sq_off.tail)
        self.sq_mask = int(u32(sq, p.sq_off.ring_mask)[0])
        self.cq_head, self.cq_tail = u32(cq, p.cq_off.head), u32(cq, p.cq_off.tail)
        self.cq_mask = int(u32(cq, p.cq_off.ring_mask)[0])
        self.entries = int(p.sq_entries)
        u32(sq, p.sq_off.array, self.entries)[:] = np.arange(self.entries, dtype=np.uint32)
        self.sqes = np.frombuffer(sqes, _SQE, self.entries)
        self.cqes = np.frombuffer(cq, _CQE, int(p.cq_entries), p.cq_off.cqes)

    def _map(self, size: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.maps.append(m)
        return m

    def close(self) -> None:
        self.sqes = self.cqes = self.sq_head = self.sq_tail = self.cq_head = self.cq_tail = None  # type: ignore[assignment]
        for m in self.maps:
            try:
                m.close()
            except BufferError:       # a view still exported: the mapping goes with it
                pass
        self.maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _enter(self, submit: int, wait: int) -> int:
        r = self.sc(ctypes.c_long(_ENTER), ctypes.c_int(self.fd), ctypes.c_uint(submit),
                    ctypes.c_uint(wait), ctypes.c_uint(_ENTER_GETEVENTS), None, ctypes.c_size_t(0))
        return int(r) if r >= 0 else -ctypes.get_errno()

    def read(self, fd: np.ndarray, off: np.ndarray, addr: np.ndarray, length: np.ndarray,
             got: np.ndarray) -> None:
        """Read ``length[i]`` bytes at ``off[i]`` of ``fd[i]`` to address ``addr[i]``; store
        the result (bytes, or -errno) in ``got[i]``."""
        n = fd.size
        for a in range(0, n, self.entries):
            b = min(n, a + self.entries)
            k = b - a
            tail = int(self.sq_tail[0])
            rec = np.zeros(k, _SQE)
            rec["opcode"], rec["fd"], rec["off"] = _OP_READ, fd[a:b], off[a:b]
            rec["addr"], rec["len"], rec["rw_flags"] = addr[a:b], length[a:b], _RWF_NOWAIT
            rec["user_data"] = np.arange(a, b, dtype=np.uint64)
            self.sqes[(tail + np.arange(k)) & self.sq_mask] = rec
            self.sq_tail[0] = (tail + k) & 0xFFFFFFFF
            self._complete(tail, k, got)

    def _complete(self, tail: int, k: int, got: np.ndarray) -> None:
        """Hand the ``k`` entries published after ``tail`` to the kernel and reap them all.

        ``self.inflight`` is left at the reads the kernel took and did not answer (0 unless
        this raises)."""
        reaped = spins = 0
        taken = lambda: (int(self.sq_head[0]) - tail) & 0xFFFFFFFF  # noqa: E731
        try:
            while reaped < k:
                r = self._enter(k - taken(), k - reaped)
                self.inflight = taken() - reaped
                h, t = int(self.cq_head[0]), int(self.cq_tail[0])
                cnt = (t - h) & 0xFFFFFFFF
                if cnt:
                    c = self.cqes[(h + np.arange(cnt)) & self.cq_mask]
                    ud = c["user_data"].astype(np.int64)
                    if cnt > self.inflight or ud.min() < 0 or ud.max() >= got.size:
                        raise _Broken("io_uring: a completion for an entry it was not given")
                    got[ud] = c["res"]
                    self.cq_head[0] = t
                    reaped += cnt
                    self.inflight -= cnt
                if r < 0 and r not in (-errno.EINTR, -errno.EAGAIN, -errno.EBUSY):
                    raise _Broken(f"io_uring_enter: {os.strerror(-r)}")
                spins = spins + 1 if (r < 0 or not cnt) else 0
                if spins > 1000:
                    raise _Broken("io_uring_enter: no progress")
        except BaseException:
            for _ in range(100):                 # taken but unanswered: wait for them
                if self.inflight <= 0 or self._enter(0, self.inflight) >= 0:
                    self.inflight = 0
                    break
            raise


def _ring() -> _Ring | None:
    r: _Ring | None = getattr(_local, "ring", None)
    if r is not None and r.pid == os.getpid():
        return r
    if r is not None:                    # inherited over a fork: the parent's, not ours
        _local.ring = None
        r.close()                        # (this process's descriptor and mappings only)
    try:
        r = _Ring()
    except (OSError, ValueError) as e:
        _turn_off(f"io_uring unavailable: {e}")
        return None
    _local.ring = r
    return r


def _drop_ring(keep: Any) -> None:
    """Close this thread's ring after a failure (the next read makes a new one)."""
    r: _Ring | None = getattr(_local, "ring", None)
    _local.ring = None
    if r is None:
        return
    if r.inflight > 0:
        _kept.append(keep)   # the kernel may still write into it: never free it
    try:
        r.close()
    except OSError:
        pass


def _threads() -> int:
    return max(1, min(usable_cores(), MAX_THREADS))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():     # new, or inherited over a fork
            _pool = (os.getpid(), ThreadPoolExecutor(_threads() - 1, thread_name_prefix="embedstore-read"))
        return _pool[1]


def _part(fd: np.ndarray, off: np.ndarray, addr: np.ndarray, length: np.ndarray,
          got: np.ndarray, a: int, b: int, keep: Any) -> None:
    """Reads ``a:b`` in this thread's ring (``keep``: the destination, held until done)."""
    if _why_off is not None:
        return
    r = _ring()
    if r is None:
        return
    view = got[a:b]
    try:
        r.read(fd[a:b], off[a:b], addr[a:b], length[a:b], view)
    except _Broken as e:
        _turn_off(str(e))
        _drop_ring(keep)
    except BaseException:
        _drop_ring(keep)
        raise
    bad = view[(view < 0) & (view != -errno.EAGAIN)]
    if bad.size:   # EINVAL: no IORING_OP_READ or no RWF_NOWAIT here; others are the caller's to report
        if int(bad[0]) in (-errno.EINVAL, -errno.EOPNOTSUPP, -errno.ENOSYS):
            _turn_off(f"io_uring reads: {os.strerror(-int(bad[0]))}")


def read(fd: np.ndarray, off: np.ndarray, addr: np.ndarray, length: np.ndarray,
         keep: Any) -> np.ndarray | None:
    """Read ``length[i]`` bytes at file offset ``off[i]`` of descriptor ``fd[i]`` into memory
    at ``addr[i]`` (inside ``keep``, which the caller holds), for every i, from the page cache.

    Returns what each read got: its bytes (short when the file ends, or when only part was
    cached), ``-EAGAIN`` (not cached), another ``-errno``, or 0 (not tried); the caller reads
    the rest its own way. None: io_uring is off (:func:`disabled`), nothing was read."""
    if _why_off is not None or not fd.size or int(length.max()) > MAX_LEN:
        return None
    got = np.zeros(fd.size, np.int64)
    parts = min(_threads(), fd.size // SPLIT_ROWS) if fd.size >= 2 * SPLIT_ROWS else 1
    bounds = np.linspace(0, fd.size, parts + 1).astype(np.int64).tolist()
    jobs: list[Future[None]] = []
    try:
        if parts > 1:
            pool = _executor()
            jobs = [pool.submit(_part, fd, off, addr, length, got, a, b, keep)
                    for a, b in zip(bounds[:-2], bounds[1:-1])]
        _part(fd, off, addr, length, got, bounds[-2], bounds[-1], keep)
    finally:
        for j in jobs:          # the workers write into keep: it must outlive them
            j.exception()
    for j in jobs:
        j.result()
    return got

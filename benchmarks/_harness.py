"""Shared helpers for the benchmark scripts in this folder.

* ``machine()`` / ``machine_tag()``: what the figures were measured on (host, CPU, cores,
  memory, kernel, numpy/pyarrow versions) and a short tag for file names;
* ``time_runs`` and ``median``: repeated timings;
* page-cache control for cold reads: ``evict`` (fsync, then ``POSIX_FADV_DONTNEED``),
  ``prewarm`` and ``resident_fraction`` (``mincore``, to check that eviction really happened:
  pages mapped by a live process cannot be evicted);
* ``rss()``: the resident memory of this process, from ``/proc/self/status``;
* ``print_table`` (side-by-side, with a ratio column) and ``write_results``
  (``benchmarks/results/<name>-<machine>-<date>.json``, published with
  ``embedstore.store.atomic``).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import platform
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRATCH = HERE / "scratch"
sys.path.insert(0, str(HERE.parent))       # the repository's embedstore, installed or not

from embedstore.store.atomic import atomic_write_text  # noqa: E402

__all__ = ["HERE", "RESULTS", "SCRATCH", "machine", "machine_tag", "median", "time_runs",
           "files_under", "evict", "prewarm", "resident_fraction", "rss",
           "fmt_ratio", "fmt_num", "print_table", "write_results"]


# -- the machine ------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import numpy as np
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total": _mem_total(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import pyarrow
        info["pyarrow"] = pyarrow.__version__
    except ImportError:
        info["pyarrow"] = None
    try:
        import h5py
        info["h5py"], info["hdf5"] = h5py.__version__, h5py.version.hdf5_version
    except ImportError:
        pass
    return info


def machine_tag() -> str:
    """Short, file-name-safe name of this machine (its hostname)."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname().split(".")[0]) or "host"
    return tag[:40]


# -- timing -----------------------------------------------------------------------------------
def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def time_runs(fn: Callable[[int], Any], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of ``fn(i)`` for i in range(repeats), after ``warmup`` untimed calls
    (called with negative i, so a call can tell a warm-up from a timed run)."""
    for i in range(warmup):
        fn(-1 - i)
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


# -- the page cache ---------------------------------------------------------------------------
def files_under(*paths: Path | str) -> list[Path]:
    """Every regular file at or under ``paths`` (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
    return out


def evict(paths: Iterable[Path | str]) -> None:
    """Drop the files from the page cache: fsync (dirty pages cannot be dropped), then
    ``POSIX_FADV_DONTNEED``. Pages that some process still maps stay cached: open the files
    (or the store) only after evicting."""
    for p in paths:
        fd = os.open(str(p), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prewarm(paths: Iterable[Path | str], chunk: int = 16 << 20) -> int:
    """Read the files once so that they are in the page cache. Returns the bytes read."""
    buf = bytearray(chunk)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
    return total


_libc: Any = None


def _mincore_fn() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = libc
    return _libc


def resident_fraction(paths: Iterable[Path | str]) -> float:
    """Fraction of the files' pages that are in the page cache (``mincore`` on a fresh,
    untouched mapping; 1.0 for no bytes)."""
    libc = _mincore_fn()
    page = mmap.PAGESIZE
    resident = total = 0
    for p in paths:
        size = os.path.getsize(p)
        if not size:
            continue
        fd = os.open(str(p), os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {p}")
                resident += sum(1 for v in bytes(vec) if v & 1)
                total += pages
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else 1.0


def rss() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of this process in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0]) * 1024
    return out


# -- reporting --------------------------------------------------------------------------------
def fmt_ratio(r: float | None) -> str:
    if r is None or r != r:
        return "-"
    return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def fmt_num(v: float) -> str:
    """About three significant digits, never in exponent form: 0.0123, 1.23, 12.3, 1,234."""
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _fmt(v: Any, spec: str | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "-"
    if spec == "ratio":
        return fmt_ratio(v)
    if spec == "num" and isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt_num(v)
    if spec and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str | None]],
                title: str | None = None, file: Any = None) -> str:
    """Print rows side by side. ``columns``: (key, header, format) where format is a
    format spec for numbers, ``"ratio"`` (printed as ``1.23x``), ``"num"`` (about three
    significant digits, no exponent) or None. Returns the text."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([_fmt(r.get(k), f) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    right = [f is not None for _, _, f in columns]

    def line(c: list[str]) -> str:
        return "  ".join(x.rjust(w) if rj else x.ljust(w) for x, w, rj in zip(c, widths, right)).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(cells[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(c) for c in cells[1:])
    text = "\n".join(out)
    print(text, file=file or sys.stdout, flush=True)
    return text


def write_results(name: str, rows: Any, extra: dict[str, Any] | None = None,
                  when: str | None = None, *, tag: str | None = None,
                  machine_info: dict[str, Any] | None = None) -> Path:
    """Write ``{"benchmark", "machine", "date", ...extra, "rows"}`` as JSON to
    ``benchmarks/results/<name>-<tag>-<YYYYMMDD>.json`` (``tag``: ``machine_tag()`` unless
    given; ``machine_info``: ``machine()`` unless given) and return the path. A run on a day
    that has results already gets ``-run2``, ``-run3``, ... rather than overwriting them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = when or time.strftime("%Y%m%d")
    stem = f"{name}-{tag or machine_tag()}-{date}"
    path, k = RESULTS / f"{stem}.json", 1
    while path.exists():
        k += 1
        path = RESULTS / f"{stem}-run{k}.json"
    doc = {"benchmark": name, "machine": machine_info or machine(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}), "rows": rows}
    atomic_write_text(path, json.dumps(doc, indent=1, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    if is_dataclass(o) or type(o).__str__ is not object.__str__:   # a value that names itself
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

#!/usr/bin/env python
"""The store against a plain numpy ``.npy`` memmap and per-slide TRIDENT HDF5 files.

    .venv/bin/python benchmarks/bench_store.py                 # 1,000,000 x 768 float16 (~5 GB scratch)
    .venv/bin/python benchmarks/bench_store.py --rows 100000   # a quick run

The same synthetic float16 embeddings (``--rows`` x ``--dim``, in slides of ``--slide-rows``
tiles with slide names and level-0 x, y) are written three ways: the store (``StoreWriter``),
one ``.npy`` file (``np.save``) and one HDF5 file per slide in TRIDENT's layout (``features``
(N, dim), ``coords`` (N, 2), both chunked one row per chunk as TRIDENT's appends produce).
Then, side by side:

* **write**: GB/s of embedding bytes, fsync included (StoreWriter: + the catalog commit);
* **open**: ``open_store`` seconds and the RSS it adds, in a fresh process;
* **scan**: GB/s of a full pass (``store.scan()`` blocks vs 65,536-row blocks of the memmap);
* **gather**: ``--gather`` random ids (``store.gather``, i.e. ``prefetch=None``; also with
  ``prefetch=True``, ``prefetch=False``, and cold ``prefetch=False`` with ``MADV_RANDOM`` on
  the shard maps) vs numpy fancy indexing on the memmap, vs the HDF5 files (rows grouped by
  file, one fancy read per file), and, as references, one ``pread`` per row (sorted order;
  plain and ``--threads`` threads);
* **bags**: every row (+ coords) of ``--bag-slides`` slides in a shuffled order, a MIL epoch
  (``store.slide(name)`` vs ``f['features'][()]``).

Every read is measured **warm** and **cold**, every measurement in a fresh worker process:

* warm: all files of every format are in the page cache (checked with ``mincore``); the worker
  opens, runs the operation once untimed (for gathers on memory maps also one full pass, so
  the process has every page mapped: steady state), then times ``--repeats`` runs;
* cold: before each run every file of every format is fsynced and dropped from the page
  cache (``POSIX_FADV_DONTNEED``; checked with ``mincore``), then the worker opens the format
  (not timed: see **open**) and times one run. Mapped pages cannot be dropped, which is why
  each cold run is a fresh process that opens only after the eviction.

The formats take turns going first (rotating order), each timing is the median of
``--repeats`` runs (writes: ``--write-repeats``), and every gather / scan / bag result is
checked to be identical across formats. Every byte read is folded into an int64 sum
(``block.view(int64).sum()``, ~30 GB/s here), the same for every format, so that the
reduction does not hide the I/O path (``block.sum(dtype=float32)`` runs at ~0.7 GB/s and
would make every format look alike). Scratch lives in ``benchmarks/scratch/bench_store``
(removed at the end unless ``--keep``); results go to
``benchmarks/results/bench_store-<machine>-<date>.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import _harness as H  # noqa: E402

from embedstore.store.atomic import atomic_write_text, fsync_dir, fsync_file  # noqa: E402

NAME = "bench_store"
SCAN_BLOCK = 65536
WARM_SEED = 10_000
ROW_TARGETS = {  # (bench, baseline variant) -> minimum speed ratio (baseline time / store time)
    ("scan", "npy"): 0.8,
    ("gather", "npy"): 0.5,
    ("gather", "h5"): 10.0,
    ("bags", "h5"): 0.8,
}
OPEN_TARGET_S = 1.0
OPEN_TARGET_RSS = 200 << 20


# -- configuration and data -------------------------------------------------------------------
@dataclass
class Cfg:
    rows: int
    dim: int
    slide_rows: int
    gather: int
    bag_slides: int
    seed: int
    scratch: str
    threads: int

    @property
    def n_slides(self) -> int:
        return -(-self.rows // self.slide_rows)

    @property
    def store(self) -> Path:
        return Path(self.scratch) / "store"

    @property
    def npy(self) -> Path:
        return Path(self.scratch) / "emb.npy"

    @property
    def h5dir(self) -> Path:
        return Path(self.scratch) / "h5"

    def h5(self, i: int) -> Path:
        return self.h5dir / f"{slide_name(i)}.h5"

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.slide_rows, min((i + 1) * self.slide_rows, self.rows)

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 2

    def paths(self, fmt: str) -> list[Path]:
        return H.files_under({"store": self.store, "npy": self.npy, "h5": self.h5dir}[fmt])

    def all_paths(self) -> list[Path]:
        return [p for f in ("store", "npy", "h5") for p in self.paths(f)]


def slide_name(i: int) -> str:
    return f"slide{i:04d}"


def slide_data(cfg: Cfg, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (n, dim) float16 and level-0 coords (n, 2) int64 of slide ``i``: random
    bits with the top exponent bit cleared (finite values, |x| < 2), a 128-wide tile grid."""
    a, b = cfg.bounds(i)
    rng = np.random.default_rng([cfg.seed, i])
    bits = rng.integers(0, 1 << 16, size=(b - a, cfg.dim), dtype=np.uint16)
    bits &= 0xBFFF
    j = np.arange(b - a, dtype=np.int64)
    coords = np.stack([(j % 128) * 224, (j // 128) * 224], axis=1)
    return bits.view(np.float16), coords


def tile_keys(name: str, coords: np.ndarray) -> list[str]:
    return [f"{name}/{x}_{y}" for x, y in coords.tolist()]


def gather_ids(cfg: Cfg, seed: int) -> np.ndarray:
    return np.random.default_rng([cfg.seed, 7, seed]).choice(cfg.rows, min(cfg.gather, cfg.rows),
                                                              replace=False).astype(np.int64)


def bag_slides(cfg: Cfg) -> list[int]:
    order = np.random.default_rng([cfg.seed, 11]).permutation(cfg.n_slides)
    return [int(i) for i in order[: cfg.bag_slides]]


MASK = (1 << 64) - 1


def touch(a: np.ndarray) -> int:
    """Fold every byte of a C-contiguous (n, dim) float16 block into a wrapping int64 sum
    (callers add these up modulo 2**64, so the result does not depend on the blocking)."""
    return int(a.view(np.int64).sum())


def gather_check(out: np.ndarray) -> int:
    """Order-sensitive checksum of gathered rows."""
    per_row = out.view(np.int64).sum(axis=1)
    return int((per_row * np.arange(1, len(out) + 1, dtype=np.int64)).sum())


# -- readers, one per variant -----------------------------------------------------------------
class StoreReader:
    mapped = True

    def __init__(self, cfg: Cfg, advice: int | None = None, prefetch: bool | None = None) -> None:
        self.cfg, self.advice, self.prefetch = cfg, advice, prefetch

    def open(self) -> None:
        from embedstore.store import open_store
        self.s = open_store(self.cfg.store)
        if self.advice is not None:
            self.s.embeddings.advise(self.advice)
        self.names = {i: slide_name(i) for i in range(self.cfg.n_slides)}

    def scan(self) -> int:
        acc = 0
        for _, block in self.s.scan(SCAN_BLOCK):
            acc += touch(block)
        return acc & MASK

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self.s.gather(ids, prefetch=self.prefetch)

    def bags(self, slides: list[int]) -> int:
        acc = 0
        for i in slides:
            bag = self.s.slide(self.names[i])
            acc += touch(bag.emb) + int(bag.coords.sum())
        return acc & MASK


class NpyReader:
    mapped = True

    def __init__(self, cfg: Cfg) -> None:
        self.cfg = cfg

    def open(self) -> None:
        self.mm = np.load(self.cfg.npy, mmap_mode="r")
        self.arr = np.asarray(self.mm)  # a plain ndarray view of the same mapping

    def scan(self) -> int:
        acc, a = 0, self.arr
        for s in range(0, len(a), SCAN_BLOCK):
            acc += touch(a[s:s + SCAN_BLOCK])
        return acc & MASK

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self.arr[ids]


class PreadReader:
    """One ``pread`` per row of the .npy file, in sorted row order (``threads`` > 1: the
    sorted rows are split into that many runs, read by a thread pool)."""
    mapped = False

    def __init__(self, cfg: Cfg, threads: int = 1) -> None:
        self.cfg, self.threads = cfg, threads

    def open(self) -> None:
        with open(self.cfg.npy, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self.base = f.tell()
        assert not fortran and shape == (self.cfg.rows, self.cfg.dim) and dtype == np.float16
        self.fd = os.open(self.cfg.npy, os.O_RDONLY)
        self.rb = self.cfg.dim * 2
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def gather(self, ids: np.ndarray) -> np.ndarray:
        order = np.argsort(ids, kind="stable")
        offs = (self.base + ids[order] * self.rb).tolist()
        tmp = np.empty((len(ids), self.cfg.dim), np.float16)
        mv = memoryview(tmp).cast("B")
        rb, fd = self.rb, self.fd

        def read(a: int, b: int) -> None:
            for i in range(a, b):
                if os.preadv(fd, [mv[i * rb:(i + 1) * rb]], offs[i]) != rb:
                    raise OSError(f"short read at row {i}")

        if self.pool is None:
            read(0, len(offs))
        else:
            cuts = np.linspace(0, len(offs), self.threads + 1).astype(int)
            list(self.pool.map(read, cuts[:-1], cuts[1:]))
        out = np.empty_like(tmp)
        out[order] = tmp
        return out


class H5Reader:
    """The per-slide TRIDENT files, all opened before the timed runs."""
    mapped = False

    def __init__(self, cfg: Cfg) -> None:
        self.cfg = cfg

    def open(self) -> None:
        import h5py
        self.files = [h5py.File(self.cfg.h5(i), "r") for i in range(self.cfg.n_slides)]
        self.feats = [f["features"] for f in self.files]
        self.coords = [f["coords"] for f in self.files]

    def gather(self, ids: np.ndarray) -> np.ndarray:
        order = np.argsort(ids, kind="stable")
        sids = ids[order]
        slide = sids // self.cfg.slide_rows
        cut = np.flatnonzero(slide[1:] != slide[:-1]) + 1
        bounds = np.concatenate([[0], cut, [len(sids)]])
        tmp = np.empty((len(ids), self.cfg.dim), np.float16)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            s = int(slide[a])
            tmp[a:b] = self.feats[s][sids[a:b] - s * self.cfg.slide_rows]
        out = np.empty_like(tmp)
        out[order] = tmp
        return out

    def bags(self, slides: list[int]) -> int:
        acc = 0
        for i in slides:
            emb = self.feats[i][()]
            coords = self.coords[i][()]
            acc += touch(emb) + int(coords.sum())
        return acc & MASK


VARIANTS = {
    "store": lambda cfg: StoreReader(cfg),
    "store+prefetch": lambda cfg: StoreReader(cfg, prefetch=True),
    "store-prefetch": lambda cfg: StoreReader(cfg, prefetch=False),
    "store+random": lambda cfg: StoreReader(cfg, advice=mmap.MADV_RANDOM, prefetch=False),
    "npy": lambda cfg: NpyReader(cfg),
    "pread": lambda cfg: PreadReader(cfg),
    "pread-threads": lambda cfg: PreadReader(cfg, threads=cfg.threads),
    "h5": lambda cfg: H5Reader(cfg),
}
LABELS = {
    "store": "store",
    "store+prefetch": "store, prefetch=True",
    "store-prefetch": "store, prefetch=False",
    "store+random": "store, prefetch=False, MADV_RANDOM",
    "npy": "npy memmap",
    "pread": "pread per row",
    "pread-threads": "pread per row, threads",
    "h5": "TRIDENT h5",
}


# -- worker: one measurement in this (fresh) process ------------------------------------------
def _io_read() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _write(cfg: Cfg, fmt: str) -> dict[str, Any]:
    slides = [slide_data(cfg, i) for i in range(cfg.n_slides)]
    if fmt == "npy":
        emb_all = np.concatenate([e for e, _ in slides])
        slides = []
    keys = [tile_keys(slide_name(i), c) for i, (_, c) in enumerate(slides)] if fmt == "store" else []
    gc.collect()
    t0 = time.perf_counter()
    if fmt == "store":
        from embedstore.store import StoreMeta, StoreWriter
        meta = StoreMeta(dim=cfg.dim, dtype="float16", backbone={"name": "synthetic-bench", "kind": "bench"},
                         tile={"tile_size": 224})
        with StoreWriter(cfg.store, meta) as w:
            for i, (emb, coords) in enumerate(slides):
                name = slide_name(i)
                w.add(emb, keys[i], unit=name, slide=name, x=coords[:, 0], y=coords[:, 1])
                w.end_unit(name)
        # close(): the last shard is sealed (fsync, rename) and committed
    elif fmt == "npy":
        np.save(cfg.npy, emb_all)
        fsync_file(cfg.npy)
        fsync_dir(cfg.npy.parent)
    elif fmt == "h5":
        import h5py
        cfg.h5dir.mkdir(parents=True, exist_ok=True)
        for i, (emb, coords) in enumerate(slides):
            path = cfg.h5(i)
            with h5py.File(path, "w") as f:  # TRIDENT's save_h5: chunks of one row, growable
                for key, val in (("features", emb), ("coords", coords)):
                    d = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                         chunks=(1,) + val.shape[1:], dtype=val.dtype)
                    d[:] = val
                f["coords"].attrs.update({"patch_size": 224, "patch_size_level0": 224,
                                          "level0_magnification": 20, "target_magnification": 20,
                                          "name": slide_name(i)})
                f["features"].attrs["encoder"] = "synthetic-bench"
            fsync_file(path)
        fsync_dir(cfg.h5dir)
    else:
        raise ValueError(fmt)
    t = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in cfg.paths(fmt))
    return {"times": [t], "bytes": cfg.nbytes, "disk_bytes": disk}


def _open(cfg: Cfg) -> dict[str, Any]:
    t0 = time.perf_counter()
    from embedstore.store import open_store
    t_import = time.perf_counter() - t0
    gc.collect()
    r0, io0 = H.rss(), _io_read()
    t0 = time.perf_counter()
    s = open_store(cfg.store)
    t = time.perf_counter() - t0
    r1, io1 = H.rss(), _io_read()
    assert len(s) == cfg.rows, (len(s), cfg.rows)
    return {"times": [t], "import_s": t_import, "rss_delta": [r1["VmRSS"] - r0["VmRSS"]],
            "anon_delta": [r1["RssAnon"] - r0["RssAnon"]], "file_delta": [r1["RssFile"] - r0["RssFile"]],
            "io_read": [io1 - io0]}


def _verify(cfg: Cfg) -> dict[str, Any]:
    st, npy, h5 = StoreReader(cfg), NpyReader(cfg), H5Reader(cfg)
    for r in (st, npy, h5):
        r.open()
    assert len(st.s) == cfg.rows == len(npy.arr)
    ids = gather_ids(cfg, 0)
    g = st.gather(ids)
    assert np.array_equal(g.view(np.uint16), npy.gather(ids).view(np.uint16)), "store gather != npy"
    assert np.array_equal(g.view(np.uint16), h5.gather(ids).view(np.uint16)), "store gather != h5"
    i = bag_slides(cfg)[0]
    bag = st.s.slide(slide_name(i))
    a, b = cfg.bounds(i)
    assert np.array_equal(bag.ids, np.arange(a, b)), "store ids are not 0..n-1 in slide order"
    assert np.array_equal(bag.emb.view(np.uint16), h5.feats[i][()].view(np.uint16)), "bag != h5"
    assert np.array_equal(bag.coords, h5.coords[i][()]), "bag coords != h5"
    assert st.scan() == npy.scan(), "scan checksums differ"
    return {"ok": True}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    cfg, op, variant, cache = Cfg(**spec["cfg"]), spec["op"], spec.get("variant"), spec.get("cache")
    if op == "write":
        return _write(cfg, variant)
    if op == "open":
        return _open(cfg)
    if op == "verify":
        return _verify(cfg)
    reader = VARIANTS[variant](cfg)
    seeds = spec["seeds"]
    if op == "gather":
        args = {s: gather_ids(cfg, s) for s in seeds + [WARM_SEED]}
        run = lambda s: gather_check(reader.gather(args[s]))  # noqa: E731
    elif op == "scan":
        run = lambda s: reader.scan()  # noqa: E731
    elif op == "bags":
        slides = bag_slides(cfg)
        run = lambda s: reader.bags(slides)  # noqa: E731
    else:
        raise ValueError(op)
    reader.open()
    if cache == "warm":
        run(WARM_SEED)
        if op == "gather" and reader.mapped:
            reader.scan()  # every page mapped in this process: the steady state
    out: dict[str, Any] = {"times": [], "io_read": [], "majflt": [], "check": []}
    for s in seeds:
        gc.collect()
        io0, ru0 = _io_read(), resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        check = run(s)
        t = time.perf_counter() - t0
        io1, ru1 = _io_read(), resource.getrusage(resource.RUSAGE_SELF)
        out["times"].append(t)
        out["io_read"].append(io1 - io0)
        out["majflt"].append(ru1.ru_majflt - ru0.ru_majflt)
        out["check"].append(check)
    return out


# -- the orchestrating process ----------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spawn(cfg: Cfg, op: str, variant: str | None = None, cache: str | None = None,
          seeds: list[int] | None = None) -> dict[str, Any]:
    spec = {"cfg": asdict(cfg), "op": op, "variant": variant, "cache": cache, "seeds": seeds or []}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                       stdout=subprocess.PIPE, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"worker {op}/{variant}/{cache} failed (exit {p.returncode})")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def rotate(xs: list[str], r: int) -> list[str]:
    r %= len(xs)
    return xs[r:] + xs[:r]


class Runner:
    def __init__(self, cfg: Cfg, repeats: int) -> None:
        self.cfg, self.repeats = cfg, repeats
        self.measurements: list[dict[str, Any]] = []

    def _add(self, bench: str, variant: str, cache: str, res: dict[str, Any]) -> dict[str, Any]:
        m = {"bench": bench, "variant": variant, "cache": cache, **res}
        m["median_s"] = H.median(res["times"])
        self.measurements.append(m)
        extra = ""
        if res.get("io_read"):
            extra = f"  read {H.median(res['io_read']) / 1e6:.1f} MB/run"
        log(f"  {bench:<7} {cache:<5} {variant:<14} {m['median_s'] * 1e3:10.2f} ms  "
            f"(runs {', '.join(f'{t * 1e3:.1f}' for t in res['times'])}){extra}")
        return m

    def ensure_warm(self) -> float:
        paths = self.cfg.all_paths()
        frac = H.resident_fraction(paths)
        if frac < 0.995:
            H.prewarm(paths)
            frac = H.resident_fraction(paths)
            if frac < 0.99:
                log(f"  warning: only {frac:.1%} of the files stay in the page cache")
        return frac

    def evict_all(self) -> float:
        paths = self.cfg.all_paths()
        H.evict(paths)
        frac = H.resident_fraction(paths)
        if frac > 0.01:
            log(f"  warning: {frac:.1%} of the files still cached after eviction (mapped?)")
        return frac

    def writes(self, repeats: int) -> None:
        fmts = ["store", "npy", "h5"]
        runs: dict[str, dict[str, Any]] = {}
        for r in range(repeats):
            for fmt in rotate(fmts, r):
                target = {"store": self.cfg.store, "npy": self.cfg.npy, "h5": self.cfg.h5dir}[fmt]
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                res = spawn(self.cfg, "write", fmt)
                log(f"  write   {fmt:<5} run {r + 1}: {res['times'][0]:.2f} s "
                    f"({self.cfg.nbytes / res['times'][0] / 1e9:.2f} GB/s)")
                prev = runs.setdefault(fmt, {"times": [], "bytes": res["bytes"], "disk_bytes": res["disk_bytes"]})
                prev["times"] += res["times"]
        for fmt in fmts:
            self._add("write", fmt, "-", runs[fmt])

    def read_bench(self, bench: str, variants: list[str], cache: str) -> None:
        if cache == "warm":
            for variant in rotate(variants, len(self.measurements)):
                frac = self.ensure_warm()
                res = spawn(self.cfg, bench, variant, "warm", list(range(self.repeats)))
                res["resident_before"] = [frac]
                self._add(bench, variant, "warm", res)
            return
        acc: dict[str, dict[str, list[Any]]] = {v: {} for v in variants}
        for r in range(self.repeats):
            for variant in rotate(variants, r):
                frac = self.evict_all()
                res = spawn(self.cfg, bench, variant, "cold", [r])
                res["resident_before"] = [frac]
                for k, v in res.items():
                    acc[variant].setdefault(k, []).extend(v)
        for variant in variants:
            self._add(bench, variant, "cold", acc[variant])

    def opens(self, cache: str) -> None:
        acc: dict[str, list[Any]] = {}
        for _ in range(self.repeats):
            frac = self.ensure_warm() if cache == "warm" else self.evict_all()
            res = spawn(self.cfg, "open", "store", cache)
            res["resident_before"] = [frac]
            for k, v in res.items():
                acc.setdefault(k, []).extend(v if isinstance(v, list) else [v])
        m = self._add("open", "store", cache, acc)
        log(f"  open    {cache:<5} RSS +{H.median(acc['rss_delta']) / 2**20:.1f} MiB")
        m["rss_delta_median"] = H.median(acc["rss_delta"])

    def check_consistency(self) -> list[str]:
        """Every variant of a read bench must return the same checksum for the same seed."""
        problems = []
        by: dict[tuple[str, str], dict[str, list[int]]] = {}
        for m in self.measurements:
            if "check" in m:
                by.setdefault((m["bench"], m["cache"]), {})[m["variant"]] = m["check"]
        for (bench, cache), checks in by.items():
            ref_v, ref = next(iter(checks.items()))
            for v, c in checks.items():
                if c != ref:
                    problems.append(f"{bench}/{cache}: {v} returned other data than {ref_v}")
        return problems


def comparisons(runner: Runner, cfg: Cfg) -> list[dict[str, Any]]:
    med = {(m["bench"], m["variant"], m["cache"]): m for m in runner.measurements}
    gb = cfg.nbytes / 1e9
    rows: list[dict[str, Any]] = []

    def t(bench: str, variant: str, cache: str) -> float | None:
        m = med.get((bench, variant, cache))
        return None if m is None else m["median_s"]

    def add(bench: str, label: str, cache: str, store_v: str, base_v: str | None, unit: str) -> None:
        ts = t(bench, store_v, cache)
        if ts is None:
            return
        tb = t(bench, base_v, cache) if base_v else None
        conv = (lambda x: gb / x) if unit == "GB/s" else (lambda x: x * 1e3)
        target = ROW_TARGETS.get((bench, base_v)) if base_v else None
        ratio = tb / ts if tb is not None else None
        rows.append({"bench": label, "cache": cache, "store_variant": LABELS.get(store_v, store_v),
                     "value": conv(ts), "unit": unit,
                     "baseline": LABELS.get(base_v, base_v) if base_v else None,
                     "baseline_value": conv(tb) if tb is not None else None,
                     "ratio": ratio, "target": f">= {target:.2f}x" if target else None,
                     "met": (ratio >= target) if (target and ratio is not None) else None})

    for base in ("npy", "h5"):
        add("write", "write (fsync incl.)", "-", "store", base, "GB/s")
    for cache in ("warm", "cold"):
        m = med.get(("open", "store", cache))
        if m is not None:
            rows.append({"bench": "open_store", "cache": cache, "store_variant": "store",
                         "value": m["median_s"], "unit": "s", "target": f"<= {OPEN_TARGET_S:g} s",
                         "met": m["median_s"] <= OPEN_TARGET_S})
            rss = H.median(m["rss_delta"])
            rows.append({"bench": "RSS after open", "cache": cache, "store_variant": "store",
                         "value": rss / 2**20, "unit": "MiB", "target": f"<= {OPEN_TARGET_RSS >> 20} MiB",
                         "met": rss <= OPEN_TARGET_RSS})
    for cache in ("warm", "cold"):
        add("scan", "full scan", cache, "store", "npy", "GB/s")
    k = min(cfg.gather, cfg.rows)
    for cache in ("warm", "cold"):
        for sv in ("store", "store+prefetch", "store-prefetch", "store+random"):
            refs = ("pread", "pread-threads") if sv == "store" else ()
            for base in ("npy", "h5") + refs:
                add("gather", f"gather {k:,} ids", cache, sv, base, "ms")
    bag_gb = sum(b - a for a, b in (cfg.bounds(i) for i in bag_slides(cfg))) * cfg.dim * 2 / 1e9
    for cache in ("warm", "cold"):
        n = len(rows)
        add("bags", f"{len(bag_slides(cfg))} slide bags", cache, "store", "h5", "GB/s")
        for r in rows[n:]:  # GB/s of the bags read, not of the whole store
            r["value"] *= bag_gb / gb
            r["baseline_value"] *= bag_gb / gb
    return rows


def measurement_rows(runner: Runner, cfg: Cfg) -> list[dict[str, Any]]:
    out = []
    for m in runner.measurements:
        r = {"bench": m["bench"], "cache": m["cache"], "variant": LABELS.get(m["variant"], m["variant"]),
             "median_ms": m["median_s"] * 1e3, "min_ms": min(m["times"]) * 1e3,
             "max_ms": max(m["times"]) * 1e3, "n": len(m["times"])}
        if m.get("io_read"):
            r["read_mb"] = H.median(m["io_read"]) / 1e6
        if m.get("majflt"):
            r["majflt"] = H.median(m["majflt"])
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:  # long: ~20 flags, then the sections in order
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows in all (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=768, help="embedding dim (default 768)")
    ap.add_argument("--slide-rows", type=int, default=10_000, help="tiles per slide (default 10,000)")
    ap.add_argument("--gather", type=int, default=10_000, help="random ids per gather (default 10,000)")
    ap.add_argument("--bag-slides", type=int, default=100, help="slides per MIL epoch (default 100)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per read (default 5)")
    ap.add_argument("--write-repeats", type=int, default=3, help="writes per format (default 3)")
    ap.add_argument("--threads", type=int, default=16, help="threads of the threaded pread reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="write,open,scan,gather,bags",
                    help="comma-separated subset of write,open,scan,gather,bags")
    ap.add_argument("--cache", default="warm,cold", help="warm,cold or one of them")
    ap.add_argument("--keep", action="store_true", help="keep the scratch data")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse scratch data kept by an earlier --keep run of the same size (no writes)")
    ap.add_argument("--no-save", action="store_true", help="do not write the JSON results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return 0
    if a.dim % 4:
        ap.error("--dim must be a multiple of 4 (rows are folded as int64)")
    if a.rows < a.slide_rows:
        ap.error("--rows must be at least --slide-rows")
    scratch = H.SCRATCH / NAME
    cfg = Cfg(rows=a.rows, dim=a.dim, slide_rows=a.slide_rows, gather=a.gather,
              bag_slides=min(a.bag_slides, -(-a.rows // a.slide_rows)), seed=a.seed,
              scratch=str(scratch), threads=a.threads)
    need = cfg.nbytes * 3.2 + (300 << 20)
    if need > 10e9:
        ap.error(f"this run needs ~{need / 1e9:.1f} GB of scratch; the limit is 10 GB")
    only = set(a.only.split(","))
    caches = [c for c in ("warm", "cold") if c in a.cache.split(",")]
    free = shutil.disk_usage(H.HERE).free
    if not a.reuse and need > free * 0.8:
        ap.error(f"this run needs ~{need / 1e9:.1f} GB of scratch, {free / 1e9:.1f} GB are free")
    log(f"{NAME}: {cfg.rows:,} x {cfg.dim} float16 ({cfg.nbytes / 1e9:.2f} GB), {cfg.n_slides} slides "
        f"of {cfg.slide_rows:,}; scratch {scratch}")
    marker = scratch / "cfg.json"
    runner = Runner(cfg, a.repeats)
    t_start, load_start = time.time(), list(os.getloadavg())
    try:
        if a.reuse:
            if not marker.exists() or json.loads(marker.read_text()) != asdict(cfg):
                ap.error("--reuse: no kept scratch data of this configuration")
        else:
            if scratch.exists():
                shutil.rmtree(scratch)
            scratch.mkdir(parents=True)
        if "write" in only or not a.reuse:
            log("writing")
            runner.writes(a.write_repeats)
            atomic_write_text(marker, json.dumps(asdict(cfg)))
        log("verifying that the three formats hold the same data")
        spawn(cfg, "verify")
        for cache in caches:
            log(f"{cache} reads")
            if cache == "warm":
                runner.ensure_warm()
            if "open" in only:
                runner.opens(cache)
            if "scan" in only:
                runner.read_bench("scan", ["store", "npy"], cache)
            if "gather" in only:
                vs = ["store", "store+prefetch", "store-prefetch", "npy", "h5", "pread", "pread-threads"]
                if cache == "cold":
                    vs.insert(3, "store+random")
                runner.read_bench("gather", vs, cache)
            if "bags" in only:
                runner.read_bench("bags", ["store", "h5"], cache)
        problems = runner.check_consistency()
        comp = comparisons(runner, cfg)
        meas = measurement_rows(runner, cfg)
        print()
        H.print_table(comp, [("bench", "benchmark", None), ("cache", "cache", None),
                             ("store_variant", "store path", None), ("value", "store", "num"),
                             ("unit", "unit", None), ("baseline", "vs", None),
                             ("baseline_value", "baseline", "num"), ("ratio", "ratio", "ratio"),
                             ("target", "target", None), ("met", "met", None)],
                      title=f"embedstore vs npy memmap vs TRIDENT h5: {cfg.rows:,} x {cfg.dim} float16, "
                            f"{cfg.n_slides} slides, {H.machine()['cpu']} x{os.cpu_count()} "
                            "(ratio = baseline time / store time: > 1 means the store is faster)")
        print()
        H.print_table(meas, [("bench", "bench", None), ("cache", "cache", None), ("variant", "variant", None),
                             ("median_ms", "median ms", "num"), ("min_ms", "min", "num"),
                             ("max_ms", "max", "num"), ("n", "runs", "d"), ("read_mb", "disk MB/run", "num"),
                             ("majflt", "major faults", ".0f")],
                      title="every measurement (disk MB: /proc/self/io read_bytes of the worker)")
        for p in problems:
            print("CONSISTENCY PROBLEM:", p)
        if not a.no_save:
            path = H.write_results(NAME, comp, extra={
                "config": {k: v for k, v in asdict(cfg).items() if k != "scratch"} | {
                    "repeats": a.repeats, "write_repeats": a.write_repeats, "only": sorted(only),
                    "caches": caches},
                "elapsed_s": time.time() - t_start,
                "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
                "consistency_problems": problems,
                "measurements": runner.measurements})
            print(f"\nresults: {path}")
        return 1 if problems else 0
    finally:
        if not a.keep and scratch.exists():
            shutil.rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())

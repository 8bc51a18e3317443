#!/usr/bin/env python
"""Random-id gathers from the store against numpy fancy indexing on a ``.npy`` memmap.

    .venv/bin/python benchmarks/bench_gather.py                      # 1,000,000 x 768 float16
    .venv/bin/python benchmarks/bench_gather.py --rows 400000 --dim 256 --shard-rows 16384
    .venv/bin/python benchmarks/bench_gather.py --variants --rounds 5      # the alternatives too

Writes ``--rows`` x ``--dim`` float16 rows once with ``StoreWriter`` (shards of
``--shard-rows``) and the same rows as one ``.npy``, then, each in a fresh worker process:
``store.gather(ids)`` of ``--gather`` random ids vs ``a[ids]`` on ``np.load(mmap_mode="r")``,
the store's gather both as it runs (io_uring where the kernel allows it) and with io_uring off
(``EMBEDSTORE_IO_URING=0``: ``preadv``, one call per run of rows).
**warm**: every file in the page cache, the first gather of the process timed (as a job's
first minibatch sees it), then the median of ``--repeats`` more; **cold**: the files dropped
from the page cache first (``_harness.evict``). Beside each time: the process's RSS growth
(``VmRSS``, of which ``RssFile``: pages of the files mapped into it) over the gather, and
the ratios store / numpy (of wall time, and of the first gather's CPU time: user + system,
less disturbed by other processes on a shared machine). Each case runs in ``--rounds`` fresh processes and keeps the fastest
first gather (this machine's 2 cores are shared: the minimum is the least disturbed run).
``--variants`` adds the other gathers tried (issue 14), each against the same numpy figures.
Scratch in ``benchmarks/scratch/bench_gather`` (``--keep`` keeps it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

NAME = "bench_gather"

WORKER = r"""
import json, mmap, os, sys, time
import numpy as np
kind, path, k, repeats = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if kind == "store_preadv":               # the store with io_uring off: one preadv call per run
    os.environ["EMBEDSTORE_IO_URING"], kind = "0", "store"
sys.path.insert(0, sys.argv[1])
import _harness as H                     # (imports embedstore)
if kind == "numpy":
    a = np.load(path, mmap_mode="r")
    n, get = len(a), lambda ids: np.asarray(a[ids])
else:
    from embedstore.store import open_store
    s = open_store(path)
    n, m = s.n_rows_committed, s.embeddings
    rb = m.dim * m.dtype.itemsize
    def where(ids):   # sorted rows: order, descriptor and file offset of each
        pos = s._live_positions(ids)
        order = np.argsort(pos, kind="stable")
        pc = np.searchsorted(m.starts, pos[order], side="right") - 1
        return order, m._fd[pc], m._off[pc] + (pos[order] - m.starts[pc]) * rb
    def pread_join(ids):     # the gather before issue 14: one bytes object per row, joined
        order, fd, off = where(ids)
        data = b"".join([os.pread(f, rb, o) for f, o in zip(fd.tolist(), off.tolist())])
        out = np.empty((ids.size, m.dim), m.dtype)
        out[order] = np.frombuffer(data, m.dtype).reshape(-1, m.dim)
        return out
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(2)
    def preadv_threads(ids):  # preadv into the result, the sorted rows split over 2 threads
        order, fd, off = where(ids)
        out = np.empty((ids.size, m.dim), m.dtype)
        mv = out.data.cast("B")
        bufs = [[mv[d:d + rb]] for d in (order * rb).tolist()]
        h = ids.size // 2
        part = lambda a, b: sum(map(os.preadv, fd[a:b].tolist(), bufs[a:b], off[a:b].tolist()))
        assert sum(f.result() for f in [pool.submit(part, 0, h), pool.submit(part, h, ids.size)]) == out.nbytes
        return out
    def map_random(ids):      # copy from the store's mapping with MADV_RANDOM advice
        m.advise(mmap.MADV_RANDOM)
        pos = s._live_positions(ids)
        order, srows, bounds, piece = m.locate(pos)
        out = np.empty((ids.size, m.dim), m.dtype)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            p = m.pieces[piece[a]]
            dst = slice(a, b) if order is None else order[a:b]
            out[dst] = p.emb[srows[a:b] - p.start]
        return out
    get = {"store": s.gather, "pread_join": pread_join, "preadv_threads": preadv_threads,
           "map_random": map_random}[kind]
ids = np.random.default_rng(11).choice(n, k, replace=False)
r0 = H.rss(); c0 = time.process_time(); t0 = time.perf_counter()
out = get(ids)
first = time.perf_counter() - t0
cpu = time.process_time() - c0
r1 = H.rss()
runs = H.time_runs(lambda i: get(ids), repeats)
if kind == "store":
    from embedstore.store import uring
    assert (uring.disabled() is None) == (os.environ.get("EMBEDSTORE_IO_URING") != "0"), uring.disabled()
print(json.dumps({"first_s": first, "cpu_s": cpu, "again_s": H.median(runs), "bytes": int(out.nbytes),
                  "rss": r1["VmRSS"] - r0["VmRSS"], "rss_file": r1["RssFile"] - r0["RssFile"],
                  "check": float(out[:, :8].astype(np.float64).sum())}))
"""
VARIANTS = {"store": "store.gather (io_uring, 2 threads)",
            "store_preadv": "store.gather, io_uring off (preadv)", "pread_join": "pread per row + join (before)",
            "preadv_threads": "preadv, 2 threads", "map_random": "the store's map, MADV_RANDOM"}


def _write(root: Path, rows: int, dim: int, shard_rows: int) -> tuple[Path, Path, float, float]:
    from embedstore.store import StoreMeta, StoreWriter
    store, npy = root / "store", root / "emb.npy"
    meta = StoreMeta(dim=dim, dtype="float16", backbone={"name": "synthetic", "kind": "bench"},
                     weights_sha256="0" * 64, transform={"size": 224}, tile={"tile_size": 224, "mpp": 0.5})
    rng = np.random.default_rng(0)
    slide = 5000
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(rows, dim))
    t0 = time.perf_counter()
    with StoreWriter(store, meta, rows_per_shard=shard_rows, spill_rows=shard_rows) as w:
        for u, s in enumerate(range(0, rows, slide)):
            m = min(slide, rows - s)
            emb = rng.standard_normal((m, dim), dtype=np.float32).astype(np.float16)
            mm[s:s + m] = emb
            w.add(emb, [f"slide{u:05d}/{i}" for i in range(m)], unit=f"u{u}", slide=f"slide{u:05d}",
                  x=np.arange(m), y=np.zeros(m, np.int64))
            w.end_unit(f"u{u}")
    mm.flush()
    del mm
    return store, npy, time.perf_counter() - t0, rows * dim * 2 / 1e9


def _worker(kind: str, path: Path, k: int, repeats: int) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", WORKER, str(HERE), kind, str(path), str(k), str(repeats)],
                       capture_output=True, text=True, check=True)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--gather", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per case (the fastest kept)")
    ap.add_argument("--variants", action="store_true",
                    help="also the gathers tried for issue 14: pread + join, 2 threads, the map with MADV_RANDOM")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    root = H.SCRATCH / NAME
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        store, npy, write_s, gb = _write(root, a.rows, a.dim, a.shard_rows)
        files = H.files_under(store, npy)
        rows: list[dict[str, Any]] = []
        kinds = list(VARIANTS) if a.variants else ["store", "store_preadv"]
        for temp in ("warm", "cold"):
            got: dict[str, dict[str, Any]] = {}
            for kind in ["numpy"] + kinds:
                path = npy if kind == "numpy" else store
                best: dict[str, Any] | None = None
                for _ in range(a.rounds):            # fresh processes; the fastest first gather
                    H.prewarm(files) if temp == "warm" else H.evict(files)
                    r = _worker(kind, path, a.gather, a.repeats)
                    best = r if best is None or r["first_s"] < best["first_s"] else best
                assert best is not None
                got[kind] = best
            n = got["numpy"]
            for kind in kinds:
                s = got[kind]
                assert s["check"] == n["check"], f"{kind} and the memmap returned different rows"
                for what, key in (("first gather", "first_s"), ("again", "again_s")):
                    first = what == "first gather"
                    rows.append({"case": f"{temp}: {what}", "path": VARIANTS[kind],
                                 "store_ms": s[key] * 1e3, "numpy_ms": n[key] * 1e3,
                                 "ratio": s[key] / n[key] if n[key] else float("nan"),
                                 "cpu_ratio": s["cpu_s"] / n["cpu_s"] if first and n["cpu_s"] else None,
                                 "store_rss_mb": s["rss"] / 1e6 if first else None,
                                 "numpy_rss_mb": n["rss"] / 1e6 if first else None,
                                 "store_rss_x": s["rss"] / s["bytes"] if first else None,
                                 "numpy_rss_x": n["rss"] / n["bytes"] if first else None})
        H.print_table(rows, [("case", "case", None), ("path", "path", None), ("store_ms", "store ms", "num"),
                             ("numpy_ms", "numpy ms", "num"), ("ratio", "store/numpy", "ratio"),
                             ("cpu_ratio", "CPU store/numpy", "ratio"),
                             ("store_rss_mb", "store +RSS MB", "num"), ("store_rss_x", "÷ bytes", "num"),
                             ("numpy_rss_mb", "numpy +RSS MB", "num"), ("numpy_rss_x", "÷ bytes", "num")],
                      title=f"gather {a.gather:,} random ids of {a.rows:,} x {a.dim} float16 "
                            f"({gb:.2f} GB; written in {write_s:.1f} s; best of {a.rounds} processes)")
        print("results:", H.write_results(NAME + ("-variants" if a.variants else ""), rows, {"args": vars(a)}))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Random-id gathers from the store against numpy fancy indexing on a ``.npy`` memmap.

    .venv/bin/python benchmarks/bench_gather.py                      # 1,000,000 x 768 float16
    .venv/bin/python benchmarks/bench_gather.py --rows 400000 --dim 256 --shard-rows 16384

Writes ``--rows`` x ``--dim`` float16 rows once with ``StoreWriter`` (shards of
``--shard-rows``) and the same rows as one ``.npy``, then, each in a fresh worker process:
``store.gather(ids)`` of ``--gather`` random ids vs ``a[ids]`` on ``np.load(mmap_mode="r")``.
**warm**: every file in the page cache, the first gather of the process timed (as a job's
first minibatch sees it), then the median of ``--repeats`` more; **cold**: the files dropped
from the page cache first (``_harness.evict``). Beside each time: the process's RSS growth
(``VmRSS``, of which ``RssFile``: pages of the files mapped into it) over the gather, and
the ratios store / numpy. Scratch in ``benchmarks/scratch/bench_gather`` (``--keep`` keeps it).
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
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import _harness as H
kind, path, k, repeats = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if kind == "store":
    from embedstore.store import open_store
    s = open_store(path)
    n, get = s.n_rows_committed, s.gather
else:
    a = np.load(path, mmap_mode="r")
    n, get = len(a), lambda ids: np.asarray(a[ids])
ids = np.random.default_rng(11).choice(n, k, replace=False)
r0 = H.rss(); t0 = time.perf_counter()
out = get(ids)
first = time.perf_counter() - t0
r1 = H.rss()
runs = H.time_runs(lambda i: get(ids), repeats)
print(json.dumps({"first_s": first, "again_s": H.median(runs), "bytes": int(out.nbytes),
                  "rss": r1["VmRSS"] - r0["VmRSS"], "rss_file": r1["RssFile"] - r0["RssFile"],
                  "check": float(out[:, :8].astype(np.float64).sum())}))
"""


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
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    root = H.SCRATCH / NAME
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        store, npy, write_s, gb = _write(root, a.rows, a.dim, a.shard_rows)
        files = H.files_under(store, npy)
        rows: list[dict[str, Any]] = []
        for temp in ("warm", "cold"):
            got = {}
            for kind, path in (("store", store), ("numpy", npy)):
                if temp == "warm":
                    H.prewarm(files)
                else:
                    H.evict(files)
                got[kind] = _worker(kind, path, a.gather, a.repeats)
            s, n = got["store"], got["numpy"]
            assert s["check"] == n["check"], "the store and the memmap returned different rows"
            for what, key in (("first gather", "first_s"), ("again", "again_s")):
                rows.append({"case": f"{temp}: {what}", "store_ms": s[key] * 1e3, "numpy_ms": n[key] * 1e3,
                             "ratio": s[key] / n[key] if n[key] else float("nan"),
                             "store_rss_mb": s["rss"] / 1e6 if what == "first gather" else None,
                             "numpy_rss_mb": n["rss"] / 1e6 if what == "first gather" else None,
                             "store_rss_x": s["rss"] / s["bytes"] if what == "first gather" else None,
                             "numpy_rss_x": n["rss"] / n["bytes"] if what == "first gather" else None})
        H.print_table(rows, [("case", "case", None), ("store_ms", "store ms", "num"),
                             ("numpy_ms", "numpy ms", "num"), ("ratio", "store/numpy", "ratio"),
                             ("store_rss_mb", "store +RSS MB", "num"), ("store_rss_x", "÷ bytes", "num"),
                             ("numpy_rss_mb", "numpy +RSS MB", "num"), ("numpy_rss_x", "÷ bytes", "num")],
                      title=f"gather {a.gather:,} random ids of {a.rows:,} x {a.dim} float16 "
                            f"({gb:.2f} GB; written in {write_s:.1f} s)")
        print("results:", H.write_results(NAME, rows, {"args": vars(a)}))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

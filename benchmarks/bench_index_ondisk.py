"""Question: can a store whose vectors exceed the memory given to the process be indexed and
searched? The on-disk IVF (inverted lists in STORE/index/*.ivfdata, memory-mapped) is built and
searched in child processes under a hard limit on private memory, side by side with the exact
references.

    python benchmarks/bench_index_ondisk.py                      # 2,000,000 x 256 float16 = 1 GB
    python benchmarks/bench_index_ondisk.py --n 200000 --quick   # a smoke run
    python benchmarks/bench_index_ondisk.py --n 2000000 --limit 1536M --budget 256M --keep

The limit is ``RLIMIT_DATA`` (private writable memory: heap, anonymous maps, thread stacks),
set in each child before it imports faiss. Unlike ``RLIMIT_AS`` it does not count file-backed
read-only or shared maps, so the store's shards and the index's ``.ivfdata`` stay mappable:
their pages are page cache, which the kernel reclaims, while everything the process must hold
itself has to fit under the limit. RLIMIT_DATA counts reserved private memory, not touched:
malloc arenas (the children run with MALLOC_ARENA_MAX=2), OpenBLAS buffers and thread stacks
reserve more than they use, so the limit must sit well above the peak private RSS (a 1 GB limit
failed a 2M x 256 build whose private RSS peaked at 296 MB). Each row reports the vector bytes (float16 as stored, and
float32 as indexed), the child's peak RSS (``VmHWM``: includes mapped file pages), its peak
private RSS (``RssAnon``, sampled every 10 ms) and, for searches, QPS and recall@10 against
exact search on held-out queries (never stored).

Rows: the on-disk build (``build_index(on_disk=True, memory_budget=...)``), its search
(``embedstore.index.search`` on 200 queries, end to end with exact re-ranking from the store),
the streamed exact scan (``exact_search``: the ground truth, also under the limit) and, without
the limit, numpy brute force over the float32 matrix in RAM (what the limit rules out).
The store lives under benchmarks/scratch/ (gitignored) and is removed unless --keep; results go
to benchmarks/results/ (``_harness.write_results``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import _harness as H  # noqa: E402
import bench_index  # noqa: E402

from embedstore.sizes import format_bytes, parse_size  # noqa: E402
from embedstore.store.atomic import atomic_path  # noqa: E402

NAME = "bench_index_ondisk"
K = 10
TILES_PER_SLIDE = 5000


# ---------------------------------------------------------------- memory, measured in the child

class PeakAnon:
    """Samples RssAnon of this process every ``every`` seconds in a thread; ``peak`` bytes."""

    def __init__(self, every: float = 0.01) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, H.rss().get("RssAnon", 0))
            time.sleep(every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, H.rss().get("RssAnon", 0))
        return self.peak


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------- data: a real store

def phase_gen(root: Path, n: int, dim: int, n_queries: int) -> dict[str, Any]:
    """bench_index's clustered store (and held-out queries), with larger slides."""
    return bench_index.phase_gen(root, n, dim, n_queries, tiles_per_slide=TILES_PER_SLIDE)


_open = bench_index._open          # the same store layout and recall against truth.npy
_recall = bench_index._recall


# ---------------------------------------------------------------- phases (one per child)

def phase_exact(root: Path) -> dict[str, Any]:
    """The streamed exact scan (ground truth): batch by batch, never the matrix."""
    from embedstore.index import exact_search

    store = _open(root)
    q = np.load(root / "queries.npy").astype(np.float32)
    t0 = time.perf_counter()
    _, ids = exact_search(store, q, K)
    dt = time.perf_counter() - t0
    with atomic_path(root / "truth.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, ids)
    return {"recall": 1.0, "qps": round(len(q) / dt, 1), "seconds": round(dt, 1)}


def phase_build(root: Path, budget: str, target: float, shard_rows: int | None,
                n_queries: int) -> dict[str, Any]:
    from embedstore.index import build_index

    store = _open(root)
    t0 = time.perf_counter()
    info = build_index(store, on_disk=True, memory_budget=budget, target_recall=target,
                       shard_rows=shard_rows, n_queries=n_queries)
    return {"seconds": round(time.perf_counter() - t0, 1), "factory": info.factory,
            "params": info.params, "build_recall": info.recall_at_10, "build_qps": info.qps,
            "build_s": info.build_seconds, "tune_s": info.tune_seconds,
            "index_bytes": info.memory_bytes, "ivfdata_bytes": info.ivfdata_bytes}


def phase_search(root: Path) -> dict[str, Any]:
    """``search()`` end to end from a fresh process: load (mmap), 200 queries, re-ranked."""
    from embedstore.index import search

    store = _open(root)
    q = np.load(root / "queries.npy").astype(np.float32)
    search(store, vectors=q[:10], k=K)               # load the index once (mmap, not read)
    t0 = time.perf_counter()
    hits = search(store, vectors=q, k=K)
    dt = time.perf_counter() - t0
    ids = np.stack([h.ids[:K] for h in hits])
    if not hits[0].method.startswith("index"):        # the build failed: no index to search
        return {"ok": False, "error": f"no on-disk index ({hits[0].method})"}
    return {"recall": _recall(ids, root), "qps": round(len(q) / dt, 1),
            "seconds": round(dt, 2), "method": hits[0].method}


def phase_numpy(root: Path) -> dict[str, Any]:
    """Brute force with the float32 matrix in RAM: what does not fit under the limit."""
    from _index_baselines import normalised_rows
    from embedstore.arrays import l2_normalise

    store = _open(root)
    t0 = time.perf_counter()
    x, row_ids = normalised_rows(store)
    load = time.perf_counter() - t0
    q = l2_normalise(np.load(root / "queries.npy"))
    t1 = time.perf_counter()
    scores = q @ x.T
    top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    best = row_ids[np.take_along_axis(top, order, axis=1)]
    dt = time.perf_counter() - t1
    return {"recall": _recall(best, root), "qps": round(len(q) / dt, 1),
            "seconds": round(load + dt, 1)}


PHASES = {"exact": phase_exact, "build": phase_build, "search": phase_search,
          "numpy": phase_numpy}


def child(args: argparse.Namespace) -> None:
    """One phase in this process, under RLIMIT_DATA when given; one JSON line on stdout."""
    if args.limit_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (args.limit_bytes, args.limit_bytes))
    sampler = PeakAnon()
    import faiss
    faiss.omp_set_num_threads(args.threads)
    root = Path(args.root)
    kwargs: dict[str, Any] = {}
    if args.phase == "build":
        kwargs = {"budget": args.budget, "target": args.target, "shard_rows": args.shard_rows,
                  "n_queries": args.build_queries}
    try:
        out = {"ok": True, **PHASES[args.phase](root, **kwargs)}
    except MemoryError as exc:
        out = {"ok": False, "error": f"MemoryError: {exc}"}
    out["peak_anon"] = sampler.stop()
    out["peak_rss"] = _vm_hwm()
    print("RESULT " + json.dumps(out), flush=True)


def _run(args: argparse.Namespace, phase: str, limit: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", phase, "--root", str(args.root),
           "--limit-bytes", str(limit), "--budget", args.budget, "--target", str(args.target),
           "--threads", str(args.threads), "--build-queries", str(args.build_queries)]
    if args.shard_rows:
        cmd += ["--shard-rows", str(args.shard_rows)]
    t0 = time.perf_counter()
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}   # fewer malloc arenas: RLIMIT_DATA counts
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)   # their reservations
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[:300]}", "wall_s": wall}
    out = json.loads(line[len("RESULT "):])
    out["wall_s"] = round(wall, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--limit", default="1536M", help="RLIMIT_DATA of the build/search children")
    ap.add_argument("--budget", default="256M", help="memory budget given to build_index")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--shard-rows", type=int, default=500_000)
    ap.add_argument("--build-queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip the numpy row")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--limit-bytes", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        args.phase = args.child
        child(args)
        return
    args.root = args.root or H.SCRATCH / f"{NAME}-{args.n}x{args.dim}"
    limit = parse_size(args.limit, "--limit")
    gen = phase_gen(args.root, args.n, args.dim, args.queries)
    f16 = args.n * args.dim * 2
    print(f"store {args.n:,} x {args.dim} float16 = {format_bytes(f16)} "
          f"({format_bytes(2 * f16)} as float32); children limited to {format_bytes(limit)} "
          f"(RLIMIT_DATA); build budget {args.budget}; written in {gen['seconds']}s", flush=True)
    rows = []
    plan = [("exact scan (streamed, ground truth)", "exact", limit),
            ("on-disk IVF build", "build", limit),
            ("on-disk IVF search (search())", "search", limit)]
    if not args.quick:
        plan.append(("numpy brute force, float32 in RAM (no limit)", "numpy", 0))
    for label, phase, lim in plan:
        out = _run(args, phase, lim)
        out.update(method=label, limit=format_bytes(lim) if lim else "none",
                   vector_bytes_f16=f16, vector_bytes_f32=2 * f16,
                   anon_vs_f32=(out.get("peak_anon", 0) / (2 * f16)) if out.get("peak_anon") else None)
        rows.append(out)
        print(f"  {label}: {json.dumps({k: v for k, v in out.items() if k != 'method'})}", flush=True)
    table = [{**r, "vec": format_bytes(r["vector_bytes_f32"]),
              "rss": format_bytes(r["peak_rss"]) if r.get("peak_rss") else "-",
              "anon": format_bytes(r["peak_anon"]) if r.get("peak_anon") else "-",
              "ok_": r.get("ok", False)} for r in rows]
    H.print_table(table, [("method", "method", None), ("limit", "RLIMIT_DATA", None),
                          ("vec", "vectors f32", None), ("rss", "peak RSS", None),
                          ("anon", "peak private", None), ("anon_vs_f32", "private/vectors", "ratio"),
                          ("qps", "QPS", "num"), ("recall", "recall@10", ".3f"),
                          ("wall_s", "wall s", "num"), ("ok_", "ok", None)],
                  title=f"\n{NAME}: {args.n:,} x {args.dim}, {args.queries} held-out queries, k={K}")
    build = next((r for r in rows if r.get("factory")), {})
    if build:
        print(f"index {build['factory']} params {build['params']}: .faiss "
              f"{format_bytes(build['index_bytes'])}, .ivfdata {format_bytes(build['ivfdata_bytes'])};"
              f" build {build['build_s']:.0f}s + tune {build['tune_s']:.0f}s, build-time recall "
              f"{build['build_recall']:.3f}")
    path = H.write_results(NAME, rows, {"n": args.n, "dim": args.dim, "queries": args.queries,
                                        "limit": limit, "budget": args.budget,
                                        "shard_rows": args.shard_rows, "generation": gen})
    print(f"results: {path}")
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()

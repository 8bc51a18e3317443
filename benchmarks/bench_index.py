"""Question: on clustered 768-d float16 embeddings, does the auto index reach recall@10 >= 0.95
at >= 30x the QPS of numpy brute force? Side by side with exact FAISS Flat and LanceDB.

    python benchmarks/bench_index.py --n 100000            # ~minutes on 2 cores
    python benchmarks/bench_index.py --n 1000000           # long: run once
    python benchmarks/bench_index.py --n 100000 --no-lancedb --keep

Every method runs in its own subprocess so its peak memory (ru_maxrss) is its own; the numpy
baseline runs with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed from its environment. Data, the
fake store and LanceDB tables live under benchmarks/scratch/ (gitignored) and are removed at the
end unless --keep. Results: a table on stdout and JSON under benchmarks/results/.

TODO(lead): switch MemmapStore to the real store (embedstore.store.open_store on a store written
from the same vectors) once embedstore/store/ lands; and move the machine tag / table printing to
benchmarks/_harness.py when it exists.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
SCRATCH = HERE / "scratch"
RESULTS = HERE / "results"
K = 10
BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ---------------------------------------------------------------- data and the fake store

class MemmapStore:
    """The store API embedstore.index reads, over a float16 np.memmap (ids 0..n-1)."""

    def __init__(self, root: Path) -> None:
        meta = json.loads((root / "meta.json").read_text())
        self.path = root
        self.dim = int(meta["dim"])
        self.dtype = np.float16
        self._n = int(meta["n"])
        self._emb = np.memmap(root / "emb.f16", dtype=np.float16, mode="r",
                              shape=(self._n, self.dim))

    def __len__(self) -> int:
        return self._n

    @property
    def n_rows_committed(self) -> int:
        return self._n

    def scan(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, self._n, batch_size):
            e = min(self._n, s + batch_size)
            yield np.arange(s, e, dtype=np.int64), self._emb[s:e]

    def all_ids(self) -> np.ndarray:
        return np.arange(self._n, dtype=np.int64)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self._emb[np.asarray(ids, dtype=np.int64)]

    def ids(self, keys: Sequence[str]) -> np.ndarray:
        return np.array([int(key.rsplit("/", 1)[1]) for key in keys], dtype=np.int64)

    def keys_of(self, ids: np.ndarray) -> list[str]:
        return [f"slide{i // 2000:04d}/{i}" for i in np.asarray(ids)]

    def metadata(self, ids: np.ndarray, columns: Sequence[str] = ("key", "slide", "x", "y", "label")
                 ) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        cols = {"key": lambda: np.array(self.keys_of(ids), dtype=object),
                "slide": lambda: np.array([f"slide{i // 2000:04d}" for i in ids], dtype=object),
                "x": lambda: (ids % 2000) * 224, "y": lambda: (ids // 2000) * 0,
                "label": lambda: np.full(len(ids), None, dtype=object)}
        return {name: cols[name]() for name in columns}

    def labels(self, keys: Sequence[str], task: str | None = None) -> np.ndarray:
        return np.full(len(keys), None, dtype=object)

    def is_deleted(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros(len(np.asarray(ids)), dtype=bool)


def _generator(dim: int, n_clusters: int, seed: int):
    """Clustered embeddings: cluster centre + rank-32 spread + isotropic noise (float16)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    basis = (rng.normal(size=(32, dim)) / np.sqrt(32)).astype(np.float32)

    def draw(count: int, draw_seed: int) -> np.ndarray:
        r = np.random.default_rng(draw_seed)
        z = r.integers(0, n_clusters, size=count)
        x = centres[z] + 0.8 * (r.standard_normal((count, 32), dtype=np.float32) @ basis)
        x += 0.3 * r.standard_normal((count, dim), dtype=np.float32)
        return x.astype(np.float16)
    return draw


def phase_gen(root: Path, n: int, dim: int, n_queries: int) -> dict:
    if (root / "meta.json").exists():
        return {"seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    draw = _generator(dim, max(100, n // 1000), seed=0)
    emb = np.memmap(root / "emb.f16", dtype=np.float16, mode="w+", shape=(n, dim))
    chunk = 65536
    for s in range(0, n, chunk):
        emb[s:s + chunk] = draw(min(chunk, n - s), draw_seed=1000 + s // chunk)
    emb.flush()
    del emb
    np.save(root / "queries.npy", draw(n_queries, draw_seed=7))   # held out: never stored
    (root / "meta.json").write_text(json.dumps({"n": n, "dim": dim}))
    return {"seconds": round(time.perf_counter() - t0, 1), "reused": False}


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _recall(found: np.ndarray, root: Path) -> float:
    truth = np.load(root / "truth.npy")
    hits = (found[:, :K, None] == truth[:, None, :K]).any(axis=1).sum(axis=1)
    return round(float(np.mean(hits / K)), 4)


# ---------------------------------------------------------------- methods (one per subprocess)

def phase_flat(root: Path) -> dict:
    """Exact FAISS Flat (inner product on normalised float32): also writes the ground truth."""
    import faiss

    store = MemmapStore(root)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(store.dim)
    for _, emb in store.scan():
        index.add(_normalised(emb))
    build = time.perf_counter() - t0
    q = _normalised(np.load(root / "queries.npy"))
    t1 = time.perf_counter()
    _, ids = index.search(q, K)
    dt = time.perf_counter() - t1
    np.save(root / "truth.npy", ids)
    return {"recall": 1.0, "qps": round(len(q) / dt, 1), "build_s": round(build, 1),
            "index_bytes": store.dim * 4 * len(store)}


def phase_numpy(root: Path) -> dict:
    """Brute force: one float32 normalised matrix in RAM, matmul + argpartition per chunk."""
    store = MemmapStore(root)
    t0 = time.perf_counter()
    x = np.empty((len(store), store.dim), dtype=np.float32)
    for ids, emb in store.scan():
        x[ids[0]:ids[-1] + 1] = _normalised(emb)
    load = time.perf_counter() - t0
    q = _normalised(np.load(root / "queries.npy"))
    t1 = time.perf_counter()
    best_s = np.full((len(q), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), K), -1, dtype=np.int64)
    chunk = 131072
    for s in range(0, len(x), chunk):
        scores = q @ x[s:s + chunk].T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, top + s], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :K]
        best_s = np.take_along_axis(cand_s, keep, axis=1)
        best_i = np.take_along_axis(cand_i, keep, axis=1)
    dt = time.perf_counter() - t1
    return {"recall": _recall(best_i, root), "qps": round(len(q) / dt, 1),
            "build_s": round(load, 1), "index_bytes": x.nbytes}


def phase_auto(root: Path, budget: str, target: float) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from embedstore.index import build_index, search
    from embedstore.index.search import _cached_index

    store = MemmapStore(root)
    info = build_index(store, memory_budget=budget, target_recall=target)
    q = np.load(root / "queries.npy").astype(np.float32)
    vindex = _cached_index(store, gpu=False)
    assert vindex is not None
    from embedstore.index._vectors import prepare
    qp = prepare(q, info.metric)
    vindex.query(store, qp[:50], K)                       # warm the mmap pages it touches
    t0 = time.perf_counter()
    _, found = vindex.query(store, qp, K)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    hits = search(store, vectors=q, k=K)
    dt_api = time.perf_counter() - t1
    api_ids = np.stack([h.ids for h in hits])
    return {"recall": _recall(found[:, :K], root), "qps": round(len(q) / dt, 1),
            "qps_search_api": round(len(q) / dt_api, 1), "recall_search_api": _recall(api_ids, root),
            "build_s": round(info.build_seconds, 1), "tune_s": round(info.tune_seconds, 1),
            "index_bytes": info.memory_bytes, "factory": info.factory, "params": info.params,
            "recall_at_build": info.recall_at_10, "qps_at_build": info.qps,
            "curve": info.curve, "reason": info.reason}


def phase_lancedb(root: Path, target: float) -> dict:
    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfPq

    store = MemmapStore(root)
    db_dir = root / "lancedb"
    shutil.rmtree(db_dir, ignore_errors=True)
    db = lancedb.connect(str(db_dir))

    # float32 columns: LanceDB's float16 path trains its index ~8x slower on this CPU
    def batches() -> Iterator[pa.RecordBatch]:
        for ids, emb in store.scan():
            flat = np.asarray(emb, dtype=np.float32).reshape(-1)
            vec = pa.FixedSizeListArray.from_arrays(pa.array(flat), store.dim)
            yield pa.record_batch([pa.array(ids), vec], names=["id", "vector"])

    schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), store.dim))])
    t0 = time.perf_counter()
    table = db.create_table("tiles", data=pa.RecordBatchReader.from_batches(schema, batches()))
    table.create_index("vector", config=IvfPq(distance_type="cosine"))
    build = time.perf_counter() - t0
    q = np.load(root / "queries.npy").astype(np.float32)

    def run(nprobes: int | None, refine: int | None) -> dict:
        query = table.search(q).distance_type("cosine").limit(K).select(["id"])
        if nprobes:
            query = query.nprobes(nprobes)
        if refine:
            query = query.refine_factor(refine)
        t1 = time.perf_counter()
        res = query.to_arrow()
        dt = time.perf_counter() - t1
        qi = res["query_index"].to_numpy()
        ids = res["id"].to_numpy()
        found = np.full((len(q), K), -1, dtype=np.int64)
        for j in range(len(q)):
            mine = ids[qi == j][:K]
            found[j, :len(mine)] = mine
        return {"nprobes": nprobes, "refine_factor": refine, "recall": _recall(found, root),
                "qps": round(len(q) / dt, 1)}

    size = sum(p.stat().st_size for p in (db_dir).rglob("*") if p.is_file() and
               "_indices" in p.parts)
    default = run(None, None)
    curve = [default]
    tuned = None
    for refine in (None, 5, 10, 20):
        for nprobes in (20, 40, 80, 160):
            point = run(nprobes, refine)
            curve.append(point)
            if point["recall"] >= target:
                tuned = point
                break
        if tuned:
            break
    tuned = tuned or max(curve, key=lambda p: p["recall"])
    return {"recall": default["recall"], "qps": default["qps"], "build_s": round(build, 1),
            "index_bytes": size, "tuned": tuned, "curve": curve}


# ---------------------------------------------------------------- orchestration

def _run_phase(args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run this script with --phase in a subprocess; its JSON result plus its peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    timer = None
    if timeout:
        import threading
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if timer is not None:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        why = f"killed after {timeout:.0f}s" if timeout and proc.returncode == -9 else \
            f"exit {proc.returncode}"
        return {"error": why, "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    return result


def machine_tag() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import faiss
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "faiss": faiss.__version__}


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


def print_table(rows: dict, base_qps: float) -> None:
    print(f"\n{'method':<34}{'recall@10':>10}{'QPS':>10}{'x numpy':>9}{'build s':>9}"
          f"{'index':>11}{'peak RSS':>10}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<34}  {r['error']}")
            continue
        print(f"{name:<34}{r['recall']:>10.3f}{r['qps']:>10,.0f}{r['qps'] / base_qps:>8.1f}x"
              f"{r.get('build_s', 0):>9.1f}{_fmt_bytes(r.get('index_bytes', 0)):>11}"
              f"{r.get('peak_rss_mb', 0):>7,} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--memory-budget", default="8G")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--no-lancedb", action="store_true")
    ap.add_argument("--lancedb-timeout", type=float, default=3600.0,
                    help="seconds before the LanceDB phase is given up")
    ap.add_argument("--keep", action="store_true", help="keep benchmarks/scratch data")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = SCRATCH / f"index-{args.n}x{args.dim}"
    if args.phase:
        result = {"gen": lambda: phase_gen(root, args.n, args.dim, args.queries),
                  "flat": lambda: phase_flat(root), "numpy": lambda: phase_numpy(root),
                  "auto": lambda: phase_auto(root, args.memory_budget, args.target_recall),
                  "lancedb": lambda: phase_lancedb(root, args.target_recall)}[args.phase]()
        print(json.dumps(result))
        return 0

    common = ["--n", str(args.n), "--dim", str(args.dim), "--queries", str(args.queries),
              "--memory-budget", args.memory_budget, "--target-recall", str(args.target_recall)]
    print(f"# bench_index: {args.n:,} x {args.dim} float16, {args.queries} queries, k={K}",
          flush=True)
    gen = _run_phase([*common, "--phase", "gen"])
    print(f"data: {gen}", flush=True)
    rows: dict[str, dict] = {}
    rows["faiss Flat (exact)"] = _run_phase([*common, "--phase", "flat"])
    numpy_env = {key: val for key, val in os.environ.items() if key not in BLAS_VARS}
    rows["numpy brute force"] = _run_phase([*common, "--phase", "numpy"], env=numpy_env)
    auto = _run_phase([*common, "--phase", "auto"])
    rows[f"embedstore auto ({auto.get('factory', '?')})"] = auto
    if not args.no_lancedb:
        try:
            import lancedb  # noqa: F401
            lance = _run_phase([*common, "--phase", "lancedb"], timeout=args.lancedb_timeout)
            rows["lancedb IVF_PQ default"] = lance
            if "tuned" in lance:
                t = lance["tuned"]
                rows[f"lancedb tuned (nprobes={t['nprobes']}, refine={t['refine_factor']})"] = {
                    **t, "build_s": lance["build_s"], "index_bytes": lance["index_bytes"],
                    "peak_rss_mb": lance["peak_rss_mb"]}
        except ImportError:
            rows["lancedb"] = {"error": "not installed (pip install lancedb: the bench extra)"}
    base = rows["numpy brute force"].get("qps", float("nan"))
    print_table(rows, base)
    ok = auto.get("recall", 0) >= args.target_recall and auto.get("qps", 0) >= 30 * base
    print(f"\nauto index: recall@10 {auto.get('recall', 0):.3f} (target {args.target_recall}),"
          f" {auto.get('qps', 0) / base:.1f}x numpy QPS (target 30x): {'MET' if ok else 'NOT MET'}")
    if "params" in auto:
        print(f"  tuned {auto['params']}; search() end to end {auto['qps_search_api']:,.0f} QPS,"
              f" recall {auto['recall_search_api']:.3f}; build {auto['build_s']}s + tune "
              f"{auto['tune_s']}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = machine_tag()
    out = RESULTS / f"index-{args.n}x{args.dim}-{tag['host']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": tag, "args": {k: v for k, v in vars(args).items()
                                                        if k != "phase"},
                               "data": gen, "rows": rows, "target_met": ok}, indent=1))
    print(f"wrote {out.relative_to(HERE.parent)}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

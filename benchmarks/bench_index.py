"""Question: on clustered 768-d float16 embeddings, does the auto index reach recall@10 >= 0.95
at >= 30x the QPS of numpy brute force? Side by side with exact FAISS Flat and LanceDB.

    python benchmarks/bench_index.py --n 100000            # ~minutes on 2 cores
    python benchmarks/bench_index.py --n 1000000           # long: run once
    python benchmarks/bench_index.py --n 100000 --no-lancedb --keep
    python benchmarks/bench_index.py --quick               # a smoke run: 20,000 x 128, no LanceDB
    python benchmarks/bench_index.py --quick --data spectrum   # decaying spectrum (intrinsic dim ~100)

Data sets (``--data``): ``clustered`` (isotropic clusters plus a rank-32 spread) and ``spectrum``
(one Gaussian whose covariance eigenvalues decay as exp(-i / 50) under a random rotation: a
participation ratio (sum l)^2 / sum l^2 of ~100, i.e. intrinsic dimension ~100, no clusters).
Besides the methods below, a hand-tuned FAISS sweep (HNSW32 efSearch, IVF-Flat nprobe, IVF-PQ
nprobe x re-rank depth through IndexRefineFlat) gives auto's QPS / the best hand-tuned QPS at
>= auto's recall (target >= 0.8).

The vectors are written once into a real store (``embedstore.store.StoreWriter``; every method
reads them back from it), with held-out queries beside it. Every method runs in its own
subprocess so its peak memory (ru_maxrss) is its own; the numpy baseline runs with
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed from its environment. The store and LanceDB tables
live under benchmarks/scratch/ (gitignored) and are removed at the end unless --keep. Results: a
table on stdout and JSON under benchmarks/results/ (``_harness.write_results``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import _harness as H  # noqa: E402

from embedstore.arrays import l2_normalise  # noqa: E402
from embedstore.sizes import format_bytes  # noqa: E402
from embedstore.store.atomic import atomic_path  # noqa: E402

NAME = "bench_index"
K = 10
BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
TILES_PER_SLIDE = 2000           # rows per unit (one synthetic slide) in the store


# ---------------------------------------------------------------- data: a real store

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


def _spectrum_generator(dim: int, seed: int, tau: float = 50.0):
    """Decaying spectrum: eigenvalues exp(-i / tau) (participation ratio ~2 tau) under a random
    rotation, plus a small common offset; float16."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scale = np.exp(-np.arange(dim) / (2 * tau)).astype(np.float32)      # sqrt of eigenvalues
    basis = (scale[:, None] * rotation.T).astype(np.float32)
    offset = (0.2 * rng.normal(size=dim) / np.sqrt(dim)).astype(np.float32)

    def draw(count: int, draw_seed: int) -> np.ndarray:
        r = np.random.default_rng(draw_seed)
        return (r.standard_normal((count, dim), dtype=np.float32) @ basis + offset).astype(np.float16)
    return draw


def _store(root: Path) -> Path:
    return root / "store"


def phase_gen(root: Path, n: int, dim: int, n_queries: int, data: str = "clustered",
              tiles_per_slide: int = TILES_PER_SLIDE) -> dict[str, Any]:
    """Write ``n`` clustered float16 rows into a store under ``root`` (one unit per
    ``tiles_per_slide`` rows, with slide and x metadata) and held-out queries beside it."""
    from embedstore.store import StoreMeta, StoreWriter

    if (root / "queries.npy").exists():           # written last: the store is complete
        return {"seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    draw = _generator(dim, max(100, n // 1000), seed=0) if data == "clustered" else \
        _spectrum_generator(dim, seed=0)
    meta = StoreMeta(dim=dim, dtype="float16", backbone={"name": f"synthetic-{data}"},
                     tile={"tile_size": 224})
    with StoreWriter(_store(root), meta) as w:
        for s in range(0, n, tiles_per_slide):
            count = min(tiles_per_slide, n - s)
            slide = f"slide{s // tiles_per_slide:04d}"
            w.add(draw(count, draw_seed=1000 + s // tiles_per_slide),
                  [f"{slide}/{i}" for i in range(s, s + count)], unit=slide, slide=slide,
                  x=224 * np.arange(count), y=0)
            w.end_unit(slide)
    with atomic_path(root / "queries.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, draw(n_queries, draw_seed=7))   # held out: never stored
    return {"seconds": round(time.perf_counter() - t0, 1), "reused": False}


def _open(root: Path) -> Any:
    from embedstore.store import open_store
    return open_store(_store(root))


def _recall(ids: np.ndarray, root: Path) -> float:
    truth = np.load(root / "truth.npy")
    hits = (ids[:, :K, None] == truth[:, None, :K]).any(axis=1).sum(axis=1)
    return round(float(np.mean(hits / K)), 4)


# ---------------------------------------------------------------- methods (one per subprocess)

def phase_flat(root: Path) -> dict[str, Any]:
    """Exact FAISS Flat (inner product on normalised float32): also writes the ground truth."""
    import faiss

    store = _open(root)
    t0 = time.perf_counter()
    index = faiss.IndexIDMap(faiss.IndexFlatIP(store.dim))
    for ids, emb in store.scan():
        index.add_with_ids(l2_normalise(emb), np.asarray(ids, dtype=np.int64))
    build = time.perf_counter() - t0
    q = l2_normalise(np.load(root / "queries.npy"))
    t1 = time.perf_counter()
    _, ids = index.search(q, K)
    dt = time.perf_counter() - t1
    np.save(root / "truth.npy", ids)
    return {"recall": 1.0, "qps": round(len(q) / dt, 1), "build_s": round(build, 1),
            "index_bytes": store.dim * 4 * len(store)}


def phase_numpy(root: Path) -> dict[str, Any]:
    """Brute force: one float32 normalised matrix in RAM, matmul + argpartition per chunk."""
    store = _open(root)
    t0 = time.perf_counter()
    x = np.empty((len(store), store.dim), dtype=np.float32)
    row_ids = np.empty(len(store), dtype=np.int64)       # matrix row -> store id
    start = 0
    for ids, emb in store.scan():
        x[start:start + len(ids)] = l2_normalise(emb)
        row_ids[start:start + len(ids)] = ids
        start += len(ids)
    load = time.perf_counter() - t0
    q = l2_normalise(np.load(root / "queries.npy"))
    t1 = time.perf_counter()
    best_scores = np.full((len(q), K), -np.inf, dtype=np.float32)
    best_rows = np.full((len(q), K), -1, dtype=np.int64)
    chunk = 131072
    for s in range(0, len(x), chunk):
        scores = q @ x[s:s + chunk].T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        cand_rows = np.concatenate([best_rows, top + s], axis=1)
        keep = np.argsort(-cand_scores, axis=1, kind="stable")[:, :K]
        best_scores = np.take_along_axis(cand_scores, keep, axis=1)
        best_rows = np.take_along_axis(cand_rows, keep, axis=1)
    dt = time.perf_counter() - t1
    return {"recall": _recall(row_ids[best_rows], root), "qps": round(len(q) / dt, 1),
            "build_s": round(load, 1), "index_bytes": x.nbytes}


def phase_auto(root: Path, budget: str, target: float) -> dict[str, Any]:
    """embedstore's auto index: the tuned index alone, and ``search()`` end to end."""
    from embedstore.index import build_index, load_index, search

    store = _open(root)
    info = build_index(store, memory_budget=budget, target_recall=target)
    q = np.load(root / "queries.npy").astype(np.float32)
    vindex = load_index(store)
    qp = l2_normalise(q)                                  # what search() queries with (cosine)
    vindex.query(store, qp[:50], K)                       # warm the mmap pages it touches
    t0 = time.perf_counter()
    _, ids = vindex.query(store, qp, K)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    hits = search(store, vectors=q, k=K)
    dt_api = time.perf_counter() - t1
    api_ids = np.stack([h.ids for h in hits])
    return {"recall": _recall(ids[:, :K], root), "qps": round(len(q) / dt, 1),
            "qps_search_api": round(len(q) / dt_api, 1), "recall_search_api": _recall(api_ids, root),
            "build_s": round(info.build_seconds, 1), "tune_s": round(info.tune_seconds, 1),
            "index_bytes": info.memory_bytes, "factory": info.factory, "params": info.params,
            "recall_at_build": info.recall_at_10, "qps_at_build": info.qps,
            "curve": info.curve, "reason": info.reason, "candidates": info.candidates,
            "sample_size": info.sample_size}


def _sweep_points(index: Any, q: np.ndarray, root: Path, name: str, param: str,
                  values: list[int], extra: dict[str, Any], build: float) -> list[dict[str, Any]]:
    import faiss

    space = faiss.ParameterSpace()
    points = []
    for value in values:
        space.set_index_parameter(index, param, value)
        index.search(q[:50], K)                            # warm
        t0 = time.perf_counter()
        _, ids = index.search(q, K)
        dt = time.perf_counter() - t0
        points.append({"config": name, param: value, **extra, "recall": _recall(ids, root),
                       "qps": round(len(q) / dt, 1), "build_s": round(build, 1)})
        if points[-1]["recall"] >= 0.999:
            break
    return points


def phase_sweep(root: Path) -> dict[str, Any]:
    """Hand-tuned FAISS on the same vectors (an in-RAM float32 copy): HNSW32 over efSearch,
    IVF-Flat over nprobe, IVF-PQ over nprobe x re-rank depth (IndexRefineFlat k_factor)."""
    import faiss

    store = _open(root)
    x = np.concatenate([l2_normalise(emb) for _, emb in store.scan()])
    q = l2_normalise(np.load(root / "queries.npy"))
    n, dim = x.shape
    nlist = 1 << max(4, round(np.log2(4 * np.sqrt(n))))
    train = x[np.random.default_rng(0).choice(n, min(n, 39 * nlist), replace=False)]
    m = max([c for c in (8, 12, 16, 24, 32, 48, 64, 96, 128) if dim % c == 0 and c <= max(8, dim // 12)]
            or [1])                                    # the largest PQ code dividing dim
    points: list[dict[str, Any]] = []
    ef = [16, 32, 64, 128, 256, 512]
    probes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    for name, factory, param, values, k_factors in [
            ("HNSW32", "HNSW32,Flat", "efSearch", ef, [0]),
            (f"IVF{nlist},Flat", f"IVF{nlist},Flat", "nprobe", probes, [0]),
            (f"IVF{nlist},PQ{m}+refine", f"IVF{nlist},PQ{m}np", "nprobe", probes, [5, 10, 20])]:
        t0 = time.perf_counter()
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        if k_factors != [0]:
            index = faiss.IndexRefineFlat(index)
        index.add(x)
        build = time.perf_counter() - t0
        for k_factor in k_factors:
            extra: dict[str, Any] = {}
            if k_factor:
                index.k_factor = k_factor
                extra = {"k_factor": k_factor}
            points += _sweep_points(index, q, root, name, param if not k_factor else "nprobe",
                                    values, extra, build)
        del index
    return {"points": points}


def phase_lancedb(root: Path, target: float) -> dict[str, Any]:
    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfPq

    store = _open(root)
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

    def run(nprobes: int | None, refine: int | None) -> dict[str, Any]:
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
        top = np.full((len(q), K), -1, dtype=np.int64)
        for j in range(len(q)):
            mine = ids[qi == j][:K]
            top[j, :len(mine)] = mine
        return {"nprobes": nprobes, "refine_factor": refine, "recall": _recall(top, root),
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

def _print_candidates(auto: dict[str, Any]) -> None:
    for c in auto.get("candidates", []):
        print(f"  {'*' if c['chosen'] else ' '} {c['label']:<26} {str(c['params']):<34} sample recall"
              f" {c['recall']:.3f}{' full ' + format(c['full_recall'], '.3f') if 'full_recall' in c else ''}"
              f"  predicted {c['qps']:>9,.0f} QPS  {format_bytes(c['memory_bytes']):>9}  build"
              f" {c['build_seconds']:.1f}s")


def _versus_hand_tuned(auto: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """auto's QPS / the best hand-tuned QPS among points with recall >= auto's (target >= 0.8)."""
    if not points or "recall" not in auto:
        return {}
    for p in points:
        knobs = {k: v for k, v in p.items() if k not in ("config", "recall", "qps", "build_s")}
        print(f"  hand-tuned {p['config']:<24} {str(knobs):<34} recall {p['recall']:.3f}"
              f"  {p['qps']:>9,.0f} QPS  build {p['build_s']:.1f}s")
    good = [p for p in points if p["recall"] >= auto["recall"]]
    if not good:
        print(f"\nno hand-tuned configuration reached auto's recall {auto['recall']:.3f}")
        return {"ratio": None}
    best = max(good, key=lambda p: p["qps"])
    ratio = auto["qps"] / best["qps"]
    print(f"\nauto {auto['qps']:,.0f} QPS at recall {auto['recall']:.3f} / best hand-tuned "
          f"{best['config']} {best['qps']:,.0f} QPS at recall {best['recall']:.3f}: {ratio:.2f} "
          f"(target >= 0.8: {'MET' if ratio >= 0.8 else 'NOT MET'})")
    return {"ratio": round(ratio, 3), "best": best}


def _run_phase(args: list[str], env: dict[str, str] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
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


COLUMNS = [("method", "method", None), ("recall", "recall@10", ".3f"), ("qps", "QPS", ",.0f"),
           ("x_numpy", "x numpy", "ratio"), ("build_s", "build s", ".1f"), ("index", "index", None),
           ("peak_rss_mb", "peak RSS MB", ",d")]


def _table_rows(rows: dict[str, dict[str, Any]], base_qps: float) -> list[dict[str, Any]]:
    out = []
    for name, r in rows.items():
        if "error" in r:
            out.append({"method": f"{name}: {r['error']}"})
            continue
        out.append({"method": name, "recall": r["recall"], "qps": r["qps"],
                    "x_numpy": r["qps"] / base_qps, "build_s": r.get("build_s", 0.0),
                    "index": format_bytes(r.get("index_bytes", 0)),
                    "peak_rss_mb": r.get("peak_rss_mb", 0)})
    return out


def _methods(common: list[str], no_lancedb: bool, lancedb_timeout: float) -> dict[str, dict[str, Any]]:
    """Every method in its own subprocess, in order: Flat (writes the truth), numpy, auto, LanceDB."""
    rows: dict[str, dict[str, Any]] = {}
    rows["faiss Flat (exact)"] = _run_phase([*common, "--phase", "flat"])
    numpy_env = {key: val for key, val in os.environ.items() if key not in BLAS_VARS}
    rows["numpy brute force"] = _run_phase([*common, "--phase", "numpy"], env=numpy_env)
    auto = _run_phase([*common, "--phase", "auto"])
    rows[f"embedstore auto ({auto.get('factory', '?')})"] = auto
    if no_lancedb:
        return rows
    try:
        import lancedb  # noqa: F401
    except ImportError:
        rows["lancedb"] = {"error": "not installed (pip install lancedb: the bench extra)"}
        return rows
    lance = _run_phase([*common, "--phase", "lancedb"], timeout=lancedb_timeout)
    rows["lancedb IVF_PQ default"] = lance
    if "tuned" in lance:
        t = lance["tuned"]
        rows[f"lancedb tuned (nprobes={t['nprobes']}, refine={t['refine_factor']})"] = {
            **t, "build_s": lance["build_s"], "index_bytes": lance["index_bytes"],
            "peak_rss_mb": lance["peak_rss_mb"]}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--memory-budget", default="8G")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--no-lancedb", action="store_true")
    ap.add_argument("--lancedb-timeout", type=float, default=3600.0,
                    help="seconds before the LanceDB phase is given up")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 20,000 x 128, 200 queries, no LanceDB")
    ap.add_argument("--keep", action="store_true", help="keep benchmarks/scratch data")
    ap.add_argument("--data", choices=("clustered", "spectrum"), default="clustered")
    ap.add_argument("--no-sweep", action="store_true", help="skip the hand-tuned FAISS sweep")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.queries, args.no_lancedb = 20_000, 128, 200, True
    root = H.SCRATCH / f"index-{args.data}-{args.n}x{args.dim}"
    if args.phase:
        result = {"gen": lambda: phase_gen(root, args.n, args.dim, args.queries, args.data),
                  "sweep": lambda: phase_sweep(root),
                  "flat": lambda: phase_flat(root), "numpy": lambda: phase_numpy(root),
                  "auto": lambda: phase_auto(root, args.memory_budget, args.target_recall),
                  "lancedb": lambda: phase_lancedb(root, args.target_recall)}[args.phase]()
        print(json.dumps(result))
        return 0

    common = ["--n", str(args.n), "--dim", str(args.dim), "--queries", str(args.queries),
              "--memory-budget", args.memory_budget, "--target-recall", str(args.target_recall),
              "--data", args.data]
    print(f"# {NAME}: {args.data} {args.n:,} x {args.dim} float16, {args.queries} queries, k={K}",
          flush=True)
    gen = _run_phase([*common, "--phase", "gen"])
    print(f"data: {gen}", flush=True)
    if "error" in gen:
        return 1
    rows = _methods(common, args.no_lancedb, args.lancedb_timeout)
    auto = next(r for name, r in rows.items() if name.startswith("embedstore auto"))
    base = rows["numpy brute force"].get("qps", float("nan"))
    text = H.print_table(_table_rows(rows, base), COLUMNS)
    ok = auto.get("recall", 0) >= args.target_recall and auto.get("qps", 0) >= 30 * base
    print(f"\nauto index: recall@10 {auto.get('recall', 0):.3f} (target {args.target_recall}),"
          f" {auto.get('qps', 0) / base:.1f}x numpy QPS (target 30x): {'MET' if ok else 'NOT MET'}")
    if "params" in auto:
        print(f"  tuned {auto['params']}; search() end to end {auto['qps_search_api']:,.0f} QPS,"
              f" recall {auto['recall_search_api']:.3f}; build {auto['build_s']}s + tune "
              f"{auto['tune_s']}s")
        _print_candidates(auto)
    sweep = {} if args.no_sweep else _run_phase([*common, "--phase", "sweep"])
    ratio = _versus_hand_tuned(auto, sweep.get("points", []))
    import faiss
    out = H.write_results(f"{NAME}-{args.data}-{args.n}x{args.dim}", rows, extra={
        "faiss": faiss.__version__, "data": gen, "target_met": ok, "table": text,
        "sweep": sweep, "auto_vs_hand_tuned": ratio, "candidates": auto.get("candidates", []),
        "args": {k: v for k, v in vars(args).items() if k != "phase"}})
    print(f"wrote {out.relative_to(HERE.parent)}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

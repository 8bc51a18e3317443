"""Question: on each data set, is the auto index (chosen by measurement) within 0.8x of the best
hand-tuned FAISS configuration's QPS at >= its recall@10, and >= 30x numpy brute force on the
1M-row set? Side by side with exact FAISS Flat, numpy and LanceDB; build time and peak RSS
beside every row.

    python benchmarks/bench_index.py --sets clustered:100000x256 spectrum:100000x256 pcam
    python benchmarks/bench_index.py --quick          # a smoke run: 20,000 x 128, no LanceDB
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_index.py \\
        --sets clustered:1000000x128 spectrum:300000x384 pcam --lancedb pcam spectrum

The data sets (``_index_sets.py``): ``clustered``, ``spectrum`` (intrinsic dimension ~100)
and ``pcam`` (real ONNX MobileNetV2 embeddings of PatchCamelyon tiles with their views), each
written once into a real store under benchmarks/scratch/ with fresh queries beside it. The
baselines (``_index_baselines.py``): exact Flat (the ground truth), numpy, the hand-tuned
FAISS sweep (HNSW32 efSearch, IVF-Flat nprobe, IVF-PQ nprobe x re-rank depth, in ~1.5x steps)
and LanceDB IVF_PQ / IVF_HNSW_SQ at a few nprobes x refine factors / ef. Each FAISS family's
fastest point at >= auto's recall (exact Flat included) is re-timed in alternation with auto's
saved index; the summary's ratio and both QPS are those paired timings, against the family
auto compares worst with ("best hand-tuned").

Every method runs in its own subprocess so its peak memory (ru_maxrss) is its own; the numpy
baseline runs with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed from its environment. Every
QPS is the best of up to 3 timed runs of all queries (the box is shared). Results: per-set
tables, a summary table, and JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
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
import _index_baselines as B  # noqa: E402
import _index_sets as S  # noqa: E402

from embedstore.arrays import l2_normalise  # noqa: E402
from embedstore.sizes import format_bytes  # noqa: E402

NAME = "bench_index"
K = S.K
BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
LANCE_KINDS = ("ivf_pq", "ivf_hnsw_sq")


def phase_gen(root: Path, n: int, dim: int, n_queries: int, data: str = "clustered",
              tiles_per_slide: int = S.TILES_PER_SLIDE) -> dict[str, Any]:
    """A synthetic set's store and queries under ``root`` (reused once its queries exist)."""
    if (root / "queries.npy").exists():           # written last: the store is complete
        return {"seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = S.write_synthetic(root, data, n, dim, n_queries, tiles_per_slide)
    return {**out, "seconds": round(time.perf_counter() - t0, 1), "reused": False}


_open = S.open_root                 # bench_index_ondisk reads the same store layout ...
_recall = S.recall                  # ... and recall against truth.npy


def phase_auto(root: Path, budget: str, target: float) -> dict[str, Any]:
    """embedstore's auto index: the tuned index alone, and ``search()`` end to end."""
    from embedstore.index import build_index, load_index, search

    store = S.open_root(root)
    t0 = time.perf_counter()
    info = build_index(store, memory_budget=budget, target_recall=target)
    wall = time.perf_counter() - t0
    q = np.load(root / "queries.npy").astype(np.float32)
    vindex = load_index(store)
    qp = l2_normalise(q)                                  # what search() queries with (cosine)
    vindex.query(store, qp[:50], K)                       # warm the mmap pages it touches
    dt, (_, ids) = S.best_seconds(lambda: vindex.query(store, qp, K))
    dt_api, hits = S.best_seconds(lambda: search(store, vectors=q, k=K), repeats=1)
    api_ids = np.stack([h.ids for h in hits])
    (root / "auto.json").write_text(json.dumps({"recall": S.recall(ids[:, :K], root)}))
    return {"recall": S.recall(ids[:, :K], root), "qps": round(len(q) / dt, 1),
            "qps_search_api": round(len(q) / dt_api, 1),
            "recall_search_api": S.recall(api_ids, root), "build_s": round(wall, 1),
            "index_build_s": round(info.build_seconds, 1), "tune_s": round(info.tune_seconds, 1),
            "index_bytes": info.memory_bytes, "factory": info.factory, "params": info.params,
            "recall_at_build": info.recall_at_10, "qps_at_build": info.qps,
            "curve": info.curve, "reason": info.reason, "candidates": info.candidates,
            "sample_size": info.sample_size}


def _run_phase(args: list[str], env: dict[str, str] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Run this script with --phase in a subprocess; its JSON result plus its peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer is not None:
        timer.start()
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if timer is not None:
        timer.cancel()
    code = os.waitstatus_to_exitcode(status)
    rss = round(usage.ru_maxrss / 1024)
    if code != 0:
        why = f"killed after {timeout:.0f}s" if timeout and code == -9 else f"exit {code}"
        return {"error": why, "peak_rss_mb": rss}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = rss
    return result


def _best_hand_tuned(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Among each family's best point at >= auto's recall (re-timed in alternation with auto:
    ``paired_qps``, ``auto_paired_qps``), the one auto compares worst with: the ratio."""
    paired = [p for p in points if "paired_qps" in p]
    if not paired:
        return {"ratio": None}
    best = min(paired, key=lambda p: p["auto_paired_qps"] / p["paired_qps"])
    return {"ratio": round(best["auto_paired_qps"] / best["paired_qps"], 3), "best": best}


def _knobs(p: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in p.items()
                    if k not in ("config", "recall", "qps", "build_s", "peak_rss_mb", "paired_qps",
                                 "auto_paired_qps", "index_bytes"))


def _lance_best(lance: dict[str, Any], recall: float) -> dict[str, Any] | None:
    """The fastest LanceDB point at >= ``recall``, else its highest recall."""
    curve = lance.get("curve", [])
    if not curve:
        return None
    good = [p for p in curve if p["recall"] >= recall]
    return max(good, key=lambda p: p["qps"]) if good else max(curve, key=lambda p: p["recall"])


DETAIL = [("method", "method", None), ("recall", "recall@10", ".3f"), ("qps", "QPS", ",.0f"),
          ("x_numpy", "x numpy", "ratio"), ("build_s", "build s", ".1f"), ("index", "index", None),
          ("peak_rss_mb", "peak RSS MB", ",d")]


def _detail(rows: dict[str, dict[str, Any]], base_qps: float, title: str) -> str:
    out = []
    for name, r in rows.items():
        if "error" in r:
            out.append({"method": f"{name}: {r['error']}"})
            continue
        out.append({"method": name, "recall": r["recall"], "qps": r["qps"],
                    "x_numpy": r["qps"] / base_qps, "build_s": r.get("build_s"),
                    "index": format_bytes(r.get("index_bytes", 0)),
                    "peak_rss_mb": r.get("peak_rss_mb", 0)})
    return H.print_table(out, DETAIL, title=title)


def _print_candidates(auto: dict[str, Any]) -> None:
    for c in auto.get("candidates", []):
        full = f" full {c['full_recall']:.3f}" if "full_recall" in c else ""
        if "full_qps" in c:
            full += f" (tuned: {c['full_tuned_recall']:.3f} at {c['full_qps']:,.0f} QPS)"
        print(f"  {'*' if c['chosen'] else ' '} {c['label']:<26} {str(c['params']):<34} sample "
              f"recall {c['recall']:.3f}{full}  predicted {c['qps']:>9,.0f} QPS "
              f"{format_bytes(c['memory_bytes']):>9}  build {c['build_seconds']:.1f}s")


def run_set(spec: str, common: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Every method on one data set, each in its own subprocess: the set's rows and summary."""
    name, _, _ = S.parse_set(spec)
    base = [*common, "--set", spec]
    gen = _run_phase([*base, "--phase", "gen"])
    print(f"\n# {spec}: {gen}", flush=True)
    if "error" in gen:
        return {"set": spec, "error": gen["error"]}
    rows: dict[str, dict[str, Any]] = {"faiss Flat (exact)": _run_phase([*base, "--phase", "flat"])}
    numpy_env = {key: val for key, val in os.environ.items() if key not in BLAS_VARS}
    rows["numpy brute force"] = _run_phase([*base, "--phase", "numpy"], env=numpy_env)
    auto = _run_phase([*base, "--phase", "auto"])
    rows[f"embedstore auto ({auto.get('factory', '?')} {_knobs(auto.get('params', {}))})"] = auto
    sweep = {} if args.no_sweep else _run_phase([*base, "--phase", "sweep"])
    lance: dict[str, dict[str, Any]] = {}
    if name in args.lancedb:
        for kind in LANCE_KINDS:
            lance[kind] = _run_phase([*base, "--phase", f"lancedb-{kind}"],
                                     timeout=args.lancedb_timeout)
            best = _lance_best(lance[kind], auto.get("recall", 0.0))
            if best is not None:
                rows[f"lancedb {kind} ({_knobs(best)})"] = {
                    **best, "build_s": lance[kind]["build_s"],
                    "index_bytes": lance[kind]["index_bytes"],
                    "peak_rss_mb": lance[kind]["peak_rss_mb"]}
            elif "error" in lance[kind]:
                rows[f"lancedb {kind}"] = lance[kind]
    numpy_qps = rows["numpy brute force"].get("qps", float("nan"))
    text = _detail(rows, numpy_qps, f"{spec} ({gen.get('n', 0):,} x {gen.get('dim', 0)}, "
                                    f"{gen.get('queries', 0)} queries)")
    _print_candidates(auto)
    versus = _best_hand_tuned(sweep.get("points", []))
    return {"set": spec, "data": gen, "rows": rows, "table": text, "sweep": sweep,
            "lancedb": lance, "versus": versus, "numpy_qps": numpy_qps}


SUMMARY = [("set", "data set", None), ("size", "n x dim", None), ("auto", "auto config", None),
           ("recall", "recall", ".3f"), ("qps", "QPS", ",.0f"), ("best", "best hand-tuned", None),
           ("best_recall", "recall", ".3f"), ("best_qps", "QPS", ",.0f"),
           ("ratio", "auto/best", "ratio"), ("numpy", "numpy QPS", ",.0f"),
           ("x_numpy", "auto/numpy", "ratio"), ("build_s", "auto build s", ".1f"),
           ("rss", "auto RSS MB", ",d"), ("lance", "LanceDB (best at >= auto recall)", None)]


def _summary_row(res: dict[str, Any]) -> dict[str, Any]:
    if "error" in res:
        return {"set": f"{res['set']}: {res['error']}"}
    auto = next(r for k, r in res["rows"].items() if k.startswith("embedstore auto"))
    best = res["versus"].get("best", {})
    lance = []
    for kind, r in res["lancedb"].items():
        p = _lance_best(r, auto.get("recall", 0.0))
        lance.append(f"{kind}: {r['error']}" if "error" in r else
                     f"{kind} {_knobs(p or {})} {p['recall']:.3f} @ {p['qps']:,.0f} QPS, "
                     f"build {r['build_s']:.0f}s, {r['peak_rss_mb']:,} MB" if p else kind)
    return {"set": res["set"].split(":")[0], "size": f"{res['data']['n']:,} x {res['data']['dim']}",
            "auto": f"{auto.get('factory', '?')} {_knobs(auto.get('params', {}))}",
            "recall": auto.get("recall"), "qps": best.get("auto_paired_qps", auto.get("qps")),
            "best": f"{best.get('config', '-')} {_knobs(best)}", "best_recall": best.get("recall"),
            "best_qps": best.get("paired_qps"), "ratio": res["versus"].get("ratio"),
            "numpy": res["numpy_qps"], "x_numpy": auto.get("qps", 0) / res["numpy_qps"],
            "build_s": auto.get("build_s"), "rss": auto.get("peak_rss_mb"),
            "lance": "; ".join(lance) or "-"}


def _phase(args: argparse.Namespace) -> dict[str, Any]:
    name, n, dim = S.parse_set(args.set)
    root = S.set_root(name, n, dim)
    if args.phase == "gen":
        return S.write_set(root, name, n, dim, args.queries, pcam_source=args.pcam_store)
    if args.phase.startswith("lancedb-"):
        return B.phase_lancedb(root, args.phase.split("-", 1)[1])
    return {"flat": lambda: B.phase_flat(root), "numpy": lambda: B.phase_numpy(root),
            "sweep": lambda: B.phase_sweep(root),
            "auto": lambda: phase_auto(root, args.memory_budget, args.target_recall)}[args.phase]()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--sets", nargs="+", default=["clustered:100000x256", "spectrum:100000x256",
                                                  "pcam"], help="NAME:NxDIM (pcam: its own size)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--memory-budget", default="8G")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--lancedb", nargs="*", default=["pcam"], choices=S.SETS,
                    help="the data sets LanceDB runs on (none: --lancedb)")
    ap.add_argument("--lancedb-timeout", type=float, default=900.0)
    ap.add_argument("--pcam-store", type=Path, default=S.PCAM_STORE)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20,000 x 128, 500 queries, no LanceDB")
    ap.add_argument("--keep", action="store_true", help="keep benchmarks/scratch data")
    ap.add_argument("--no-sweep", action="store_true", help="skip the hand-tuned FAISS sweep")
    ap.add_argument("--set", help=argparse.SUPPRESS)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps(_phase(args)))
        return 0
    if args.quick:
        args.sets, args.queries, args.lancedb = ["clustered:20000x128", "spectrum:20000x128"], 500, []
    common = ["--queries", str(args.queries), "--memory-budget", args.memory_budget,
              "--target-recall", str(args.target_recall), "--pcam-store", str(args.pcam_store)]
    print(f"# {NAME}: {' '.join(args.sets)}; {args.queries} queries, k={K}, target recall "
          f"{args.target_recall}", flush=True)
    t0 = time.perf_counter()
    results = [run_set(spec, common, args) for spec in args.sets]
    print()
    text = H.print_table([_summary_row(r) for r in results], SUMMARY,
                         title=f"summary (target: auto/best >= 0.8 on each; auto/numpy >= 30x "
                               f"on the 1M rows)")
    import faiss
    try:
        import lancedb
        lance_version = lancedb.__version__
    except ImportError:
        lance_version = None
    tag = "+".join(s.replace(":", "-") for s in args.sets)
    out = H.write_results(f"{NAME}-{tag}", [_summary_row(r) for r in results], extra={
        "faiss": faiss.__version__, "lancedb": lance_version, "summary": text,
        "seconds": round(time.perf_counter() - t0, 1), "sets": results,
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("phase", "set")}})
    print(f"wrote {out.relative_to(HERE.parent)} in {time.perf_counter() - t0:.0f}s")
    if not args.keep:
        for spec in args.sets:
            shutil.rmtree(S.set_root(*S.parse_set(spec)), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

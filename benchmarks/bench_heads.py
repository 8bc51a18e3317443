"""How fast is a linear head on stored embeddings, next to scikit-learn, at equal accuracy?

Question: on 100,000 x 768 labelled embeddings (9 classes, difficulty set so accuracy ~0.88),
does embedstore's linear head (AdamW minibatches, early stopping on a grouped validation carve)
train no slower than scikit-learn's LogisticRegression (lbfgs) on the same standardised features,
with accuracy within 0.5 point?

scikit-learn runs in a subprocess whose environment has OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE
removed (they mis-tune OpenBLAS on some hosts); both sides see the same standardised float32
matrices. Runs alternate (ours, sklearn, ours, sklearn...) so machine load hits both alike; the
table shows medians. Writes ``benchmarks/results/heads-<machine>-<date>.json``.

    python benchmarks/bench_heads.py [--rows 100000] [--dim 768] [--repeats 2]

Store-bound parts run only when asked (``--only-stores`` skips the synthetic comparison and
writes ``heads-stores-<machine>-<date>.json`` instead):

* ``--pcam-store STORE``: the PCam store with 8 views per tile (``bench_pcam_heads.py`` builds it
  in ``benchmarks/scratch/pcam_heads/mobilenetv2-onnx-int8-v8``): linear head without / with view
  sampling against scikit-learn, time and F1;
* ``--predict-store DIR``: ``predict_store`` over a 1M-row store against the store's plain scan
  (built from synthetic float16 768-d rows when DIR is missing, removed afterwards).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import machine, median, print_table, write_results  # noqa: E402

DROP_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

SKLEARN_SCRIPT = r"""
import json, sys, time, warnings
import numpy as np
from sklearn.linear_model import LogisticRegression
d, threads = sys.argv[1], int(sys.argv[2])
from threadpoolctl import threadpool_info, threadpool_limits
if threads > 0:
    threadpool_limits(threads)
xtr, ytr = np.load(d + "/xtr.npy"), np.load(d + "/ytr.npy")
xte, yte = np.load(d + "/xte.npy"), np.load(d + "/yte.npy")
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = LogisticRegression(solver="lbfgs", max_iter=1000).fit(xtr, ytr)
fit = time.perf_counter() - t0
pred = model.predict(xte)
recall = [float((pred[yte == c] == c).mean()) for c in np.unique(yte)]
used = max(p.get("num_threads", 0) for p in threadpool_info() if p.get("user_api") == "blas")
print(json.dumps({"fit_s": fit, "accuracy": float((pred == yte).mean()),
                  "balanced_accuracy": float(np.mean(recall)), "n_iter": int(model.n_iter_[0]),
                  "threads": used}))
"""


def make_embeddings(n: int, dim: int, n_classes: int = 9, sep: float = 0.425, rank: int = 48,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like data: class centres in a ``rank``-dim subspace of ``dim``, unequal class
    sizes, isotropic within-class spread plus ambient noise, then per-dimension scales and offsets
    (lognormal / normal) so standardisation matters. ``sep`` sets the difficulty (0.425 gives
    ~0.88 accuracy for a linear model at 100k x 768)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    centres = rng.standard_normal((n_classes, rank)) * sep
    prior = rng.dirichlet(np.full(n_classes, 5.0))
    y = rng.choice(n_classes, size=n, p=prior)
    latent = centres[y] + rng.standard_normal((n, rank))
    x = (latent @ basis.T) * 3.0 + rng.standard_normal((n, dim)) * 0.5
    x = x * np.exp(rng.normal(0.0, 0.7, dim)) + rng.normal(0.0, 2.0, dim)
    return x.astype(np.float32), y.astype(np.int64)


def standardise(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = xtr.mean(axis=0, dtype=np.float64)
    std = xtr.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    f = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return f(xtr), f(xte)


def run_sklearn(data_dir: str, threads: int) -> dict[str, Any]:
    """Fit in a fresh interpreter; ``threads`` > 0 caps BLAS threads (threadpoolctl), 0 = default."""
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    out = subprocess.run([sys.executable, "-c", SKLEARN_SCRIPT, data_dir, str(threads)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_embedstore(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
                   seed: int, threads: int) -> dict[str, Any]:
    """Fit with the default linear head; ``threads`` > 0 fixes torch's threads, 0 = default.
    The timer covers everything ``train_head`` does: checks, validation carve, standardisation,
    training with early stopping and threshold bookkeeping."""
    import torch
    from embedstore.heads import HeadConfig, evaluate, train_head
    t0 = time.perf_counter()
    head = train_head(xtr, ytr, config=HeadConfig(kind="linear"), seed=seed,
                      threads=threads if threads > 0 else torch.get_num_threads())
    fit = time.perf_counter() - t0
    m = evaluate(head, xte, yte)
    return {"fit_s": fit, "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "epochs": head.history["epochs_run"],
            "threads": threads if threads > 0 else torch.get_num_threads()}


def warm_up() -> None:
    """Import and run torch once, as the scikit-learn child imports before its timer starts."""
    from embedstore.heads import HeadConfig, train_head
    rng = np.random.default_rng(0)
    train_head(rng.normal(size=(256, 8)).astype(np.float32), np.arange(256) % 2, config=HeadConfig(epochs=2))


def bench_linear(rows: int, dim: int, repeats: int, thread_modes: list[int]) -> list[dict[str, Any]]:
    """Rows of the table: for each thread setting, scikit-learn then embedstore (medians)."""
    x, y = make_embeddings(rows, dim)
    n_train = int(rows * 0.8)
    xtr, xte = standardise(x[:n_train], x[n_train:])
    ytr, yte = y[:n_train], y[n_train:]
    del x
    warm_up()
    table = []
    with tempfile.TemporaryDirectory(prefix="bench_heads_") as d:
        for name, arr in (("xtr", xtr), ("ytr", ytr), ("xte", xte), ("yte", yte)):
            np.save(f"{d}/{name}.npy", arr)
        for threads in thread_modes:
            ours, theirs = [], []
            for i in range(repeats):          # alternate so load changes hit both sides alike
                ours.append(run_embedstore(xtr, ytr, xte, yte, seed=i, threads=threads))
                theirs.append(run_sklearn(d, threads))
                print(f"  threads={threads or 'default'} run {i}: embedstore {ours[-1]['fit_s']:.2f} s "
                      f"acc {ours[-1]['accuracy']:.4f} | sklearn {theirs[-1]['fit_s']:.2f} s "
                      f"acc {theirs[-1]['accuracy']:.4f}", flush=True)
            sk_fit = median(r["fit_s"] for r in theirs)
            sk_acc = median(r["accuracy"] for r in theirs)
            for name, runs, note in (
                    ("sklearn LogisticRegression lbfgs", theirs, f"{theirs[0]['n_iter']} iterations"),
                    ("embedstore linear head", ours, f"{ours[0]['epochs']} epochs, early stop on 10% carve")):
                fit = median(r["fit_s"] for r in runs)
                acc = median(r["accuracy"] for r in runs)
                table.append({"method": name, "threads": runs[0]["threads"], "rows": n_train, "dim": dim,
                              "fit_s": fit, "speedup_vs_sklearn": sk_fit / fit, "accuracy": acc,
                              "balanced_accuracy": median(r["balanced_accuracy"] for r in runs),
                              "acc_minus_sklearn_pts": (acc - sk_acc) * 100, "runs": runs, "note": note})
    return table


# ------------------------------------------------------------------ store-bound parts

PCAM_AUGMENTS = (("none", ""), ("views", "views"), ("views,noise,mixup,dropout", "views,noise=0.1,mixup=0.2,dropout=0.1"))
# the regime bench_pcam_heads.py's sweep (5-fold CV on PCam train only) chose for the linear head:
# lr 1e-3, 40 epochs without early stopping, F1 threshold tuned on a 10% carve of train
PCAM_TUNED = {"lr": 1e-3, "epochs": 40, "patience": 0, "tune_threshold": True}


def bench_pcam_views(store_path: str, seeds: int = 5) -> list[dict[str, Any]]:
    """PCam store extracted with a view bank (K views per tile), ``column`` split (PCam's own
    train / valid; valid = test): scikit-learn LogisticRegression (which cannot sample views at
    all) against embedstore's linear head (package defaults) with (a) no augmentation, (b)
    ``views``, (c) ``views,noise=0.1,mixup=0.2,dropout=0.1``: mean ± std F1 (positive class
    ``tumor``) / balanced accuracy / AUROC over ``seeds`` seeds and fit seconds per head; then
    without and with ``views`` in the regime the train-CV sweep of ``bench_pcam_heads.py`` chose
    (``PCAM_TUNED``).

    Built from ``labelled_set`` + ``gather_features`` + ``view_bank`` + ``run_seeds`` (through
    ``bench_pcam_heads.load_pcam``); the labels are the store's extraction CSV next to it
    (``--pcam-csv``, default ``../shared/data/pcam/labels.csv``)."""
    from bench_pcam_heads import PCAM_CSV, load_pcam, sklearn_lr
    from embedstore.heads.augment import parse_augment
    from embedstore.heads import HeadConfig, run_seeds
    csv = Path(os.environ.get("PCAM_CSV", PCAM_CSV))
    d = load_pcam(store_path, csv)
    if d.bank is None:
        raise SystemExit(f"{store_path} has no view bank; extract it with --views K")
    k = float(d.bank.counts.mean())
    rows: list[dict[str, Any]] = []
    lr = sklearn_lr(d, "default")
    rows.append({"method": "sklearn LogisticRegression lbfgs (no views possible)", "augment": "-",
                 "f1": lr["f1"], "f1_std": 0.0, "balanced_accuracy": lr["balanced_accuracy"],
                 "auroc": lr["auroc"], "auroc_std": 0.0, "fit_s": lr["fit_s"], "seeds": 1})
    print(f"  sklearn LR: F1 {lr['f1']:.4f} bal.acc {lr['balanced_accuracy']:.4f} fit {lr['fit_s']:.2f} s",
          flush=True)
    settings: list[tuple[str, str, dict[str, Any]]] = [(name, text, {}) for name, text in PCAM_AUGMENTS]
    settings += [("none, tuned regime", "", PCAM_TUNED), ("views, tuned regime", "views", PCAM_TUNED)]
    for name, text, regime in settings:
        cfg = HeadConfig(kind="linear", positive="tumor", augment=parse_augment(text), **regime)
        t0 = time.perf_counter()
        rep = run_seeds(d.x_train, d.y_train, d.x_valid, d.y_valid, config=cfg,
                        views=d.bank if cfg.augment.views else None, seeds=seeds)
        fit = (time.perf_counter() - t0) / seeds
        s = rep.summary
        rows.append({"method": "embedstore linear head", "augment": name, "f1": s["f1"][0],
                     "f1_std": s["f1"][1], "balanced_accuracy": s["balanced_accuracy"][0],
                     "auroc": s["auroc"][0], "auroc_std": s["auroc"][1], "fit_s": fit, "seeds": seeds,
                     "epochs": float(np.mean([r["epochs"] for r in rep.runs]))})
        print(f"  linear {name}: F1 {s['f1'][0]:.4f} ± {s['f1'][1]:.4f} fit {fit:.2f} s/head", flush=True)
    for r in rows:
        r["f1_minus_sklearn"] = r["f1"] - lr["f1"]
        r["fit_vs_sklearn"] = lr["fit_s"] / r["fit_s"]
    print_table(rows, [("method", "method", None), ("augment", "augment", None), ("f1", "F1 tumor", ".4f"),
                       ("f1_std", "±", ".4f"), ("f1_minus_sklearn", "ΔF1 vs sklearn", "+.4f"),
                       ("balanced_accuracy", "bal. acc", ".4f"), ("auroc", "AUROC", ".4f"),
                       ("fit_s", "fit s", ".2f"), ("fit_vs_sklearn", "speed vs sklearn", "ratio")],
                title=f"\nPCam ({store_path}, {k:.0f} views per train tile), valid = test")
    return rows


def _rss_sampler(stop: Any, out: list[tuple[float, int, int]], every: float = 0.02) -> None:
    """Append (t, VmRSS, RssAnon) every ``every`` s until ``stop`` is set."""
    from _harness import rss
    while not stop.is_set():
        r = rss()
        out.append((time.perf_counter(), r.get("VmRSS", 0), r.get("RssAnon", 0)))
        stop.wait(every)


def build_synthetic_store(path: Path, rows: int = 1_000_000, dim: int = 768, per_slide: int = 10_000,
                          seed: int = 0) -> float:
    """A store of ``rows`` synthetic float16 embeddings (slides of ``per_slide`` tiles with x, y)
    written with StoreWriter; returns the seconds it took."""
    from embedstore.store import StoreMeta, StoreWriter
    rng = np.random.default_rng(seed)
    meta = StoreMeta(dim=dim, dtype="float16", backbone={"name": "synthetic-predict-bench", "kind": "bench"},
                     tile={"kind": "slides", "tile_size": 224})
    side = int(np.ceil(np.sqrt(per_slide)))
    t0 = time.perf_counter()
    with StoreWriter(path, meta) as w:
        for a in range(0, rows, per_slide):
            n = min(per_slide, rows - a)
            slide = f"slide_{a // per_slide:04d}"
            j = np.arange(n)
            x, y = (j % side) * 224, (j // side) * 224
            emb = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
            w.add(emb, [f"{slide}/{xi}_{yi}" for xi, yi in zip(x, y)], unit=slide, slide=slide,
                  x=x, y=y)
            w.end_unit(slide)
    return time.perf_counter() - t0


def bench_predict_1m(store_path: str, repeats: int = 2, keep: bool = False) -> list[dict[str, Any]]:
    """``predict_store(store, head, out)`` over a ~1M-row store with the default batch of 65,536,
    against the store's plain scan ``for ids, b in store.scan(): b.sum()`` in the same run
    (alternating, warm page cache, medians): rows/s, the ratio (target >= 0.5x), peak RSS and
    anonymous RSS against the store's size (constant memory), and the Arrow file's row count
    equal to ``len(store)``. A missing ``store_path`` is built (1M x 768 float16, ~1.5 GB) and
    removed afterwards unless ``keep``."""
    import shutil
    import threading

    import pyarrow as pa
    from _harness import files_under, prewarm, rss
    from embedstore.heads import HeadConfig, predict_store, train_head
    from embedstore.store import open_store
    path = Path(store_path)
    built = not (path / "STORE.json").exists()
    build_s = build_synthetic_store(path) if built else None
    out_dir = Path(tempfile.mkdtemp(prefix="predict_1m_", dir=path.parent))
    try:
        store = open_store(path)
        size = sum(f.stat().st_size for f in store.shard_files())
        n = len(store)
        # a real head: trained on 20,000 rows labelled by a fixed linear rule
        rng = np.random.default_rng(1)
        sample = np.sort(rng.choice(n, size=min(20_000, n), replace=False))
        xs = store.gather(store.all_ids()[sample])
        w = rng.standard_normal(store.dim)
        ys = np.where(xs.astype(np.float32) @ w > 0, "pos", "neg").astype(object)
        head = train_head(xs, ys, config=HeadConfig(kind="linear", epochs=20), seed=0)
        head.fingerprint = store.fingerprint()
        del xs
        prewarm(files_under(*store.shard_files()))

        def scan() -> float:
            t0 = time.perf_counter()
            seen = 0
            for ids, b in store.scan():
                b.sum()
                seen += len(ids)
            assert seen == n
            return time.perf_counter() - t0

        def predict(i: int) -> dict[str, Any]:
            out = out_dir / f"preds{i}.arrow"
            samples: list[tuple[float, int, int]] = []
            stop = threading.Event()
            before = rss()
            th = threading.Thread(target=_rss_sampler, args=(stop, samples), daemon=True)
            th.start()
            try:
                res = predict_store(store, head, out)
            finally:
                stop.set()
                th.join()
            rows_out = pa.ipc.open_file(str(out)).read_all().num_rows if i == 0 else None
            anon = [a for _, _, a in samples]
            q = max(1, len(anon) // 4)
            info = {"seconds": res["seconds"], "rows": res["rows"], "rows_in_file": rows_out,
                    "rss_before": before["VmRSS"], "anon_before": before["RssAnon"],
                    "peak_rss": max(v for _, v, _ in samples), "peak_anon": max(anon),
                    "anon_first_quarter_max": max(anon[:q]), "anon_last_quarter_max": max(anon[-q:]),
                    "file_bytes": out.stat().st_size}
            out.unlink()
            return info

        scan()                                    # untimed: map every page once (steady state)
        scans, preds = [], []
        for i in range(repeats):                  # alternate so load changes hit both alike
            preds.append(predict(i))
            scans.append(scan())
            print(f"  run {i}: predict {preds[-1]['seconds']:.1f} s, scan (b.sum()) {scans[-1]:.1f} s, "
                  f"peak anon RSS {preds[-1]['peak_anon'] / 2**20:.0f} MiB", flush=True)
        scan_s = median(scans)
        pred_s = median(p["seconds"] for p in preds)
        p0 = preds[0]
        extra = {"store_rows": n, "store_bytes": size, "build_s": build_s, "repeats": repeats,
                 "rows_in_file_equal_len_store": p0["rows_in_file"] == n,
                 "peak_rss_mib": max(p["peak_rss"] for p in preds) / 2**20,
                 "peak_anon_mib": max(p["peak_anon"] for p in preds) / 2**20,
                 "anon_growth_mib": max(p["peak_anon"] - p["anon_before"] for p in preds) / 2**20,
                 "anon_first_vs_last_quarter_mib": [(p["anon_first_quarter_max"] / 2**20,
                                                     p["anon_last_quarter_max"] / 2**20) for p in preds],
                 "runs": preds, "scan_runs_s": scans}
        rows = [{"what": "store.scan() + b.sum() (plain scan)", "seconds": scan_s, "rows_per_s": n / scan_s,
                 "vs_scan": 1.0},
                {"what": "predict_store (batch 65,536) -> Arrow", "seconds": pred_s, "rows_per_s": n / pred_s,
                 "vs_scan": scan_s / pred_s, "target": 0.5, "meets_target": scan_s / pred_s >= 0.5, **extra}]
        print_table(rows, [("what", "1M-row store, warm", None), ("seconds", "s", ".1f"),
                           ("rows_per_s", "rows/s", ",.0f"), ("vs_scan", "vs scan", "ratio")],
                    title=f"\npredict over {n:,} rows ({size / 2**30:.2f} GiB of shards)")
        print(f"  Arrow rows == len(store): {extra['rows_in_file_equal_len_store']}; peak RSS "
              f"{extra['peak_rss_mib']:.0f} MiB (file-backed pages of the mapped shards included), "
              f"anonymous RSS growth {extra['anon_growth_mib']:.0f} MiB against {size / 2**20:.0f} MiB of store; "
              f"anon MiB max in first / last quarter per run: "
              + ", ".join(f"{a:.0f} / {b:.0f}" for a, b in extra["anon_first_vs_last_quarter_mib"]), flush=True)
        return rows
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        if built and not keep:
            shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", default="0,1",
                    help="comma-separated thread settings to compare; 0 = each library's default")
    ap.add_argument("--pcam-store", default=None)
    ap.add_argument("--predict-store", default=None,
                    help="a ~1M-row store; built there from synthetic float16 768-d rows (and removed "
                         "afterwards unless --keep) when missing, e.g. benchmarks/scratch/predict-1m")
    ap.add_argument("--keep", action="store_true", help="keep a --predict-store built here")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch intra-op threads for the store-bound parts; 0 = torch's default")
    ap.add_argument("--only-stores", action="store_true",
                    help="skip the synthetic linear comparison; run only --pcam-store / --predict-store")
    args = ap.parse_args()
    extra: dict[str, Any] = {"load_before": machine().get("loadavg")}
    rows: list[dict[str, Any]] = []
    if not args.only_stores:
        print(f"linear head vs scikit-learn: {args.rows} x {args.dim}, 9 classes, 80/20 split, "
              f"{args.repeats} alternating run(s) each, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        rows = bench_linear(args.rows, args.dim, args.repeats, [int(t) for t in args.threads.split(",")])
        print_table(rows, [("method", "method", None), ("threads", "threads", "d"), ("rows", "train rows", "d"),
                           ("fit_s", "fit s", ".2f"),
                           ("speedup_vs_sklearn", "speed vs sklearn", "ratio"), ("accuracy", "accuracy", ".4f"),
                           ("balanced_accuracy", "bal. acc", ".4f"), ("acc_minus_sklearn_pts", "Δacc pts", "+.2f"),
                           ("note", "note", None)])
        extra["question"] = "linear head vs sklearn lbfgs, same standardised features"
    import torch
    if args.torch_threads > 0:                # after the synthetic comparison, which sets its own
        torch.set_num_threads(args.torch_threads)
    extra["store_parts_torch_threads"] = torch.get_num_threads()
    if args.pcam_store:
        extra["pcam_views"] = bench_pcam_views(args.pcam_store)
    if args.predict_store:
        extra["predict_1m"] = bench_predict_1m(args.predict_store, keep=args.keep)
    path = write_results("heads-stores" if args.only_stores else "heads", rows, extra,
                         when=time.strftime("%Y%m%d-%H%M%S") if args.only_stores else None)
    print(f"results: {path}")


if __name__ == "__main__":
    main()

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

Store-bound parts (PCam with views, prediction over 1M rows) are the functions marked
``LEAD: FILL IN`` below; they run only when given a store (--pcam-store / --predict-store).
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


# ------------------------------------------------------------------ LEAD: FILL IN (needs a store)

def bench_pcam_views(store_path: str) -> list[dict[str, Any]]:
    """LEAD: FILL IN. PCam store extracted with a view bank (K views per tile): compare, with
    ``train_head_command``-style code, (a) no augmentation, (b) ``views``, (c)
    ``views,noise=0.1,mixup=0.2,dropout=0.1`` on the ``column`` split (PCam's own train/valid,
    valid = test): mean ± std F1 / AUROC over 5 seeds and fit seconds per head. Use
    ``labelled_set`` + ``gather_features`` + ``view_bank`` + ``run_seeds``."""
    raise NotImplementedError("bench_pcam_views needs a PCam store with views (LEAD: fill in)")


def bench_predict_1m(store_path: str) -> list[dict[str, Any]]:
    """LEAD: FILL IN. A store of ~1M rows: ``predict_store(store, head, out)`` with the default
    batch of 65,536 — rows/s, peak RSS (``_harness.rss``) against the store's size to show
    constant memory, and the Arrow file's row count equal to ``len(store)``."""
    raise NotImplementedError("bench_predict_1m needs a 1M-row store (LEAD: fill in)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", default="0,1",
                    help="comma-separated thread settings to compare; 0 = each library's default")
    ap.add_argument("--pcam-store", default=None)
    ap.add_argument("--predict-store", default=None)
    args = ap.parse_args()
    print(f"linear head vs scikit-learn: {args.rows} x {args.dim}, 9 classes, 80/20 split, "
          f"{args.repeats} alternating run(s) each, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = bench_linear(args.rows, args.dim, args.repeats, [int(t) for t in args.threads.split(",")])
    print_table(rows, [("method", "method", None), ("threads", "threads", "d"), ("rows", "train rows", "d"),
                       ("fit_s", "fit s", ".2f"),
                       ("speedup_vs_sklearn", "speed vs sklearn", "ratio"), ("accuracy", "accuracy", ".4f"),
                       ("balanced_accuracy", "bal. acc", ".4f"), ("acc_minus_sklearn_pts", "Δacc pts", "+.2f"),
                       ("note", "note", None)])
    extra: dict[str, Any] = {"question": "linear head vs sklearn lbfgs, same standardised features",
                             "load_before": machine().get("loadavg")}
    if args.pcam_store:
        extra["pcam_views"] = bench_pcam_views(args.pcam_store)
    if args.predict_store:
        extra["predict_1m"] = bench_predict_1m(args.predict_store)
    path = write_results("heads", rows, extra)
    print(f"results: {path}")


if __name__ == "__main__":
    main()

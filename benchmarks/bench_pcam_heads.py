"""Heads on real PCam embeddings: do stored-embedding heads (and feature-space augmentation) hold
up on real data, against scikit-learn and against end-to-end training?

Data: ``../shared/data/pcam/labels.csv`` (path,label,split; 4000 train tiles and 1000 valid tiles
from other slides; 96 px JPEG; lymph-node metastasis, positive class ``tumor``). ``train`` fits
and chooses configurations; ``valid`` is only ever scored.

1. Embed with the shipped ONNX MobileNetV2 (int8) with K = 8 stored views per tile, and without
   views with a randomly initialised ResNet-18, into stores under ``benchmarks/scratch/pcam_heads``
   (reused when present: extraction resumes and skips what is there).
2. scikit-learn LogisticRegression on the same standardised features, in a subprocess without
   OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: C = 1 run to convergence, C = 1 with scikit-learn's
   max_iter=100 (unconverged), and C chosen by 5-fold CV on train (LogisticRegressionCV, F1).
3. embedstore linear and MLP heads, 5 seeds each, without augmentation, with view sampling, with
   embedding-space noise (sigma 0.1) and with both: F1 of ``tumor``, balanced accuracy, AUROC
   (mean ± std) and the relative F1 change against no augmentation; in the reference recipe
   (linear, 40 epochs, no early stopping, threshold 0.5) and with the package defaults.
   Then per head kind a ``sweep`` (5-fold CV on train only; lr, noise, views, p_original, MLP
   dropout; then the training regime: early stopping or 40 fixed epochs, threshold tuning or
   not), the chosen configuration scored on valid next to itself with augmentation off.
   PCam's CSV names no slide, so those CV folds are not grouped by slide: CV F1 is optimistic
   (tiles of one slide on both sides); valid comes from other slides.
4. The random ResNet-18 store, without views: the pretrained backbone must win.
5. Time of one head epoch over the embeddings against one epoch of end-to-end fine-tuning of a
   timm ResNet-18 (JPEG decode + dihedral flips/rotations + resize to 224 in a DataLoader,
   forward + backward + AdamW), measured on a subset and extrapolated to the 4000 train tiles.
   The one-time embedding pass is not in either figure (extraction reports its own time).

    python benchmarks/bench_pcam_heads.py [--seeds 5] [--e2e-tiles 256] [--no-sweep] [--no-e2e]
    python benchmarks/bench_pcam_heads.py --only-timing [--torch-threads 0]

``--torch-threads`` (default 1) fixes torch's threads for everything here: on a small, shared
CPU one thread beats two for heads and for end-to-end alike (an oversubscribed second thread can
make a head 10x slower). Prints side-by-side tables; writes
``benchmarks/results/pcam-heads[-timing]-<machine>-<date>-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import SCRATCH, print_table, write_results  # noqa: E402

PCAM_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam" / "labels.csv"
STORES = SCRATCH / "pcam_heads"
POSITIVE = "tumor"
K_VIEWS = 8
DROP_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
NOISE = 0.1         # the embedding-space noise sigma of the fixed-configuration grid

# reference figures measured on exactly this data (the acceptance)
REFERENCE = {"sklearn_lr_f1": 0.779, "linear_40ep_f1": 0.799, "linear_40ep_views_f1": 0.822,
             "random_resnet18_lr_f1": 0.744}

AUGMENTS: dict[str, dict[str, Any]] = {     # name -> augment fields; order is the table's
    "none": {},
    "views": {"views": True},
    f"noise={NOISE:g}": {"noise": NOISE},
    f"views+noise={NOISE:g}": {"views": True, "noise": NOISE},
}

SKLEARN_LR = r"""
import json, sys, time, warnings
import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
d, mode = sys.argv[1], sys.argv[2]
xtr, ytr = np.load(d + "/xtr.npy"), np.load(d + "/ytr.npy")
xte, yte = np.load(d + "/xte.npy"), np.load(d + "/yte.npy")
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if mode in ("default", "max_iter=100"):
        model = LogisticRegression(solver="lbfgs", max_iter=5000 if mode == "default" else 100).fit(xtr, ytr)
        c = 1.0
    else:
        cv = StratifiedKFold(5, shuffle=True, random_state=0)
        model = LogisticRegressionCV(Cs=np.logspace(-4, 1, 11).tolist(), cv=cv, scoring="f1",
                                     max_iter=5000).fit(xtr, ytr)
        c = float(model.C_[0])
fit = time.perf_counter() - t0
pred = model.predict(xte)
score = model.predict_proba(xte)[:, 1]
print(json.dumps({"fit_s": fit, "C": c, "n_iter": int(np.max(model.n_iter_)), "f1": float(f1_score(yte, pred)),
                  "balanced_accuracy": float(balanced_accuracy_score(yte, pred)),
                  "accuracy": float((pred == yte).mean()), "auroc": float(roc_auc_score(yte, score))}))
"""


# ------------------------------------------------------------------------------ data

@dataclass
class PCam:
    """One store's view of PCam: train / valid embeddings, labels and the train view bank."""
    store: str
    backbone: str
    x_train: np.ndarray          # (4000, dim) store dtype
    y_train: np.ndarray          # (4000,) object labels
    x_valid: np.ndarray          # (1000, dim)
    y_valid: np.ndarray          # (1000,)
    ids_train: np.ndarray        # (4000,) int64 store ids
    bank: Any                    # ViewBank of the train tiles, or None

    @property
    def dim(self) -> int:
        return int(self.x_train.shape[1])


def ensure_store(name: str, backbone: str, *, views: int | None = None, random_init: bool = False,
                 csv: Path = PCAM_CSV, root: Path = STORES) -> dict[str, Any]:
    """Extract ``csv`` into ``root/name`` (resumes; an up-to-date store costs seconds)."""
    from embedstore.extract.runner import ExtractConfig, extract
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = ExtractConfig(store=path, backbone=backbone, views=views, random_init=random_init,
                        progress=False)
    t0 = time.perf_counter()
    res = extract([str(csv)], cfg)
    if res.errors:
        raise SystemExit(f"extraction into {path} had {len(res.errors)} error(s): {res.errors[:3]}")
    out = {"store": str(path), "backbone": backbone, "views": views, "random_init": random_init,
           "tiles_written": res.tiles_written, "tiles_skipped": res.tiles_skipped,
           "units_done": res.units_done, "units_skipped": res.units_skipped, "seconds": time.perf_counter() - t0}
    if res.tiles_written:
        out["tiles_per_s"] = res.tiles_per_s
        out["summary"] = res.summary()
    return out


def load_pcam(store_path: str | Path, csv: Path = PCAM_CSV, with_views: bool = True) -> PCam:
    """Train / valid rows of the CSV's split column, gathered from the store."""
    from embedstore.heads import gather_features, labelled_set, view_bank
    from embedstore.store import open_store
    store = open_store(store_path)
    ls = labelled_set(store, labels=csv)
    split = np.asarray(ls.split, dtype=object)
    tr, va = np.flatnonzero(split == "train"), np.flatnonzero(split == "valid")
    if not tr.size or not va.size:
        raise SystemExit(f"{csv} needs train and valid rows, has {dict(zip(*np.unique(split, return_counts=True)))}")
    x = gather_features(store, ls.ids)
    bank = view_bank(store, ls.ids[tr]) if with_views else None
    return PCam(str(store_path), str(store.meta.backbone.get("name")), x[tr], ls.labels[tr], x[va],
                ls.labels[va], ls.ids[tr], bank)


def standardise(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both standardised with the training rows' mean and std (float32)."""
    xtr64 = np.asarray(xtr, dtype=np.float64)
    mean, std = xtr64.mean(axis=0), xtr64.std(axis=0)
    std[std < 1e-6] = 1.0
    f = lambda a: ((np.asarray(a, dtype=np.float64) - mean) / std).astype(np.float32)  # noqa: E731
    return f(xtr), f(xte)


def sklearn_lr(d: PCam, mode: str = "default") -> dict[str, Any]:
    """LogisticRegression on the standardised features in a fresh interpreter whose environment
    lacks the OpenBLAS overrides. ``mode``: ``default`` (C = 1, lbfgs run to convergence),
    ``max_iter=100`` (scikit-learn's own defaults: lbfgs stopped at 100 iterations, unconverged)
    or ``cv`` (C by 5-fold CV on train, scored by F1)."""
    xtr, xte = standardise(d.x_train, d.x_valid)
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    with tempfile.TemporaryDirectory(prefix="pcam_lr_") as tmp:
        for name, arr in (("xtr", xtr), ("xte", xte), ("ytr", (d.y_train == POSITIVE).astype(np.int64)),
                          ("yte", (d.y_valid == POSITIVE).astype(np.int64))):
            np.save(f"{tmp}/{name}.npy", arr)
        run = subprocess.run([sys.executable, "-c", SKLEARN_LR, tmp, mode], env=env, check=True,
                             capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ heads

def head_config(kind: str, augment: dict[str, Any], base: dict[str, Any] | None = None) -> Any:
    from embedstore.heads.augment import AugmentConfig
    from embedstore.heads import HeadConfig
    params = dict(base or {})
    aug = {**params.pop("augment", {}), **augment}
    if not aug.get("views"):
        aug.pop("p_original", None)
    return HeadConfig(kind=kind, positive=POSITIVE, augment=AugmentConfig(**aug), **params)


def seeds_row(d: PCam, cfg: Any, seeds: int, label: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``seeds`` heads on train, score each on valid; one table row (mean ± std)."""
    from embedstore.heads import run_seeds
    bank = d.bank if cfg.augment.views else None
    if cfg.augment.views and bank is None:
        raise SystemExit(f"{label}: view sampling asked for but the store has no views")
    t0 = time.perf_counter()
    rep = run_seeds(d.x_train, d.y_train, d.x_valid, d.y_valid, config=cfg, views=bank, seeds=seeds,
                    keep_heads=True)
    wall = time.perf_counter() - t0
    s = rep.summary
    return {"config": label, "kind": cfg.kind, "augment": str(cfg.augment),
            "f1": s["f1"][0], "f1_std": s["f1"][1],
            "balanced_accuracy": s["balanced_accuracy"][0], "balanced_accuracy_std": s["balanced_accuracy"][1],
            "auroc": s["auroc"][0], "auroc_std": s["auroc"][1],
            "epochs": float(np.mean([r["epochs"] for r in rep.runs])),
            "fit_s": wall / len(rep.runs), "seeds": len(rep.runs),
            "f1_runs": [r["f1"] for r in rep.runs],
            "thresholds": [h.threshold for h in rep.heads],
            "head_config": cfg.to_dict(), **(extra or {})}


def augment_grid(d: PCam, kind: str, seeds: int, base: dict[str, Any] | None, label: str,
                 augments: dict[str, dict[str, Any]] = AUGMENTS) -> list[dict[str, Any]]:
    """The four augmentation settings for one head kind and base config, with the relative F1
    change of each against no augmentation."""
    rows = []
    for name, aug in augments.items():
        if aug.get("views") and d.bank is None:
            continue
        cfg = head_config(kind, aug, base)
        row = seeds_row(d, cfg, seeds, f"{label} {kind} {name}", {"setting": label, "aug_name": name})
        rows.append(row)
        print(f"  {row['config']:<48} F1 {row['f1']:.4f} ± {row['f1_std']:.4f}  bal.acc "
              f"{row['balanced_accuracy']:.4f}  epochs {row['epochs']:.0f}  {row['fit_s']:.1f} s/head", flush=True)
    ref = rows[0]["f1"]
    for r in rows:
        r["f1_rel_change_pct"] = (r["f1"] / ref - 1) * 100
    return rows


def tune(d: PCam, kind: str, spaces: list[dict[str, list[Any]]], base: dict[str, Any] | None = None,
         folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """``sweep`` by ``folds``-fold CV over the *train* rows only (valid is never seen), once per
    space (so that, e.g., ``p_original`` is only tried with views on); every space uses the same
    folds, and the best mean CV F1 over all of them wins. Returns the chosen params and the
    merged CV table."""
    from embedstore.heads import sweep
    cfg = head_config(kind, {}, base)
    table: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for space in spaces:
        res = sweep(d.x_train, d.y_train, base=cfg, space=space, folds=folds, seed=seed, views=d.bank)
        for r in res.table:
            params = {k: r[k] for k in space}
            table.append({"params": params, **{m: list(r[m]) for m in ("f1", "balanced_accuracy", "auroc")},
                          "seconds": r["seconds"]})
    table.sort(key=lambda r: -r["f1"][0])
    secs = time.perf_counter() - t0
    best = table[0]
    print(f"  sweep {kind}: {len(table)} configs x {folds} folds in {secs:.0f} s; chose {best['params']} "
          f"(CV F1 {best['f1'][0]:.4f} ± {best['f1'][1]:.4f}; runner-up {table[1]['params']} "
          f"{table[1]['f1'][0]:.4f})", flush=True)
    return {"kind": kind, "spaces": spaces, "base": base or {}, "best_params": best["params"],
            "cv_f1": best["f1"], "seconds": secs, "folds": folds, "table": table}


def params_to_base(params: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """HeadConfig keyword arguments from sweep params (``augment.X`` names into ``augment``)."""
    out = {k: v for k, v in (base or {}).items() if k != "augment"}
    aug = dict((base or {}).get("augment", {}))
    for k, v in params.items():
        if k.startswith("augment."):
            aug[k.split(".", 1)[1]] = v
        else:
            out[k] = v
    if aug:
        out["augment"] = aug
    return out


# ------------------------------------------------------------------------------ timing

def head_epoch_seconds(d: PCam, kind: str, views: bool, epochs: int = 20) -> dict[str, Any]:
    """Seconds per epoch of ``train_head`` over the train embeddings: ``epochs`` fixed epochs (no
    early stopping), total time (setup included) divided by the epochs."""
    from embedstore.heads import train_head
    cfg = head_config(kind, {"views": True} if views else {}, {"epochs": epochs, "patience": 0})
    t0 = time.perf_counter()
    head = train_head(d.x_train, d.y_train, config=cfg, views=d.bank if views else None, seed=0)
    total = time.perf_counter() - t0
    return {"what": f"{kind} head{' + views' if views else ''}", "epochs": head.history["epochs_run"],
            "seconds_total": total, "epoch_s": total / head.history["epochs_run"]}


def e2e_epoch_seconds(csv: Path, n_tiles: int, batch_size: int = 32, workers: int = 1,
                      warmup_batches: int = 1) -> dict[str, Any]:
    """End-to-end fine-tuning of a timm ResNet-18 (random init, 2-class linear head) on
    ``n_tiles`` train tiles: a DataLoader decoding the JPEGs, random dihedral flip/rotation,
    resize to 224, ImageNet normalisation; forward + backward + AdamW step per batch. Returns
    seconds per tile (after ``warmup_batches`` untimed batches) and the extrapolated epoch."""
    import csv as csv_mod

    import timm
    import torch
    import torch.nn.functional as F
    from PIL import Image

    with open(csv, newline="") as f:
        rows = [r for r in csv_mod.DictReader(f) if r["split"] == "train"]
    n_epoch = len(rows)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(rows), size=min(n_tiles + warmup_batches * batch_size, len(rows)), replace=False)
    rows = [rows[i] for i in pick]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    class Tiles(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            with Image.open(csv.parent / rows[i]["path"]) as im:
                a = np.asarray(im.convert("RGB"))
            g = np.random.default_rng(i)
            a = np.rot90(a, int(g.integers(4)))
            if g.integers(2):
                a = a[:, ::-1]
            t = torch.from_numpy(np.array(a, dtype=np.float32)).permute(2, 0, 1).div_(255)
            t = F.interpolate(t[None], size=(224, 224), mode="bilinear", align_corners=False)[0]
            return (t - mean) / std, int(rows[i]["label"] == POSITIVE)

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(Tiles(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=False)
    seen, t0 = 0, None
    for b, (x, y) in enumerate(loader):
        if b == warmup_batches:
            t0, seen = time.perf_counter(), 0
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    total = time.perf_counter() - (t0 if t0 is not None else time.perf_counter())
    per_tile = total / max(seen, 1)
    return {"what": "end-to-end ResNet-18 (timm, random init) fine-tuning", "tiles_timed": seen,
            "batch_size": batch_size, "workers": workers, "torch_threads": torch.get_num_threads(),
            "seconds_timed": total, "s_per_tile": per_tile, "epoch_tiles": n_epoch,
            "epoch_s": per_tile * n_epoch, "extrapolated": seen < n_epoch}


# ------------------------------------------------------------------------------ main

COLUMNS = [("config", "configuration", None), ("f1", "F1 tumor", ".4f"), ("f1_std", "±", ".4f"),
           ("f1_rel_change_pct", "ΔF1 rel %", "+.1f"), ("balanced_accuracy", "bal. acc", ".4f"),
           ("balanced_accuracy_std", "±", ".4f"), ("auroc", "AUROC", ".4f"), ("epochs", "epochs", ".0f"),
           ("fit_s", "s/head", ".2f")]


def lr_rows(d: PCam, label: str, modes: tuple[str, ...] = ("default", "cv")) -> list[dict[str, Any]]:
    out = []
    names = {"default": "C=1", "max_iter=100": "C=1 max_iter=100 (unconverged)"}
    for mode in modes:
        r = sklearn_lr(d, mode)
        name = names.get(mode, f"C={r['C']:.3g} (train CV)")
        out.append({"config": f"{label} sklearn LogisticRegression {name}", "kind": "sklearn-lr",
                    "aug_name": "none", **r, "f1_std": 0.0, "balanced_accuracy_std": 0.0, "seeds": 1})
        print(f"  {out[-1]['config']:<48} F1 {r['f1']:.4f}  bal.acc {r['balanced_accuracy']:.4f}  "
              f"AUROC {r['auroc']:.4f}  {r['fit_s']:.1f} s", flush=True)
    return out


SWEEPS: dict[str, list[dict[str, list[Any]]]] = {     # per head kind: the spaces tried (CV on train); other fields at the package defaults
    "linear": [
        {"lr": [1e-3, 3e-3, 1e-2], "augment.noise": [0.0, 0.1, 0.2]},
        {"lr": [1e-3, 3e-3, 1e-2], "augment.noise": [0.0, 0.1, 0.2], "augment.views": [True],
         "augment.p_original": [None, 0.5]},
    ],
    "mlp": [
        {"lr": [3e-4, 1e-3], "dropout": [0.0, 0.3], "augment.noise": [0.0, 0.1]},
        {"lr": [3e-4, 1e-3], "dropout": [0.0, 0.3], "augment.noise": [0.0, 0.1], "augment.views": [True]},
    ],
}
# then, for the chosen configuration: the training regime (early stopping + threshold tuning on
# a 10% carve, the defaults, against fixed epochs with or without the threshold)
REGIMES: list[dict[str, list[Any]]] = [{"patience": [5], "tune_threshold": [True, False]},
           {"patience": [0], "epochs": [40], "tune_threshold": [True, False]}]


def tuned_rows(d: PCam, kind: str, seeds: int, folds: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sweep ``kind`` on train (augmentation and lr first, then the training regime), score the
    chosen configuration on valid, next to the same configuration with augmentation off."""
    first = tune(d, kind, SWEEPS[kind], None, folds)
    base = params_to_base(first["best_params"])
    second = tune(d, kind, REGIMES, base, folds)
    base = params_to_base(second["best_params"], base)
    aug = {k: v for k, v in base.pop("augment", {}).items() if v not in (None, False, 0, 0.0)}
    label = "mnv2 tuned"
    rows = [seeds_row(d, head_config(kind, {}, base), seeds, f"{label} {kind} (augment off)",
                      {"setting": label, "aug_name": "none"})]
    if aug:
        rows.append(seeds_row(d, head_config(kind, aug, base), seeds, f"{label} {kind} {_aug_text(aug)}",
                              {"setting": label, "aug_name": _aug_text(aug)}))
    for r in rows:
        r["f1_rel_change_pct"] = (r["f1"] / rows[0]["f1"] - 1) * 100
        r["tuned_params"] = {**base, "augment": aug}
        print(f"  {r['config']:<48} F1 {r['f1']:.4f} ± {r['f1_std']:.4f}  bal.acc "
              f"{r['balanced_accuracy']:.4f}", flush=True)
    return rows, [first, second]


def _aug_text(aug: dict[str, Any]) -> str:
    from embedstore.heads.augment import AugmentConfig
    return str(AugmentConfig(**aug))


def timing_table(d: PCam, csv: Path, e2e_tiles: int | None) -> list[dict[str, Any]]:
    """Seconds per epoch of each head kind, without and with views, and of end-to-end training
    (``e2e_tiles`` None: skipped), with the ratio end-to-end / head."""
    import torch
    timing: list[dict[str, Any]] = []
    for kind in ("linear", "mlp"):
        for views in (False, True):
            timing.append(head_epoch_seconds(d, kind, views))
    if e2e_tiles:
        timing.append(e2e_epoch_seconds(csv, e2e_tiles))
        e2e = timing[-1]["epoch_s"]
        for t in timing:
            t["e2e_over_this"] = e2e / t["epoch_s"]
    print_table(timing, [("what", f"one epoch over the {d.x_train.shape[0]} train tiles", None),
                         ("epoch_s", "s/epoch", "num"), ("e2e_over_this", "end-to-end / this", "ratio"),
                         ("epochs", "epochs timed", "d"), ("tiles_timed", "tiles timed", "d")],
                title=f"\nepoch time (torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
                      + (f"; end-to-end measured on {e2e_tiles} tiles and extrapolated)" if e2e_tiles else ")"))
    return timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=PCAM_CSV)
    ap.add_argument("--stores", type=Path, default=STORES, help="where the stores are made / reused")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--folds", type=int, default=5, help="CV folds of the sweeps (train only)")
    ap.add_argument("--e2e-tiles", type=int, default=256)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads for everything timed here (heads and end-to-end); "
                         "on a small, shared CPU one thread is the fastest for both; 0 = torch's default")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--only-timing", action="store_true",
                    help="only the epoch timings (on the MobileNetV2 store); figures are not re-measured")
    args = ap.parse_args()
    if not args.csv.exists():
        raise SystemExit(f"{args.csv} not found (the PCam subset lives in ../shared/data/pcam)")
    import torch
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    print(f"PCam heads: {args.csv}, {args.seeds} seeds, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    extra: dict[str, Any] = {"reference": REFERENCE, "csv": str(args.csv), "seeds": args.seeds,
                             "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg()}

    print("extracting / reusing stores ...", flush=True)
    stores = [ensure_store(f"mobilenetv2-onnx-int8-v{K_VIEWS}", "mobilenetv2-onnx-int8", views=K_VIEWS,
                           csv=args.csv, root=args.stores)]
    if not (args.no_resnet or args.only_timing):
        stores.append(ensure_store("resnet18-random", "resnet18", random_init=True, csv=args.csv,
                                   root=args.stores))
    for s in stores:
        print(f"  {s['store']}: {s['tiles_written']} tiles written, {s['units_skipped']} units already "
              f"done, {s['seconds']:.0f} s", flush=True)
    extra["stores"] = stores

    d = load_pcam(stores[0]["store"], args.csv)
    if args.only_timing:
        extra["timing"] = timing_table(d, args.csv, None if args.no_e2e else args.e2e_tiles)
        path = write_results("pcam-heads-timing", [], extra, when=time.strftime("%Y%m%d-%H%M%S"))
        print(f"results: {path}")
        return
    print(f"MobileNetV2 (ONNX int8) store: train {d.x_train.shape}, valid {d.x_valid.shape}, "
          f"{int(d.bank.counts.mean()) if d.bank is not None else 0} views per train tile", flush=True)
    rows: list[dict[str, Any]] = []
    rows += lr_rows(d, "mnv2", ("default", "max_iter=100", "cv"))
    lr_f1 = rows[0]["f1"]

    # the reference recipe: standardised linear head, AdamW, 40 epochs, no early stopping
    ref = {"epochs": 40, "patience": 0, "tune_threshold": False, "valid_fraction": 0.0}
    print("reference recipe (40 epochs, no early stopping, threshold 0.5):", flush=True)
    rows += augment_grid(d, "linear", args.seeds, ref, "mnv2 40ep")
    print("package defaults (early stopping on a 10% carve of train, F1 threshold tuned on it):", flush=True)
    for kind in ("linear", "mlp"):
        rows += augment_grid(d, kind, args.seeds, None, "mnv2 default")

    sweeps: list[dict[str, Any]] = []
    if not args.no_sweep:
        print(f"sweeps ({args.folds}-fold CV on train only):", flush=True)
        for kind in ("linear", "mlp"):
            t_rows, t_sweeps = tuned_rows(d, kind, args.seeds, args.folds)
            rows += t_rows
            sweeps += t_sweeps
    extra["sweeps"] = sweeps

    heads = [r for r in rows if r["kind"] != "sklearn-lr"]
    best = max(heads, key=lambda r: r["f1"])
    lr_cv = next(r for r in rows if r["config"].startswith("mnv2 sklearn") and "train CV" in r["config"])
    extra["acceptance"] = {
        "lr_f1": lr_f1, "lr_cv_f1": lr_cv["f1"],
        "best_head": best["config"], "best_head_f1": best["f1"], "best_beats_lr": best["f1"] > lr_f1,
        "best_beats_lr_cv": best["f1"] > lr_cv["f1"],
        "linear_no_aug_best_f1": max(r["f1"] for r in heads if r["kind"] == "linear" and r["aug_name"] == "none"),
        "linear_views_best_f1": max((r["f1"] for r in heads if r["kind"] == "linear" and "views" in r["aug_name"]),
                                    default=None),
    }

    if not args.no_resnet:
        r18 = load_pcam(stores[1]["store"], args.csv, with_views=False)
        print(f"random ResNet-18 store: train {r18.x_train.shape}", flush=True)
        rrows = lr_rows(r18, "r18-random", ("default", "cv"))
        plain = {k: v for k, v in AUGMENTS.items() if not v.get("views")}
        for kind in ("linear", "mlp"):
            rrows += augment_grid(r18, kind, args.seeds, None, "r18-random default", plain)
        rows += rrows
        best_r18 = max(r["f1"] for r in rrows)
        extra["pretrained_wins"] = {"mnv2_best_f1": best["f1"], "r18_best_f1": best_r18,
                                    "mnv2_lr_f1": lr_f1, "r18_lr_f1": rrows[0]["f1"],
                                    "wins": best["f1"] > best_r18 and lr_f1 > rrows[0]["f1"]}

    print_table(rows, COLUMNS, title="\nPCam valid (1000 tiles), trained on train (4000 tiles); "
                                     "ΔF1 rel % = against the same setting without augmentation")
    print(json.dumps(extra["acceptance"], indent=1))
    if "pretrained_wins" in extra:
        print(json.dumps(extra["pretrained_wins"], indent=1))

    extra["timing"] = timing_table(d, args.csv, None if args.no_e2e else args.e2e_tiles)
    path = write_results("pcam-heads" if args.csv == PCAM_CSV else "pcam-heads-smoke", rows, extra,
                         when=time.strftime("%Y%m%d-%H%M%S"))
    print(f"results: {path}")


if __name__ == "__main__":
    main()

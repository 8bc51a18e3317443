"""Bodies of ``embedstore train-head`` and ``embedstore predict``, taking plain arguments.

The click commands in ``embedstore.cli`` parse flags and call these; everything here is usable
from Python too. Validation happens before anything is written.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from .augment import parse_augment
from ..errors import HeadError
from .splits import Fold, parse_split, plan_splits
from .data import gather_features, labelled_set, view_bank
from .crossval import SeedReport, cross_validate, pin_positive
from .metrics import mean_std
from .models import HeadConfig
from .persist import load_head, save_head
from .predict import HeatmapSpec, predict_store
from .tuning import sweep as run_sweep
from .train import encode_labels, train_head

__all__ = ["train_head_command", "predict_command"]


def _open(store_path: str | os.PathLike[str]) -> Any:
    from ..store import open_store      # the store package lands separately; import on use
    return open_store(store_path)


def train_head_command(store_path: str | os.PathLike[str], *, task: str | None = None,
                       labels: str | os.PathLike[str] | None = None, head: str = "linear",
                       hidden: int = 256, epochs: int = 100, lr: float | None = None,
                       weight_decay: float = 1e-4, dropout: float = 0.0, class_weights: str = "none",
                       split: str = "column", seeds: int = 5, augment: str | None = None,
                       sweep: bool = False, out: str | os.PathLike[str] | None = None,
                       positive: str | None = None, seed: int = 0,
                       echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, score on the split's test rows over ``seeds`` seeds (mean ± std), save the head.

    With ``sweep`` each fold's configuration is chosen by CV on that fold's training rows only.
    The saved head is trained on the training rows (holdout splits) or on every labelled row
    (``kfold``), with the chosen configuration and seed ``seed``. Returns a summary dict.
    """
    cfg = HeadConfig(kind=head, hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay,
                     dropout=dropout, class_weights=class_weights, positive=positive,
                     augment=parse_augment(augment))
    spec = parse_split(split)
    if seeds < 1:
        raise HeadError(f"--seeds must be >= 1, got {seeds}")
    store = _open(store_path)
    ls = labelled_set(store, task=task, labels=labels)
    codes, classes = encode_labels(ls.labels)
    columns = dict(ls.columns)
    if spec.column is not None and ls.group_column(spec.column) is not None:
        columns[spec.column] = ls.group_column(spec.column)
    folds = plan_splits(spec, codes, split=ls.split, columns=columns, seed=seed, classes=classes)
    cfg, classes = pin_positive(cfg, ls.labels, classes)
    X = gather_features(store, ls.ids)
    views = view_bank(store, ls.ids) if cfg.augment.views else None
    if cfg.augment.views and views is None:
        raise HeadError(f"--augment views needs a view bank, but store {str(store.path)!r} has none; "
                        f"extract with views or drop 'views'")
    groups = ls.group_column(spec.column) if spec.column else ls.group_column("slide")
    y = ls.labels

    def tuned(rows: np.ndarray, label: str) -> HeadConfig:
        """The sweep's best config by CV over ``rows`` only (the scored rows stay outside)."""
        result = run_sweep(X[rows], y[rows], groups=None if groups is None else groups[rows], base=cfg,
                           seed=seed, views=views.take(rows) if views is not None else None,
                           classes=classes, folds=_sweep_folds(codes[rows], None if groups is None else groups[rows]))
        chosen.append(result.best_params)
        echo(f"{label}: sweep chose {result.best_params}\n{result.format()}")
        return result.best

    runs: list[dict[str, Any]] = []
    chosen: list[dict[str, Any]] = []
    fold_cfgs = []
    for i, fold in enumerate(folds):
        fold_cfg = tuned(fold.train, f"fold {i}") if sweep else cfg
        fold_cfgs.append(fold_cfg)
        report = cross_validate(X, y, [fold], groups=groups, config=fold_cfg, views=views,
                                seeds=seeds, classes=classes)
        runs += [{**r, "fold": i} for r in report.runs]
    summary = SeedReport(runs, mean_std(runs))
    echo(f"split {spec} ({len(folds)} fold(s) x {seeds} seed(s)), {len(classes)} classes\n{summary.table()}")

    final_rows, final_valid = _final_rows(folds, spec.kind, len(y))
    final_cfg = cfg
    if sweep:       # holdout: the fold's training rows are the final ones, so reuse its choice
        final_cfg = tuned(final_rows, "final head") if spec.kind == "kfold" else fold_cfgs[0]
    x_val = X[final_valid] if final_valid is not None else None
    y_val = y[final_valid] if final_valid is not None else None
    head_obj = train_head(X[final_rows], y[final_rows], x_val, y_val,
                          groups=None if groups is None else groups[final_rows], config=final_cfg,
                          views=views.take(final_rows) if views is not None else None, seed=seed,
                          classes=classes)
    head_obj.fingerprint = store.fingerprint()
    head_obj.metrics.update({"split": str(spec), "seeds": seeds,
                             "test": {k: list(v) for k, v in summary.summary.items()},
                             "runs": runs, "sweep_choices": chosen})
    out_dir = None
    if out is not None:
        out_dir = str(save_head(head_obj, out))
        echo(f"head saved to {out_dir}")
    return {"summary": summary.summary, "runs": runs, "head": out_dir, "config": final_cfg.to_dict(),
            "classes": classes}


def _sweep_folds(codes: np.ndarray, groups: np.ndarray | None, most: int = 5) -> int:
    """Up to ``most`` CV folds, fewer when a class or the groups are too few (at least 2)."""
    counts = np.bincount(codes)
    k = min(most, int(counts[counts > 0].min()))
    if groups is not None:
        k = min(k, np.unique(np.asarray(groups).astype(str)).size)
    return max(2, k)


def _final_rows(folds: list[Fold], kind: str, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    if kind == "kfold":
        return np.arange(n), None
    return folds[0].train, folds[0].valid


def predict_command(store_path: str | os.PathLike[str], *, head_dir: str | os.PathLike[str],
                    out: str | os.PathLike[str] = "preds.arrow", batch_size: int = 65536,
                    heatmap: HeatmapSpec | None = None,
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict every row of the store with the head in ``head_dir`` into an Arrow IPC file."""
    head = load_head(head_dir)
    store = _open(store_path)
    result = predict_store(store, head, out, batch_size=batch_size, heatmap=heatmap)
    echo(f"{result['rows']} rows predicted in {result['seconds']:.1f} s -> {result['path']}"
         + (f"; heatmap {result['heatmap']}" if result["heatmap"] else ""))
    return result


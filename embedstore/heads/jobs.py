"""Bodies of ``embedstore train-head`` and ``embedstore predict``, taking plain arguments.

The click commands in ``embedstore.cli`` parse flags and call these; everything here is usable
from Python too. Validation happens before anything is written. Nothing here prints: progress
and tables go to the ``echo`` callback (``print`` unless the caller gives another).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .augment import ViewBank, parse_augment
from ..errors import HeadError
from .splits import Fold, SplitSpec, parse_split, plan_splits
from .data import gather_features, labelled_set, view_bank
from .crossval import SeedReport, cross_validate, pin_positive
from .metrics import mean_std
from .models import HeadConfig
from .persist import check_head_target, load_head, save_head
from .predict import HeatmapSpec, predict_store
from .tuning import sweep as run_sweep
from .stream import LazyRows, LazyViews, in_ram_bytes, resolve_budget, scan_rows
from .train import TrainedHead, encode_labels, train_head

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["train_head_command", "predict_command"]

Echo = Callable[[str], None]


def _open(store_path: str | os.PathLike[str]) -> Store:
    from ..store import open_store      # imported on use: the CLI starts without the store
    return open_store(store_path)


@dataclass
class _Job:
    """A labelled set ready to train on, with its folds (what every step below reads)."""
    spec: SplitSpec                   # the parsed --split
    cfg: HeadConfig                   # the base configuration (positive class pinned)
    emb: np.ndarray | LazyRows        # (n, dim) embeddings of the labelled tiles (read lazily when
                                      # they do not fit the budget)
    y: np.ndarray                     # (n,) object labels
    codes: np.ndarray                 # (n,) int64 class indices of y
    classes: list[str]                # class index -> label
    folds: list[Fold]                 # the split's folds over rows of emb
    groups: np.ndarray | None         # (n,) slide/patient per row, for grouped carving and CV
    views: ViewBank | LazyViews | None  # the view bank aligned with rows of emb
    seed: int
    budget: int | None = None         # bytes, when training streams from the store; None: in RAM

    def groups_at(self, a: np.ndarray) -> np.ndarray | None:
        """``groups`` at rows ``a``."""
        return None if self.groups is None else self.groups[a]


def train_head_command(store_path: str | os.PathLike[str], *, task: str | None = None,
                       labels: str | os.PathLike[str] | None = None, head: str = "linear",
                       hidden: int = 256, epochs: int = 100, lr: float | None = None,
                       weight_decay: float = 1e-4, dropout: float = 0.0, class_weights: str = "none",
                       split: str = "column", seeds: int = 5, augment: str | None = None,
                       sweep: bool = False, out: str | os.PathLike[str] | None = None,
                       positive: str | None = None, seed: int = 0,
                       memory_budget: int | str | None = None, echo: Echo = print) -> dict[str, Any]:
    """Train, score on the split's test rows over ``seeds`` seeds (mean ± std), save the head.

    ``memory_budget`` (bytes or "8G"; None: a quarter of the machine's RAM): when the labelled
    rows and their views would take more than that in RAM, every head trains from the store,
    read as it goes (``heads.stream``); otherwise they are gathered once, as always.

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
    if out is not None:
        check_head_target(out)          # before training: a directory the save would refuse
    store = _open(store_path)
    job = _prepare(store, cfg, spec, task, labels, seed, resolve_budget(memory_budget))
    if job.budget is not None:
        echo(f"{len(job.y)} labelled rows exceed the memory budget: training streams from the store")
    chosen: list[dict[str, Any]] = []
    runs, fold_cfgs = _score_folds(job, seeds, sweep, chosen, echo)
    summary = SeedReport(runs, mean_std(runs))
    echo(f"split {spec} ({len(job.folds)} fold(s) x {seeds} seed(s)), {len(job.classes)} classes\n"
         f"{summary.table()}")
    head_obj, final_cfg = _final_head(job, fold_cfgs if sweep else None, chosen, echo)
    head_obj.fingerprint = store.fingerprint()
    head_obj.metrics.update({"split": str(spec), "seeds": seeds,
                             "test": {k: list(v) for k, v in summary.summary.items()},
                             "runs": runs, "sweep_choices": chosen})
    out_dir = None
    if out is not None:
        out_dir = str(save_head(head_obj, out))
        echo(f"head saved to {out_dir}")
    return {"summary": summary.summary, "runs": runs, "head": out_dir, "config": final_cfg.to_dict(),
            "classes": job.classes, "streamed": job.budget is not None}


def _prepare(store: Store, cfg: HeadConfig, spec: SplitSpec, task: str | None,
             labels: str | os.PathLike[str] | None, seed: int, budget: int) -> _Job:
    """The labelled set, its folds and embeddings (and views when the augmentation samples them):
    gathered when they fit ``budget`` bytes, else ``LazyRows``/``LazyViews`` over the store."""
    ls = labelled_set(store, task=task, labels=labels)
    codes, classes = encode_labels(ls.labels)
    columns = dict(ls.columns)
    if spec.column is not None and ls.group_column(spec.column) is not None:
        columns[spec.column] = ls.group_column(spec.column)
    folds = plan_splits(spec, codes, split=ls.split, columns=columns, seed=seed, classes=classes)
    cfg, classes = pin_positive(cfg, ls.labels, classes)
    lazy = LazyViews.of_store(store, ls.ids) if cfg.augment.views else None
    n_views = 0 if lazy is None else int(lazy.src.size)
    fits = in_ram_bytes(len(ls), n_views, store.dim, store.dtype.itemsize) <= budget
    emb: np.ndarray | LazyRows
    views: ViewBank | LazyViews | None
    if fits:
        emb = gather_features(store, ls.ids)
        views = view_bank(store, ls.ids) if cfg.augment.views else None
    else:
        emb = LazyRows.of_store(store, ls.ids, chunk_rows=scan_rows(budget, store.dim, store.dtype.itemsize))
        views = lazy
    if cfg.augment.views and views is None:
        raise HeadError(f"--augment views needs a view bank, but store {str(store.path)!r} has none; "
                        f"extract with views or drop 'views'")
    groups = ls.group_column(spec.column) if spec.column else ls.group_column("slide")
    return _Job(spec, cfg, emb, ls.labels, codes, classes, folds, groups, views, seed,
                None if fits else budget)


def _tuned(job: _Job, rows: np.ndarray, label: str, chosen: list[dict[str, Any]], echo: Echo) -> HeadConfig:
    """The sweep's best config by CV over ``rows`` only (the scored rows stay outside)."""
    result = run_sweep(job.emb[rows], job.y[rows], groups=job.groups_at(rows), base=job.cfg, seed=job.seed,
                       views=job.views.take(rows) if job.views is not None else None,
                       classes=job.classes, folds=_sweep_folds(job.codes[rows], job.groups_at(rows)),
                       memory_budget=job.budget)
    chosen.append(result.best_params)
    echo(f"{label}: sweep chose {result.best_params}\n{result.format()}")
    return result.best


def _score_folds(job: _Job, seeds: int, sweep: bool, chosen: list[dict[str, Any]],
                 echo: Echo) -> tuple[list[dict[str, Any]], list[HeadConfig]]:
    """Every (fold, seed) run on the fold's test rows, and the configuration each fold used."""
    runs: list[dict[str, Any]] = []
    fold_cfgs = []
    for i, fold in enumerate(job.folds):
        fold_cfg = _tuned(job, fold.train, f"fold {i}", chosen, echo) if sweep else job.cfg
        fold_cfgs.append(fold_cfg)
        report = cross_validate(job.emb, job.y, [fold], groups=job.groups, config=fold_cfg, views=job.views,
                                seeds=seeds, classes=job.classes, memory_budget=job.budget)
        runs += [{**r, "fold": i} for r in report.runs]
    return runs, fold_cfgs


def _final_head(job: _Job, fold_cfgs: list[HeadConfig] | None, chosen: list[dict[str, Any]],
                echo: Echo) -> tuple[TrainedHead, HeadConfig]:
    """The head to save: trained on the final rows with the base config, or (``fold_cfgs``: a
    sweep ran) with the sweep's choice — a new sweep over every row for kfold, else the holdout
    fold's choice, whose training rows are the final ones."""
    final_rows, final_valid = _final_rows(job.folds, job.spec.kind, len(job.y))
    final_cfg = job.cfg
    if fold_cfgs is not None and job.spec.kind == "kfold":
        final_cfg = _tuned(job, final_rows, "final head", chosen, echo)
    elif fold_cfgs is not None:
        final_cfg = fold_cfgs[0]
    x_val = job.emb[final_valid] if final_valid is not None else None
    y_val = job.y[final_valid] if final_valid is not None else None
    head = train_head(job.emb[final_rows], job.y[final_rows], x_val, y_val, groups=job.groups_at(final_rows),
                      config=final_cfg, views=job.views.take(final_rows) if job.views is not None else None,
                      seed=job.seed, classes=job.classes, memory_budget=job.budget)
    return head, final_cfg


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
                    heatmap: HeatmapSpec | None = None, echo: Echo = print) -> dict[str, Any]:
    """Predict every row of the store with the head in ``head_dir`` into an Arrow IPC file."""
    head = load_head(head_dir)
    store = _open(store_path)
    result = predict_store(store, head, out, batch_size=batch_size, heatmap=heatmap)
    echo(f"{result['rows']} rows predicted in {result['seconds']:.1f} s -> {result['path']}"
         + (f"; heatmap {result['heatmap']}" if result["heatmap"] else ""))
    return result


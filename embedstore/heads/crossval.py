"""Repeated training: several seeds, several folds, mean ± std of every metric."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from .augment import ViewBank
from .splits import Fold, assert_views_follow_tiles
from .metrics import SCALAR_METRICS, format_table, mean_std
from .models import HeadConfig
from .stream import LazyRows, LazyViews
from .train import TrainedHead, encode_labels, evaluate, resolve_positive, train_head

__all__ = ["SeedReport", "run_seeds", "cross_validate", "pin_positive"]


@dataclass
class SeedReport:
    runs: list[dict[str, Any]]                       # one row per (fold, seed): metrics + seed, fold
    summary: dict[str, tuple[float, float]]          # metric -> (mean, std) over runs
    heads: list[TrainedHead] = field(default_factory=list)   # the trained heads, in run order

    def table(self) -> str:
        """Per-run rows then the ``mean ± std`` row, as plain text."""
        cols = ["fold", "seed", *SCALAR_METRICS, "epochs"]
        rows: list[dict[str, Any]] = [{c: r.get(c) for c in cols} for r in self.runs]
        rows.append({"fold": "all", "seed": "mean±std", **self.summary})
        return format_table(rows, cols)


def pin_positive(config: HeadConfig, y: Sequence[Any] | np.ndarray,
                 classes: Sequence[str] | None = None) -> tuple[HeadConfig, list[str]]:
    """Fix the class order and, for binary tasks, the positive class from *all* labels, so that
    every fold and seed reports F1 of the same class."""
    codes, cls = encode_labels(y, classes)
    pos = resolve_positive(cls, codes, config.positive)
    return (replace(config, positive=cls[pos]) if pos is not None else config), cls


def run_seeds(X_train: np.ndarray | LazyRows, y_train: Sequence[Any] | np.ndarray,
              X_test: np.ndarray | LazyRows, y_test: Sequence[Any] | np.ndarray, *,
              groups: np.ndarray | None = None, config: HeadConfig | None = None,
              views: ViewBank | LazyViews | None = None, seeds: int | Sequence[int] = 5,
              classes: Sequence[str] | None = None, keep_heads: bool = False,
              memory_budget: int | str | None = None) -> SeedReport:
    """Train one head per seed on the training rows and score each on the test rows.

    ``X_*``: (n, dim) float; ``y_*``: (n,) labels; ``groups``: (n_train,) for the grouped
    early-stopping carve; ``memory_budget``: as ``train_head``. Returns per-seed metrics and
    their mean ± std.
    """
    cfg, cls = pin_positive(config or HeadConfig(), y_train, classes)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    runs, heads = [], []
    for s in seed_list:
        head = train_head(X_train, y_train, groups=groups, config=cfg, views=views, seed=s, classes=cls,
                          memory_budget=memory_budget)
        runs.append({"fold": 0, "seed": s, **evaluate(head, X_test, y_test),
                     "epochs": head.history.get("epochs_run")})
        if keep_heads:
            heads.append(head)
    return SeedReport(runs, mean_std(runs), heads)


def cross_validate(X: np.ndarray | LazyRows, y: Sequence[Any] | np.ndarray, folds: Sequence[Fold], *,
                   groups: np.ndarray | None = None, config: HeadConfig | None = None,
                   views: ViewBank | LazyViews | None = None, seeds: int | Sequence[int] = 1,
                   classes: Sequence[str] | None = None, keep_heads: bool = False,
                   memory_budget: int | str | None = None) -> SeedReport:
    """Train and score on every fold for every seed; ``folds`` index rows of ``X`` (n, dim).

    A fold's explicit ``valid`` rows are the early-stopping set; otherwise one is carved from its
    training rows by ``groups``. ``views`` is aligned with the rows of ``X``; each fold trains only
    with the views of its own training tiles. ``X`` may be ``LazyRows`` and ``views``
    ``LazyViews``; ``memory_budget``: as ``train_head``.
    """
    y = np.asarray(y)
    cfg, cls = pin_positive(config or HeadConfig(), y, classes)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    runs, heads = [], []
    for i, fold in enumerate(folds):
        bank = None
        if views is not None:
            bank = views.take(fold.train)
            assert_views_follow_tiles(views.ids[fold.train], views.ids[fold.test], bank.base_ids)
        g = None if groups is None else np.asarray(groups)[fold.train]
        x_val = X[fold.valid] if fold.valid is not None else None
        y_val = y[fold.valid] if fold.valid is not None else None
        for s in seed_list:
            head = train_head(X[fold.train], y[fold.train], x_val, y_val, groups=g, config=cfg,
                              views=bank, seed=s, classes=cls, memory_budget=memory_budget)
            runs.append({"fold": i, "seed": s, **evaluate(head, X[fold.test], y[fold.test]),
                         "epochs": head.history.get("epochs_run")})
            if keep_heads:
                heads.append(head)
    return SeedReport(runs, mean_std(runs), heads)

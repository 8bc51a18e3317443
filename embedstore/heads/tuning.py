"""Cheap hyper-parameter tuning: grid or random search scored by k-fold CV on training data only.

Each configuration is trained on K-1 folds and scored on the held-out fold (its early-stopping
set is carved from the K-1 training folds, grouped). The best configuration is the one with the
best mean held-out score; because that choice looks at the CV scores, the best CV figure is
optimistic — score the chosen head on a test set the sweep never saw.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .augment import ViewBank
from ..errors import HeadError
from .splits import Fold, check_fold_counts, check_group_count, stratified_group_kfold
from .crossval import cross_validate, pin_positive
from .metrics import SCALAR_METRICS, format_table
from .models import HeadConfig
from .stream import LazyRows, LazyViews
from .train import encode_labels

__all__ = ["DEFAULT_SPACE", "SweepResult", "sweep", "plan_trials"]

# lr, weight decay, hidden size, dropout and augmentation strength (noise sigma)
DEFAULT_SPACE: dict[str, list[Any]] = {
    "lr": [3e-4, 1e-3, 3e-3],
    "weight_decay": [1e-4, 1e-2],
    "hidden": [128, 512],
    "dropout": [0.0, 0.3],
    "augment.noise": [0.0, 0.1],
}


@dataclass
class SweepResult:
    table: list[dict[str, Any]]       # one row per config: its params, metric (mean, std), rank
    best: HeadConfig                  # the best config (by mean CV ``metric``)
    best_params: dict[str, Any]       # the params of that row
    metric: str                       # the metric that chose it

    def format(self) -> str:
        params = list(self.best_params)
        return format_table(self.table, ["rank", *params, *SCALAR_METRICS, "seconds"])


def plan_trials(space: Mapping[str, Sequence[Any]], search: str = "grid", trials: int = 20,
                seed: int = 0) -> list[dict[str, Any]]:
    """The configurations to try: the full grid, or ``trials`` distinct grid points drawn at random."""
    names = list(space)
    if any(len(space[k]) == 0 for k in names):
        raise HeadError(f"every sweep parameter needs at least one value, got {dict(space)}")
    grid = [dict(zip(names, vals)) for vals in itertools.product(*(space[k] for k in names))]
    if search == "grid":
        return grid
    if search != "random":
        raise HeadError(f"search must be 'grid' or 'random', got {search!r}")
    rng = np.random.default_rng([seed, 0x5EE9])
    pick = rng.choice(len(grid), size=min(trials, len(grid)), replace=False)
    return [grid[i] for i in sorted(pick)]


def sweep(X: np.ndarray | LazyRows, y: Sequence[Any] | np.ndarray, *, groups: np.ndarray | None = None,
          base: HeadConfig | None = None, space: Mapping[str, Sequence[Any]] | None = None,
          search: str = "grid", trials: int = 20, folds: int = 5, seed: int = 0,
          views: ViewBank | LazyViews | None = None, metric: str = "f1",
          classes: Sequence[str] | None = None, memory_budget: int | str | None = None) -> SweepResult:
    """Score every configuration by ``folds``-fold stratified group CV over (n, dim) ``X``.

    ``space`` maps HeadConfig fields (or ``augment.noise`` / ``augment.mixup`` /
    ``augment.dropout``) to candidate values; ``groups`` (n,) keeps slides or patients within one
    fold. Pass only training data: the test set must stay outside the sweep. ``memory_budget``:
    as ``train_head`` (``X`` may be ``LazyRows``).
    """
    if metric not in SCALAR_METRICS:
        raise HeadError(f"sweep metric must be one of {SCALAR_METRICS}, got {metric!r}")
    y = np.asarray(y)
    base_cfg, cls = pin_positive(base or HeadConfig(), y, classes)
    if space is None:       # the MLP-only knobs do nothing for a linear head
        skip = ("hidden", "dropout") if base_cfg.kind == "linear" else ()
        space = {k: v for k, v in DEFAULT_SPACE.items() if k not in skip}
    codes, _ = encode_labels(y, cls)
    check_fold_counts(codes, folds, cls)
    check_group_count(groups, folds, f"a {folds}-fold sweep")
    assignment = stratified_group_kfold(codes, groups, folds, seed)
    cv = [Fold(np.flatnonzero(assignment != f), np.flatnonzero(assignment == f)) for f in range(folds)]
    table: list[dict[str, Any]] = []
    for params in plan_trials(space, search, trials, seed):
        cfg = base_cfg.with_params(params)
        t0 = time.perf_counter()
        report = cross_validate(X, y, cv, groups=groups, config=cfg, views=views, seeds=[seed], classes=cls,
                                memory_budget=memory_budget)
        table.append({**params, **report.summary, "seconds": time.perf_counter() - t0})
    order = sorted(range(len(table)), key=lambda i: -_score(table[i][metric]))
    for rank, i in enumerate(order, 1):
        table[i]["rank"] = rank
    table = [table[i] for i in order]
    best_params = {k: v for k, v in table[0].items() if k in space}
    return SweepResult(table, base_cfg.with_params(best_params), best_params, metric)


def _score(mean_std: tuple[float, float]) -> float:
    mean = mean_std[0]
    return -np.inf if mean != mean else mean      # NaN ranks last

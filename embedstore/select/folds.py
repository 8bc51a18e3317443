"""Folds of the proxy set: stratified by class, grouped by slide (or another column) so no group
has tiles on both sides of a fold, seeded — a pure function of labels and groups — and refusing,
in one line each, inputs that cannot give a fair k-fold kNN. ``small_class_note`` warns when
``k`` outnumbers some class's training tiles.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import SelectionError

__all__ = ["plan_folds", "group_codes", "small_class_note"]


def group_codes(groups: np.ndarray) -> np.ndarray:
    """(n,) int64 codes; a missing group (None) is a group of its own."""
    named = np.array([f"g:{g}" if g is not None else f"row:{i}" for i, g in enumerate(groups)],
                     dtype=object)
    _, codes = np.unique(named.astype(str), return_inverse=True)
    return codes.astype(np.int64).reshape(-1)


def plan_folds(y: np.ndarray, groups: np.ndarray | None, folds: int, k: int, seed: int = 0,
               classes: Sequence[str] | None = None, group_by: str | None = None) -> np.ndarray:
    """Fold of each row, (n,) int64 in ``0..folds-1``: stratified by ``y`` ((n,) int), grouped by
    ``groups`` ((n,) object, None = own group) so no group has rows in two folds. Pure and seeded;
    refuses inputs that cannot give a fair k-fold kNN, in one line each."""
    from ..heads.splits import stratified_group_kfold
    y = np.asarray(y, dtype=np.int64)
    name = (lambda c: str(classes[c])) if classes is not None else str  # noqa: E731
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    if present.size < 2:
        raise SelectionError(f"the proxy has one class ({name(int(present[0])) if present.size else 'none'}); "
                             f"a proxy needs tiles of at least two classes")
    low = [int(c) for c in present if counts[c] < folds]
    if low:
        c = low[0]
        raise SelectionError(f"class {name(c)!r} has {counts[c]} tile(s), fewer than the {folds} folds; "
                             f"add tiles, drop the class or use --folds {max(2, int(counts[c]))}")
    codes = None if groups is None else group_codes(np.asarray(groups, dtype=object))
    if codes is not None:
        n_groups = int(codes.max()) + 1
        if n_groups < folds:
            raise SelectionError(f"only {n_groups} distinct {group_by or 'group'} value(s) for {folds} folds; "
                                 f"use --folds {max(2, n_groups)} or --group-by none")
    fold = stratified_group_kfold(y, codes, folds, seed=seed)
    sizes = np.bincount(fold, minlength=folds)
    if (sizes == 0).any():
        raise SelectionError(f"grouping by {group_by or 'group'} leaves fold {int(np.argmin(sizes))} empty; "
                             f"use fewer --folds")
    smallest_train = int(y.size - sizes.max())
    if k > smallest_train:
        raise SelectionError(f"k={k} is larger than the smallest training fold ({smallest_train} tiles); "
                             f"use --k {smallest_train} or less, or fewer --folds")
    if codes is not None:
        for f in range(folds):
            assert not np.isin(codes[fold == f], codes[fold != f]).any(), "a group straddles folds"
    return fold


def small_class_note(y: np.ndarray, fold: np.ndarray, k: int, classes: Sequence[str]) -> str | None:
    """A caveat when ``k`` exceeds some class's training tiles in some fold: the k neighbours
    then cannot all come from that class, and large classes outvote it."""
    y, fold = np.asarray(y, dtype=np.int64), np.asarray(fold, dtype=np.int64)
    n_classes = len(classes)
    train = np.array([np.bincount(y[fold != f], minlength=n_classes) for f in np.unique(fold)])
    present = train[:, np.bincount(y, minlength=n_classes) > 0]
    low = int(present.min())
    if k <= low:
        return None
    c = int(np.flatnonzero(np.bincount(y, minlength=n_classes) > 0)[np.argmin(present.min(axis=0))])
    return (f"k={k} exceeds the {low} training tiles of class {classes[c]!r} in some fold: larger "
            f"classes outvote it (--k {max(1, low)} or less avoids that)")

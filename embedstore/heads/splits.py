"""Train / validation / test splits of labelled tiles: pure functions of labels, groups and a seed.

Split specs (the ``--split`` flag):

- ``column``         the labels' own split column: ``train`` rows train; ``test`` rows test and
                     ``valid`` rows are the early-stopping set when a ``test`` exists, otherwise
                     ``valid`` rows are the test set (PCam ships ``train`` + ``valid`` only).
- ``slide``          hold out ~20% of the slides (stratified): every tile of a slide on one side.
- ``group:COLUMN``   the same with the groups of COLUMN (e.g. all slides of a patient together).
- ``kfold:K``        stratified group K-fold, grouped by slide when slides are known.
- ``kfold:K:COLUMN`` stratified group K-fold grouped by COLUMN.

Rows are positions ``0..n-1`` in the labelled table. Views of a tile are keyed by the tile's base
id, so splitting base rows is enough to keep every view with its tile
(``assert_views_follow_tiles`` states it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import LabelsError

__all__ = [
    "SplitSpec", "Fold", "parse_split", "plan_splits", "stratified_group_kfold",
    "carve_validation", "assert_no_leak", "assert_views_follow_tiles", "check_fold_counts",
    "check_group_count",
]

HOLDOUT_FOLDS = 5          # slide / group holdouts keep one fold of five (~20%) for testing
SPLIT_NAMES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid",
               "test": "test"}


@dataclass(frozen=True)
class SplitSpec:
    kind: str                   # "column" | "slide" | "group" | "kfold"
    column: str | None = None   # grouping column ("slide" for slide; None = ungrouped kfold)
    folds: int = HOLDOUT_FOLDS  # K of kfold; holdouts keep 1 fold of this many for testing

    def __str__(self) -> str:
        if self.kind == "column":
            return "column"
        if self.kind == "slide":
            return "slide"
        if self.kind == "group":
            return f"group:{self.column}"
        return f"kfold:{self.folds}" + (f":{self.column}" if self.column not in (None, "slide") else "")


@dataclass(frozen=True)
class Fold:
    train: np.ndarray                 # (n_train,) int64 rows to train on (validation carved from them)
    test: np.ndarray                  # (n_test,) int64 rows to score on
    valid: np.ndarray | None = None   # (n_valid,) int64 explicit early-stopping rows, if any


def parse_split(text: str) -> SplitSpec:
    """Parse ``column | slide | group:COLUMN | kfold:K[:COLUMN]``."""
    parts = text.strip().split(":")
    head = parts[0].lower()
    if head in ("column", "slide") and len(parts) == 1:
        return SplitSpec(head, "slide" if head == "slide" else None)
    if head == "group" and len(parts) == 2 and parts[1]:
        return SplitSpec("group", parts[1])
    if head == "kfold" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) >= 2:
        column = parts[2] if len(parts) == 3 and parts[2] else "slide"
        return SplitSpec("kfold", column, int(parts[1]))
    raise LabelsError(f"unknown split {text!r}; use column, slide, group:COLUMN or kfold:K[:COLUMN] (K >= 2)")


def _groups_codes(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Dense group codes ``(n,)`` int64; each row is its own group when ``groups`` is None."""
    if groups is None:
        return np.arange(n, dtype=np.int64)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise LabelsError(f"groups must have one entry per row ({n}), got shape {groups.shape}")
    if groups.dtype == object and any(g is None for g in groups):
        raise LabelsError("groups contain missing values; give every row a group (slide, patient)")
    _, codes = np.unique(groups.astype(str) if groups.dtype == object else groups, return_inverse=True)
    return codes.astype(np.int64).reshape(-1)


def check_fold_counts(y: np.ndarray, k: int, classes: Sequence[str] | None = None) -> None:
    """Every class needs at least ``k`` examples for a stratified k-fold; one line otherwise."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    present = np.flatnonzero(counts)
    if present.size < 2:
        name = classes[present[0]] if classes is not None and present.size else str(present)
        raise LabelsError(f"only one class ({name}) in the labels; a classifier needs at least two")
    low = [c for c in present if counts[c] < k]
    if low:
        c = low[0]
        name = classes[int(c)] if classes is not None else str(c)
        raise LabelsError(f"class {name!r} has {counts[c]} examples, fewer than the {k} folds; "
                          f"add examples, merge the class or use fewer folds")


def check_group_count(groups: np.ndarray | None, k: int, what: str, name: str | None = "group") -> None:
    """``k`` folds need at least ``k`` distinct groups (else some fold is empty); one line otherwise."""
    if groups is None:
        return
    n = np.unique(_groups_codes(np.asarray(groups), len(groups))).size
    if n < k:
        raise LabelsError(f"{what} needs at least {k} distinct {name} values, got {n}; "
                          f"use fewer folds or a finer grouping")


def stratified_group_kfold(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int = 0) -> np.ndarray:
    """Fold of each row, ``(n,)`` int64 in ``0..k-1``: groups never straddle folds and each fold's
    class mix stays close to the whole.

    Ungrouped: exact per-class round robin after a seeded shuffle. Grouped: groups, largest first
    (seeded order among equals), each go to the fold that keeps the per-class fold shares most even.
    """
    y = np.asarray(y, dtype=np.int64)
    n = y.size
    rng = np.random.default_rng([seed, 0x5F17])
    fold = np.empty(n, dtype=np.int64)
    if groups is None:
        start = 0
        for c in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == c))
            fold[rows] = (start + np.arange(rows.size)) % k
            start = (start + rows.size) % k        # next class fills the folds left short
        return fold
    g = _groups_codes(groups, n)
    n_groups, n_classes = int(g.max()) + 1, int(y.max()) + 1
    counts = np.zeros((n_groups, n_classes), dtype=np.float64)
    np.add.at(counts, (g, y), 1.0)
    totals = np.maximum(counts.sum(axis=0), 1.0)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    share = np.zeros((k, n_classes))            # fraction of each class already in each fold
    size = np.zeros(k)
    group_fold = np.empty(n_groups, dtype=np.int64)
    for gi in order:
        d = counts[gi] / totals
        s1 = share.sum(axis=0)                              # (c,)
        s2 = (share ** 2).sum(axis=0)                       # (c,)
        new_s1 = s1 + d                                     # same whatever fold takes it
        new_s2 = s2 + 2 * share * d + d * d                 # (k, c): row f = fold f takes it
        spread = np.sqrt(np.maximum(new_s2 / k - (new_s1 / k) ** 2, 0.0)).mean(axis=1)
        best = np.flatnonzero(spread <= spread.min() + 1e-12)
        f = best[np.argmin(size[best])]
        group_fold[gi] = f
        share[f] += d
        size[f] += counts[gi].sum()
    return group_fold[g]


def carve_validation(y: np.ndarray, groups: np.ndarray | None, fraction: float = 0.1,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into ``(fit, valid)`` int64 positions, grouped and stratified; valid ~ ``fraction``."""
    y = np.asarray(y, dtype=np.int64)
    k = max(2, int(round(1.0 / fraction)))
    fold = stratified_group_kfold(y, groups, k, seed=seed + 7919)
    valid = np.flatnonzero(fold == 0)
    fit = np.flatnonzero(fold != 0)
    return fit, valid


def _column_folds(split: np.ndarray) -> list[Fold]:
    names = np.array([SPLIT_NAMES.get(str(s).strip().lower(), "?") if s is not None else "?"
                      for s in split], dtype=object)
    bad = np.flatnonzero(names == "?")
    if bad.size:
        raise LabelsError(f"split column has {bad.size} rows with an unknown value "
                          f"(first: {split[bad[0]]!r}); use train, valid or test")
    train = np.flatnonzero(names == "train")
    valid = np.flatnonzero(names == "valid")
    test = np.flatnonzero(names == "test")
    if train.size == 0:
        raise LabelsError("split column has no 'train' rows; mark the rows to train on as train")
    if test.size:
        return [Fold(train, test, valid if valid.size else None)]
    if valid.size == 0:
        raise LabelsError("split column has only 'train' rows; add valid/test rows or use --split kfold:5")
    return [Fold(train, valid, None)]


def plan_splits(spec: SplitSpec | str, y: np.ndarray, *, split: np.ndarray | None = None,
                columns: Mapping[str, np.ndarray | None] | None = None, seed: int = 0,
                classes: Sequence[str] | None = None) -> list[Fold]:
    """Folds for ``spec`` over ``y`` ((n,) int class indices).

    ``split``: (n,) object train/valid/test for ``column``; ``columns``: named (n,) group arrays
    (``slide``, ``group``, a CSV column...). One fold for holdouts, K for ``kfold:K``.
    """
    spec = parse_split(spec) if isinstance(spec, str) else spec
    y = np.asarray(y, dtype=np.int64)
    columns = dict(columns or {})
    if spec.kind == "column":
        if split is None:
            raise LabelsError("--split column needs a split column (train/valid/test) in the labels; "
                              "use --split slide or kfold:5 instead")
        folds = _column_folds(np.asarray(split, dtype=object))
    else:
        groups = None
        if spec.column is not None:
            groups = columns.get(spec.column)
            if groups is None and not (spec.kind == "kfold" and spec.column == "slide"):
                known = sorted(k for k, v in columns.items() if v is not None) or ["none"]
                raise LabelsError(f"split {spec} needs column {spec.column!r}, which the labels do not "
                                  f"have (known: {', '.join(known)})")
        k = spec.folds
        check_fold_counts(y, k if spec.kind == "kfold" else 2, classes)
        check_group_count(groups, k if spec.kind == "kfold" else 2, f"split {spec}", spec.column)
        fold = stratified_group_kfold(y, groups, k, seed)
        held = range(k) if spec.kind == "kfold" else [0]
        folds = [Fold(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in held]
        if groups is not None:
            assert_no_leak(folds, groups)
    return folds


def assert_no_leak(folds: Sequence[Fold], groups: np.ndarray) -> None:
    """Internal invariant: no group has rows on two sides of any fold."""
    codes = _groups_codes(np.asarray(groups), len(groups))
    for f in folds:
        sides = [set(codes[f.train].tolist()), set(codes[f.test].tolist())]
        if f.valid is not None:
            sides.append(set(codes[f.valid].tolist()))
        for i in range(len(sides)):
            for j in range(i + 1, len(sides)):
                assert not (sides[i] & sides[j]), "a group straddles two sides of a split"


def assert_views_follow_tiles(train_ids: np.ndarray, held_ids: np.ndarray, bank_ids: np.ndarray) -> None:
    """Internal invariant: every view in the training bank belongs to a training tile, so no view
    of a held-out tile is ever trained on. ``bank_ids``: base tile id of each bank view."""
    bank = np.asarray(bank_ids, dtype=np.int64)
    assert np.isin(bank, np.asarray(train_ids, dtype=np.int64)).all(), "a view's tile is not in train"
    assert not np.isin(bank, np.asarray(held_ids, dtype=np.int64)).any(), "a held-out tile's view is in train"

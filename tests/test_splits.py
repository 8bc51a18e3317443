"""Splits never leak: slides, patients and k-fold groups stay on one side; views follow tiles."""
from __future__ import annotations

import numpy as np
import pytest

from embedstore.heads.augment import ViewBank
from embedstore.errors import LabelsError
from embedstore.heads.splits import (
    Fold, SplitSpec, assert_no_leak, assert_views_follow_tiles, carve_validation, parse_split,
    plan_splits, stratified_group_kfold,
)


def cohort(seed: int = 0, n_patients: int = 30, n_classes: int = 3):
    """Patients with 1-3 slides each, 5-40 tiles a slide; class mix differs per slide."""
    rng = np.random.default_rng(seed)
    y, slide, patient = [], [], []
    for p in range(n_patients):
        for s in range(rng.integers(1, 4)):
            n = int(rng.integers(5, 40))
            mix = rng.dirichlet(np.full(n_classes, 0.7))
            y += rng.choice(n_classes, size=n, p=mix).tolist()
            slide += [f"P{p:02d}-S{s}"] * n
            patient += [f"P{p:02d}"] * n
    return np.array(y), np.array(slide, dtype=object), np.array(patient, dtype=object)


def sides(fold: Fold, groups: np.ndarray) -> tuple[set, set]:
    return set(groups[fold.train]), set(groups[fold.test])


def test_parse_split_forms_and_errors():
    assert parse_split("column") == SplitSpec("column", None)
    assert parse_split("slide") == SplitSpec("slide", "slide")
    assert parse_split("group:patient") == SplitSpec("group", "patient")
    assert parse_split("kfold:5") == SplitSpec("kfold", "slide", 5)
    assert parse_split("kfold:3:patient") == SplitSpec("kfold", "patient", 3)
    for text in ("column", "slide", "group:patient", "kfold:5", "kfold:3:patient"):
        assert parse_split(str(parse_split(text))) == parse_split(text)
    for bad in ("kfold", "kfold:1", "kfold:x", "group:", "random", "slide:2"):
        with pytest.raises(LabelsError, match="unknown split"):
            parse_split(bad)


def test_slide_split_keeps_every_slide_on_one_side():
    y, slide, _ = cohort(1)
    (fold,) = plan_splits("slide", y, columns={"slide": slide}, seed=3)
    train, test = sides(fold, slide)
    assert not train & test
    assert np.intersect1d(fold.train, fold.test).size == 0
    assert fold.train.size + fold.test.size == y.size
    assert 0.1 < fold.test.size / y.size < 0.35            # ~ one fold in five
    assert set(np.unique(y[fold.test])) == set(np.unique(y))


def test_group_split_keeps_patients_together_even_across_their_slides():
    y, slide, patient = cohort(2)
    (fold,) = plan_splits("group:patient", y, columns={"slide": slide, "patient": patient}, seed=0)
    train, test = sides(fold, patient)
    assert not train & test
    # a slide-level split of the same data would be allowed to separate a patient's slides;
    # the patient split must not: every slide of a test patient is in test
    test_slides = set(slide[fold.test])
    for p in test:
        assert set(slide[patient == p]) <= test_slides


def test_kfold_tests_each_row_once_stratified_and_grouped():
    y, slide, _ = cohort(3, n_patients=40)
    folds = plan_splits("kfold:5", y, columns={"slide": slide}, seed=7)
    assert len(folds) == 5
    tested = np.concatenate([f.test for f in folds])
    assert np.array_equal(np.sort(tested), np.arange(y.size))
    overall = np.bincount(y) / y.size
    for f in folds:
        train, test = sides(f, slide)
        assert not train & test
        share = np.bincount(y[f.test], minlength=overall.size) / f.test.size
        assert np.abs(share - overall).max() < 0.12         # stratified despite grouping
    assert_no_leak(folds, slide)


def test_stratified_group_kfold_is_seeded():
    y, slide, _ = cohort(4)
    a = stratified_group_kfold(y, slide, 5, seed=1)
    assert np.array_equal(a, stratified_group_kfold(y, slide, 5, seed=1))
    assert not np.array_equal(a, stratified_group_kfold(y, slide, 5, seed=2))


def test_ungrouped_kfold_is_exactly_stratified():
    y = np.repeat([0, 1, 2], [50, 23, 7])
    fold = stratified_group_kfold(y, None, 5, seed=0)
    for c, n in ((0, 50), (1, 23), (2, 7)):
        counts = np.bincount(fold[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1


def test_column_split_semantics():
    y = np.array([0, 1] * 6)
    split = np.array(["train"] * 6 + ["valid"] * 3 + ["test"] * 3, dtype=object)
    (fold,) = plan_splits("column", y, split=split)
    assert np.array_equal(fold.train, np.arange(6))
    assert np.array_equal(fold.valid, np.arange(6, 9))
    assert np.array_equal(fold.test, np.arange(9, 12))
    pcam_like = np.array(["train"] * 8 + ["VALID"] * 4, dtype=object)     # no test: valid is test
    (fold,) = plan_splits("column", y, split=pcam_like)
    assert fold.valid is None and np.array_equal(fold.test, np.arange(8, 12))
    with pytest.raises(LabelsError, match="unknown value"):
        plan_splits("column", y, split=np.array(["train"] * 11 + ["holdout"], dtype=object))
    with pytest.raises(LabelsError, match="needs a split column"):
        plan_splits("column", y)


def test_bad_inputs_are_one_line_errors():
    y = np.array([0] * 20 + [1] * 3)
    with pytest.raises(LabelsError, match="'b' has 3 examples, fewer than the 5 folds"):
        plan_splits("kfold:5", y, classes=["a", "b"])
    with pytest.raises(LabelsError, match="only one class"):
        plan_splits("kfold:5", np.zeros(30, dtype=int), classes=["tumor"])
    with pytest.raises(LabelsError, match="needs column 'patient'"):
        plan_splits("group:patient", np.array([0, 1] * 10), columns={"slide": np.array(["s"] * 20)})
    with pytest.raises(LabelsError, match="needs at least 5 distinct slide values, got 3"):
        plan_splits("kfold:5", np.array([0, 1] * 15), columns={"slide": np.repeat(["a", "b", "c"], 10)})
    with pytest.raises(LabelsError, match="at least 2 distinct"):
        plan_splits("slide", np.array([0, 1] * 10), columns={"slide": np.array(["s"] * 20, dtype=object)})
    for err in (pytest.raises(LabelsError),):
        with err as info:
            plan_splits("kfold:5", y)
        assert "\n" not in str(info.value)


def test_validation_carve_is_grouped():
    y, slide, _ = cohort(5)
    fit, valid = carve_validation(y, slide, 0.1, seed=0)
    assert not set(slide[fit]) & set(slide[valid])
    assert np.array_equal(np.sort(np.r_[fit, valid]), np.arange(y.size))
    assert 0.03 < valid.size / y.size < 0.25


def test_views_follow_their_tiles_through_every_fold():
    y, slide, _ = cohort(6)
    ids = np.arange(y.size, dtype=np.int64) * 3 + 100            # store ids, not row numbers
    rng = np.random.default_rng(0)
    k = rng.integers(0, 4, size=y.size)                            # 0-3 views per tile
    view_ids = rng.permutation(np.repeat(ids, k))                  # bank order unrelated to rows
    view_emb = view_ids[:, None].astype(np.float32) * np.ones((1, 2), np.float32)
    bank = ViewBank.build(ids, view_ids, view_emb)
    for fold in plan_splits("kfold:4", y, columns={"slide": slide}, seed=1):
        sub = bank.take(fold.train)
        assert_views_follow_tiles(ids[fold.train], ids[fold.test], sub.base_ids)
        assert np.array_equal(sub.emb[:, 0].astype(np.int64), sub.base_ids)   # view data is the tile's
        assert sub.counts.sum() == k[fold.train].sum()
    with pytest.raises(AssertionError):
        assert_views_follow_tiles(ids[:5], ids[5:], np.r_[ids[:5], ids[7]])

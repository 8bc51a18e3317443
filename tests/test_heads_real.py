"""Heads on real embeddings of real PCam tiles (the acceptance of the heads work, reduced for CI).

The quick test embeds the shipped ``sample_data/pcam`` (200 tiles of lymph-node sections, 96 px
JPEG: train 120, valid 80) with the shipped ONNX MobileNetV2 and 2 views per tile, trains a
linear head on ``train`` and scores it on ``valid``. The full-size version (4000 / 1000 tiles of
``../shared/data/pcam``, 8 views, the issue's floors) is ``slow``; ``benchmarks/bench_pcam_heads.py``
reports every figure.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstore.extract.runner import ExtractConfig, extract
from embedstore.heads import HeadConfig, gather_features, labelled_set, run_seeds, train_head, view_bank
from embedstore.heads.metrics import f1
from embedstore.store import open_store

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = ROOT / "sample_data" / "pcam" / "labels.csv"
BACKBONE = "mobilenetv2-onnx-int8"

# The head trained here: 40 epochs on all 120 train rows, threshold 0.5. Measured (seeds 0-9;
# two extractions, bit-identical embeddings): F1 of tumor on valid 0.785-0.819, mean 0.802;
# balanced accuracy 0.800. With 2 views + noise 0.1 (30 epochs): 0.786-0.829, mean 0.809.
# The package defaults (early stopping and F1 threshold on a 10% carve) are not used: at 120
# rows the carve is 12 tiles and a threshold tuned on 12 tiles can be extreme (seed 0: 0.89,
# F1 0.552; seeds 0-9: 0.552-0.850). The floor sits well below the measured range and above
# what a broken pipeline gives: shuffled training labels 0.33-0.67 over 10 draws, predicting
# tumor everywhere 0.667 (40 of 80).
SAMPLE_F1_FLOOR = 0.72
FIXED: dict[str, Any] = dict(kind="linear", positive="tumor", epochs=40, patience=0, tune_threshold=False, valid_fraction=0.0)


def _split(store, csv):
    ls = labelled_set(store, labels=csv)
    split = np.asarray(ls.split, dtype=object)
    tr, va = np.flatnonzero(split == "train"), np.flatnonzero(split == "valid")
    x = gather_features(store, ls.ids)
    return ls, tr, va, x


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("pcam") / "store"
    res = extract([str(SAMPLE_CSV)], ExtractConfig(store=path, backbone=BACKBONE, views=2, progress=False))
    assert res.exit_code == 0 and res.tiles_written == 200, res.summary()
    return path


def test_linear_head_on_real_pcam_embeddings_clears_the_floor(sample_store):
    store = open_store(sample_store)
    ls, tr, va, x = _split(store, SAMPLE_CSV)
    assert (tr.size, va.size) == (120, 80) and x.shape == (200, 1280)
    cfg = HeadConfig(**FIXED)
    rep = run_seeds(x[tr], ls.labels[tr], x[va], ls.labels[va], config=cfg, seeds=3)
    f1_mean = rep.summary["f1"][0]
    assert f1_mean >= SAMPLE_F1_FLOOR, rep.table()
    assert rep.summary["balanced_accuracy"][0] >= SAMPLE_F1_FLOOR, rep.table()
    # the metric agrees with a plain recount on valid
    head = train_head(x[tr], ls.labels[tr], config=cfg, seed=0)
    pred = head.predict_labels(x[va])
    truth = (ls.labels[va] == "tumor").astype(int)
    assert f1(truth, (pred == "tumor").astype(int), 2, positive=1) == pytest.approx(rep.runs[0]["f1"])


def test_view_sampling_runs_on_the_real_view_bank(sample_store):
    store = open_store(sample_store)
    ls, tr, va, x = _split(store, SAMPLE_CSV)
    bank = view_bank(store, ls.ids[tr])
    assert bank is not None and np.array_equal(bank.counts, np.full(tr.size, 2))
    assert np.array_equal(bank.ids, ls.ids[tr]) and np.array_equal(np.unique(bank.base_ids), np.sort(ls.ids[tr]))
    # views are real, distinct embeddings of the same tiles: near their tile, not equal to it
    own = np.asarray(x[tr], np.float32)[np.repeat(np.arange(tr.size), 2)]
    views = np.asarray(bank.emb, np.float32)
    cos = (own * views).sum(1) / (np.linalg.norm(own, axis=1) * np.linalg.norm(views, axis=1))
    assert not np.allclose(own, views) and np.median(cos) > 0.5
    cfg = HeadConfig(**{**FIXED, "epochs": 30})
    plain = train_head(x[tr], ls.labels[tr], config=cfg, seed=0)
    aug_cfg = HeadConfig.from_dict({**cfg.to_dict(), "augment": {"views": True, "noise": 0.1}})
    with_views = train_head(x[tr], ls.labels[tr], config=aug_cfg, views=bank, seed=0)
    assert with_views.history["epochs_run"] == 30
    # sampling changes what the head sees: other weights and other training losses
    assert not np.allclose(plain.history["train_loss"], with_views.history["train_loss"])
    rep = run_seeds(x[tr], ls.labels[tr], x[va], ls.labels[va], config=aug_cfg, views=bank, seeds=2)
    assert rep.summary["f1"][0] >= SAMPLE_F1_FLOOR, rep.table()


# ---------------------------------------------------------------- the full PCam subset

@pytest.mark.slow
def test_full_pcam_acceptance(shared_data):
    """The issue's acceptance on 4000 / 1000 real PCam tiles (8 views per tile): a linear head
    reaches F1 0.78 (measured 0.816 with the defaults, 5 seeds), and the best configuration
    (views, in the regime the train-CV sweep of bench_pcam_heads.py chose: lr 1e-3, 40 epochs,
    threshold tuned on a 10% carve; measured 0.832) beats scikit-learn's logistic regression
    (C = 1, measured 0.769) on the same standardised features. Embedding takes 10-20 minutes
    on this CPU; the store is reused from the benchmark's scratch folder when present."""
    csv = shared_data / "pcam" / "labels.csv"
    if not csv.exists():
        pytest.skip("../shared/data/pcam is not present")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_pcam_heads as B
    store = B.ensure_store(f"mobilenetv2-onnx-int8-v{B.K_VIEWS}", BACKBONE, views=B.K_VIEWS, csv=csv)
    d = B.load_pcam(store["store"], csv)
    assert d.x_train.shape == (4000, 1280) and d.x_valid.shape == (1000, 1280)
    assert d.bank is not None and np.array_equal(d.bank.counts, np.full(4000, B.K_VIEWS))
    lr = B.sklearn_lr(d, "default")
    plain = run_seeds(d.x_train, d.y_train, d.x_valid, d.y_valid, seeds=3,
                      config=HeadConfig(kind="linear", positive="tumor"))
    tuned = HeadConfig.from_dict({"kind": "linear", "positive": "tumor", "lr": 1e-3, "epochs": 40,
                                  "patience": 0, "tune_threshold": True, "augment": {"views": True}})
    views = run_seeds(d.x_train, d.y_train, d.x_valid, d.y_valid, seeds=3, views=d.bank, config=tuned)
    assert plain.summary["f1"][0] >= 0.78, plain.table()
    assert views.summary["f1"][0] >= 0.78, views.table()
    assert max(plain.summary["f1"][0], views.summary["f1"][0]) > lr["f1"], (lr, views.table())

"""Heads: metrics equal scikit-learn's, training behaves (accuracy, imbalance, threshold, early
stopping), save/load round trips, prediction over a store streams and refuses foreign stores."""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from embedstore.heads.augment import ViewBank, parse_augment
from embedstore.errors import BackboneMismatchError, ConfigError, HeadError, LabelsError, ShapeError, UnknownKeyError
from embedstore.heads import (
    HeadConfig, HeatmapSpec, SlideBagDataset, check_fingerprint, cross_validate, evaluate, gather_features,
    labelled_set, load_head, predict_store, run_seeds, save_head, sweep, train_head, view_bank,
)
from embedstore.heads import metrics as M
from embedstore.heads import persist
from embedstore.heads.jobs import train_head_command
from embedstore.plots import render_heatmap
from embedstore.heads.splits import plan_splits

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


# ---------------------------------------------------------------- synthetic data with structure

def gaussians(n: int, dim: int = 16, n_classes: int = 3, sep: float = 3.0, seed: int = 0,
              weights: list[float] | None = None):
    """Classes as Gaussian blobs in a random low-rank subspace, with uneven feature scales and
    offsets (so standardisation matters)."""
    rng = np.random.default_rng(seed)
    p = np.asarray(weights if weights is not None else np.full(n_classes, 1 / n_classes))
    y = rng.choice(n_classes, size=n, p=p / p.sum())
    centres = rng.normal(size=(n_classes, dim)) * sep / np.sqrt(dim)
    x = centres[y] + rng.normal(size=(n, dim))
    x = x * np.exp(rng.normal(0, 1, dim)) + rng.normal(0, 5, dim)
    return x.astype(np.float32), y


class FakeStore:
    """The store API the heads code binds to, over in-memory arrays (``StoreLike`` and more)."""

    def __init__(self, emb, slides, xy, labels=None, fingerprint=None, views=None, path="mem://store"):
        self.emb = emb
        self.keys = np.array([f"t{i:05d}" for i in range(len(emb))], dtype=object)
        self.slide_of = np.asarray(slides, dtype=object)
        self.xy = np.asarray(xy, dtype=np.int64)
        self.task = labels
        self._fp = fingerprint or {"backbone": {"name": "fake"}, "weights_sha256": "abc", "transform": {}}
        self._views = views
        self.path = path
        self.dim = int(emb.shape[1])
        self.dtype = emb.dtype

    # -- StoreLike: every row is live, ids are row positions
    def __len__(self):
        return len(self.emb)

    @property
    def n_rows_committed(self):
        return len(self.emb)

    def all_ids(self):
        return np.arange(len(self.emb), dtype=np.int64)

    def _known(self, ids):
        """Like the real store: an id outside the store is unknown (never wrapped around)."""
        ids = np.asarray(ids, dtype=np.int64)
        bad = (ids < 0) | (ids >= len(self.emb))
        if bad.any():
            raise UnknownKeyError(f"{int(bad.sum())} id(s) not in {self.path}, first: {int(ids[bad][0])}")
        return ids

    def keys_of(self, ids):
        return list(self.keys[self._known(ids)])

    def labels(self, keys, task=None):
        if self.task is None:
            return np.full(len(keys), None, dtype=object)
        return np.asarray(self.task, dtype=object)[self.ids(list(keys))]

    def fingerprint(self):
        return dict(self._fp)

    def gather(self, ids):
        return self.emb[self._known(ids)]

    def ids(self, keys):
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise UnknownKeyError(f"{len(missing)} key(s) not in {self.path}, first: {missing[0]!r}")
        return np.array([index[k] for k in keys], dtype=np.int64)

    def scan(self, batch_size=65536):
        for a in range(0, len(self.emb), batch_size):
            yield np.arange(a, min(a + batch_size, len(self.emb)), dtype=np.int64), self.emb[a:a + batch_size]

    def metadata(self, ids, columns=("key", "slide", "x", "y")):
        ids = np.asarray(ids)
        label = np.asarray(self.task if self.task is not None else [None] * len(self.emb), dtype=object)
        table = {"key": self.keys, "slide": self.slide_of, "x": self.xy[:, 0], "y": self.xy[:, 1],
                 "label": label}
        return {c: table[c][ids] for c in columns}

    def task_table(self, task):
        ids = np.flatnonzero(self.task != None)  # noqa: E711
        return {"keys": list(self.keys[ids]), "ids": ids.astype(np.int64), "label": self.task[ids],
                "split": None, "group": None}

    def views(self):
        if self._views is None:
            return np.empty(0, np.int64), np.empty(0, np.uint8), np.empty((0, self.emb.shape[1]), np.float16)
        view_ids, view_num, view_emb = self._views            # the store's StoredViews: ids + gather
        return SimpleNamespace(ids=view_ids, view=view_num, gather=lambda j: view_emb[np.asarray(j)])

    def slides(self):
        return sorted(set(self.slide_of))

    def slide(self, name):
        ids = np.flatnonzero(self.slide_of == name)
        if not ids.size:
            raise UnknownKeyError(f"slide {name!r} is not in {self.path}")
        return SimpleNamespace(emb=self.emb[ids], coords=self.xy[ids], keys=list(self.keys[ids]), ids=ids)


def fake_store(n=600, dim=16, seed=0, **kw):
    x, y = gaussians(n, dim=dim, n_classes=2, seed=seed, weights=[0.7, 0.3])
    slides = np.array([f"slide{i % 6}" for i in range(n)], dtype=object)
    grid = np.arange(n) // 6
    xy = np.stack([(grid % 10) * 256, (grid // 10) * 256], axis=1)
    labels = np.array(["normal", "tumor"], dtype=object)[y]
    return FakeStore(x.astype(np.float16), slides, xy, labels=labels, **kw), x, y


# ---------------------------------------------------------------- metrics vs scikit-learn

@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_sklearn_including_ties(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(20, 300)), int(rng.integers(2, 6))
    y = rng.integers(0, c, size=n)
    y[:c] = np.arange(c)                                             # every class present
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    prob = np.round(prob, 1)                                         # many ties
    prob = prob / prob.sum(1, keepdims=True)
    pred = np.where(rng.random(n) < 0.2, rng.integers(0, c, size=n), prob.argmax(1))
    labels = list(range(c))
    assert np.array_equal(M.confusion_matrix(y, pred, c), skm.confusion_matrix(y, pred, labels=labels))
    assert M.balanced_accuracy(y, pred, c) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert M.f1(y, pred, c) == pytest.approx(
        skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    if c == 2:
        for pos in (0, 1):
            assert M.f1(y, pred, 2, positive=pos) == pytest.approx(
                skm.f1_score(y, pred, pos_label=pos, zero_division=0))
            assert M.auroc(y, prob, positive=pos) == pytest.approx(
                skm.roc_auc_score(y == pos, prob[:, pos]))
    else:
        assert M.auroc(y, prob) == pytest.approx(
            skm.roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=labels))


def test_metric_edge_cases():
    y = np.array([0, 0, 1, 1])
    assert M.auroc(y, np.full((4, 2), 0.5), positive=1) == 0.5            # all tied
    assert np.isnan(M.auroc(np.zeros(4, int), np.full((4, 2), 0.5), positive=1))
    assert M.f1(y, np.zeros(4, int), 2, positive=1) == 0.0                # no positive predicted
    summary = M.mean_std([{"f1": 0.5}, {"f1": 0.7}], names=["f1"])
    assert summary["f1"] == pytest.approx((0.6, 0.1))
    assert "0.6000 ± 0.1000" in M.format_table([{"name": "x", "f1": summary["f1"]}])
    with pytest.raises(ShapeError, match="1-D class indices"):
        M.confusion_matrix(np.zeros((2, 2), int), np.zeros(4, int), 2)


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(1)
    pos = rng.random(200) < 0.2
    score = np.round(np.clip(rng.normal(0.3 + 0.3 * pos, 0.2), 0, 1), 2)
    t, best = M.best_f1_threshold(pos, score)
    brute = max(skm.f1_score(pos, score >= s) for s in np.unique(score))
    assert best == pytest.approx(brute)
    assert skm.f1_score(pos, score >= t) == pytest.approx(brute)


# ---------------------------------------------------------------- training behaviour

def test_linear_head_matches_logistic_regression_on_gaussians():
    x, y = gaussians(3000, dim=32, n_classes=4, sep=4.0, seed=3)
    xtr, ytr, xte, yte = x[:2000], y[:2000], x[2000:], y[2000:]
    head = train_head(xtr, ytr, config=HeadConfig(), seed=0)
    ours = evaluate(head, xte, yte)["accuracy"]
    scaler = StandardScaler().fit(xtr)
    ref = LogisticRegression(max_iter=2000).fit(scaler.transform(xtr), ytr).score(scaler.transform(xte), yte)
    assert ours > 0.95
    assert ours >= ref - 0.015
    assert head.classes == ["0", "1", "2", "3"] and head.positive is None


def test_mlp_learns_what_a_linear_head_cannot():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(3000, 2)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(int)                 # XOR
    x = np.c_[x, rng.normal(size=(3000, 6)).astype(np.float32)]
    cfg = dict(epochs=150, patience=20)
    lin = evaluate(train_head(x[:2000], y[:2000], config=HeadConfig(**cfg)), x[2000:], y[2000:])
    mlp = evaluate(train_head(x[:2000], y[:2000], config=HeadConfig(kind="mlp", hidden=64, **cfg)),
                   x[2000:], y[2000:])
    assert lin["accuracy"] < 0.7 < 0.9 < mlp["accuracy"]


def test_class_weights_raise_minority_recall():
    x, y = gaussians(4000, dim=16, n_classes=3, sep=1.6, seed=5, weights=[0.85, 0.1, 0.05])
    tr, te = slice(0, 3000), slice(3000, None)
    recall = {}
    for mode in ("none", "auto"):
        head = train_head(x[tr], y[tr], config=HeadConfig(class_weights=mode), seed=0)
        cm = np.array(evaluate(head, x[te], y[te])["confusion"])
        recall[mode] = cm[2, 2] / cm[2].sum()
    assert recall["auto"] > recall["none"] + 0.1
    sampled = train_head(x[tr], y[tr], config=HeadConfig(balanced_sampling=True), seed=0)
    cm = np.array(evaluate(sampled, x[te], y[te])["confusion"])
    assert cm[2, 2] / cm[2].sum() > recall["none"] + 0.1


def test_threshold_tuning_improves_minority_f1():
    gain = []
    for seed in (7, 8, 9):
        x, y = gaussians(6000, dim=16, n_classes=2, sep=1.5, seed=seed, weights=[0.95, 0.05])
        tr, te = slice(0, 4000), slice(4000, None)
        tuned = train_head(x[tr], y[tr], config=HeadConfig(tune_threshold=True), seed=0)
        plain = train_head(x[tr], y[tr], config=HeadConfig(tune_threshold=False), seed=0)
        assert tuned.positive == 1 and tuned.threshold is not None and tuned.threshold < 0.5
        assert plain.threshold is None
        gain.append(evaluate(tuned, x[te], y[te])["f1"] - evaluate(plain, x[te], y[te])["f1"])
    assert np.mean(gain) > 0.05 and min(gain) > -0.01
    # the positive class is explicit and configurable
    flipped = train_head(x[tr], y[tr], config=HeadConfig(positive="0", epochs=5), seed=0)
    assert flipped.positive == 0


def test_early_stopping_stops_and_keeps_the_best_epoch():
    x, y = gaussians(400, dim=64, n_classes=2, sep=1.0, seed=9)        # small: overfits quickly
    head = train_head(x, y, config=HeadConfig(epochs=300, patience=4, lr=0.03), seed=0)
    h = head.history
    assert h["stopped_early"] and h["epochs_run"] < 300
    assert h["epochs_run"] - h["best_epoch"] == 4
    assert min(h["valid_loss"]) == pytest.approx(h["valid_loss"][h["best_epoch"] - 1])
    assert h["n_fit"] + h["n_valid"] == 400


def test_adamw_matches_torch_optim_step_for_step():
    from embedstore.heads._optim import AdamW, lr_factor
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    b = copy.deepcopy(a)
    ours = AdamW(a.parameters(), lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lr_factor("cosine", 20))
    factor = lr_factor("cosine", 20)
    for _ in range(20):
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        for model in (a, b):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        ours.step(factor(ours.steps))
        ours.zero_grad()
        ref.step()
        ref.zero_grad()
        sched.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_training_is_reproducible_per_seed_and_leaves_global_rng_alone():
    x, y = gaussians(500, seed=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    cfg = HeadConfig(kind="mlp", hidden=32, dropout=0.2, epochs=10, augment=parse_augment("noise=0.1,mixup=0.2"))
    a = train_head(x, y, config=cfg, seed=1).predict_proba(x)
    assert torch.rand(1) == before
    assert np.array_equal(a, train_head(x, y, config=cfg, seed=1).predict_proba(x))
    assert not np.array_equal(a, train_head(x, y, config=cfg, seed=2).predict_proba(x))


def test_grouped_validation_carve_has_no_leak():
    x, y = gaussians(600, seed=4)
    groups = np.repeat(np.arange(30), 20)
    head = train_head(x, y, groups=groups, config=HeadConfig(epochs=3), seed=0)
    assert head.history["n_valid"] % 20 == 0                           # whole groups only


def test_views_train_and_cross_validate_without_leak():
    x, y = gaussians(600, dim=8, seed=6)
    ids = np.arange(600, dtype=np.int64) + 10
    rng = np.random.default_rng(0)
    view_ids = np.repeat(ids, 3)
    view_emb = np.repeat(x, 3, axis=0) + rng.normal(0, 0.05, size=(1800, 8)).astype(np.float32)
    bank = ViewBank.build(ids, view_ids, view_emb)
    slides = np.repeat(np.arange(20), 30)
    folds = plan_splits("kfold:3", y, columns={"slide": slides})
    cfg = HeadConfig(epochs=40, augment=parse_augment("views,noise=0.05"))
    report = cross_validate(x, y, folds, groups=slides, config=cfg, views=bank, seeds=2)
    assert len(report.runs) == 6
    assert report.summary["accuracy"][0] > 0.85
    assert "±" in report.table()


def test_run_seeds_reports_mean_and_std():
    x, y = gaussians(900, seed=8, sep=2.0)
    rep = run_seeds(x[:600], y[:600], x[600:], y[600:], config=HeadConfig(epochs=15), seeds=3)
    assert [r["seed"] for r in rep.runs] == [0, 1, 2]
    acc = [r["accuracy"] for r in rep.runs]
    assert rep.summary["accuracy"] == pytest.approx((np.mean(acc), np.std(acc)))


def test_sweep_ranks_by_cross_validation_on_training_data_only():
    x, y = gaussians(900, seed=10, sep=2.5)
    space = {"lr": [1e-6, 3e-3], "weight_decay": [1e-4], "augment.noise": [0.0, 0.1]}
    res = sweep(x[:600], y[:600], base=HeadConfig(epochs=8, patience=0), space=space, folds=3,
                metric="balanced_accuracy")
    assert len(res.table) == 4 and [r["rank"] for r in res.table] == [1, 2, 3, 4]
    assert res.best.lr == 3e-3 and res.best_params["lr"] == 3e-3
    means = [r["balanced_accuracy"][0] for r in res.table]
    assert means == sorted(means, reverse=True)
    assert "rank" in res.format()
    rnd = sweep(x[:600], y[:600], base=HeadConfig(epochs=3), space=space, search="random", trials=2, folds=3)
    assert len(rnd.table) == 2


# ---------------------------------------------------------------- bad input

def test_bad_input_is_one_clear_line():
    x, y = gaussians(100, seed=0)
    bad = x.copy()
    bad[[7, 50]] = np.nan
    with pytest.raises(HeadError, match=r"NaN or inf in 2 row\(s\) \(first: row 7\)"):
        train_head(bad, y)
    with pytest.raises(LabelsError, match="only one class"):
        train_head(x, np.zeros(100, int))
    with pytest.raises(LabelsError, match="fewer than the 5 folds"):
        sweep(x, np.r_[np.zeros(97, int), np.ones(3, int)], folds=5)
    with pytest.raises(LabelsError, match="3 labels for 100"):
        train_head(x, y[:3])
    with pytest.raises(HeadError, match="head kind"):
        HeadConfig(kind="transformer")


# ---------------------------------------------------------------- persistence and prediction

def test_save_load_round_trip_gives_identical_probabilities(tmp_path):
    x, y = gaussians(800, n_classes=2, seed=11, weights=[0.75, 0.25])
    labels = np.array(["normal", "tumor"], dtype=object)[y]
    for cfg in (HeadConfig(epochs=10), HeadConfig(kind="mlp", hidden=32, dropout=0.1, epochs=10)):
        head = train_head(x, labels, config=cfg, seed=0)
        head.fingerprint = {"backbone": {"name": "fake"}}
        d = save_head(head, tmp_path / cfg.kind)
        back = load_head(d)
        assert np.array_equal(back.predict_proba(x), head.predict_proba(x))
        assert back.classes == ["normal", "tumor"] and back.positive == 1
        assert back.threshold == head.threshold and back.config == head.config
        meta = json.loads((d / "head.json").read_text())
        assert meta["positive"] == "tumor" and meta["fingerprint"] == {"backbone": {"name": "fake"}}
        assert sorted(p.name for p in d.iterdir()) == ["head.json", "head.safetensors"]


def test_load_head_refuses_missing_or_foreign_directories(tmp_path):
    with pytest.raises(HeadError, match="does not exist"):
        load_head(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "head.json").write_text("{}")
    with pytest.raises(HeadError, match="head.safetensors is missing"):
        load_head(tmp_path / "half")
    (tmp_path / "half" / "head.safetensors").write_bytes(b"")
    with pytest.raises(HeadError, match="not an embedstore head"):
        load_head(tmp_path / "half")


def _saved(tmp_path, kind="linear", name="head"):
    x, y = gaussians(300, n_classes=2, seed=5, weights=[0.7, 0.3])
    cfg = HeadConfig(epochs=3) if kind == "linear" else HeadConfig(kind="mlp", hidden=8, epochs=3)
    head = train_head(x, np.array(["normal", "tumor"], dtype=object)[y], config=cfg, seed=0)
    head.fingerprint = {"backbone": {"name": "fake"}}
    return save_head(head, tmp_path / name), head, x


def test_save_replaces_a_head_whole_and_old_heads_still_load(tmp_path):
    d, head, x = _saved(tmp_path)
    first = json.loads((d / "head.json").read_text())
    assert first["weights_sha256"] == hashlib.sha256((d / "head.safetensors").read_bytes()).hexdigest()
    other = train_head(x, head.predict_labels(x), config=HeadConfig(kind="mlp", hidden=8, epochs=3), seed=1)
    save_head(other, d)                                            # over the existing head
    assert json.loads((d / "head.json").read_text())["run"] != first["run"]
    assert load_head(d).config.kind == "mlp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]  # no staging or .old left
    assert sorted(p.name for p in d.iterdir()) == ["head.json", "head.safetensors"]
    # the layout before weights_sha256/run (weights renamed, then head.json) still loads
    meta = json.loads((d / "head.json").read_text())
    del meta["weights_sha256"], meta["run"]
    (d / "head.json").write_text(json.dumps(meta))
    assert np.array_equal(load_head(d).predict_proba(x), other.predict_proba(x))
    # a symlinked --out keeps the link and replaces its target
    (tmp_path / "link").symlink_to(d)
    save_head(head, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and load_head(tmp_path / "link").config.kind == "linear"


def test_save_refuses_a_directory_holding_other_files(tmp_path):
    d, head, _ = _saved(tmp_path)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(HeadError, match="notes.txt") as info:
        save_head(head, d)
    assert "\n" not in str(info.value) and (d / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(HeadError, match="is a file"):
        save_head(head, tmp_path / "file")


def test_load_head_recovers_an_interrupted_swap_and_drops_stale_staging(tmp_path):
    d, head, x = _saved(tmp_path)
    old = tmp_path / ".head.old"
    d.rename(old)                                                  # cut between the two renames
    stale = tmp_path / f".head.staging-{persist._host_tag()}-999999999-deadbeef"   # its writer is gone
    shutil.copytree(old, stale)
    assert np.array_equal(load_head(d).predict_proba(x), head.predict_proba(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]
    # a writer mid-swap (its staging directory on another host, unknowable from here): the old
    # head is read where it lies and nothing is moved
    d.rename(old)
    live = tmp_path / ".head.staging-otherhost-1-cafe0001"
    live.mkdir()
    assert np.array_equal(load_head(d).predict_proba(x), head.predict_proba(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".head.old", live.name]
    live.rmdir()
    old.rename(d)
    # a swap that finished but died before removing the old head: the old copy is dropped
    shutil.copytree(d, old)
    load_head(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def _craft(src, dst, edit=None, weights=None, drop_sha=False):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "head.json").read_text())
    if edit:
        edit(meta)
    if drop_sha:
        meta.pop("weights_sha256", None)
    (dst / "head.json").write_text(json.dumps(meta))
    if weights is not None:
        (dst / "head.safetensors").write_bytes(weights)
    return dst


def _set(path, value):
    def edit(meta):
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


# (case id, edit of head.json, text the message must name)
CRAFTED = [
    ("hidden-1e8", _set("config.hidden", 1e8), "config.hidden"),
    ("hidden-huge-int", lambda m: (_set("config.kind", "mlp")(m), _set("config.hidden", 100_000_000)(m)),
     "config.hidden"),
    ("hidden-text", _set("config.hidden", "many"), "config.hidden"),
    ("dim-negative", _set("dim", -5), "dim"),
    ("dim-float", _set("dim", 16.5), "dim"),
    ("dim-huge", _set("dim", 10**12), "dim"),
    ("dim-text", _set("dim", "16"), "dim"),
    ("dim-bool", _set("dim", True), "dim"),
    ("dim-missing", lambda m: m.pop("dim"), "dim"),
    ("classes-empty", _set("classes", []), "classes"),
    ("classes-one", _set("classes", ["normal"]), "classes"),
    ("classes-not-names", _set("classes", [1, 2]), "classes"),
    ("classes-twice", _set("classes", ["a", "a"]), "classes"),
    ("classes-not-a-list", _set("classes", "normal,tumor"), "classes"),
    ("threshold-above-1", _set("threshold", 1.5), "threshold"),
    ("threshold-negative", _set("threshold", -0.1), "threshold"),
    ("threshold-text", _set("threshold", "0.5"), "threshold"),
    ("positive-unknown", _set("positive", "zebra"), "positive"),
    ("config-not-an-object", _set("config", [1, 2]), "config"),
    ("kind-unknown", _set("config.kind", "transformer"), "head kind"),
    ("dropout-text", _set("config.dropout", "x"), "config.dropout"),
    ("dropout-out-of-range", _set("config.dropout", 3.0), "dropout"),
    ("augment-unknown", _set("config.augment", {"warp": 1}), "config.augment.warp"),
    ("augment-noise-text", _set("config.augment.noise", "loud"), "config.augment.noise"),
    ("metrics-not-an-object", _set("metrics", [1]), "metrics"),
    ("version-text", _set("version", "one"), "version"),
    # head.json edited so that it no longer describes the weights: refused from the header alone
    ("shape-dim", _set("dim", 32), "dim 32"),
    ("shape-classes", lambda m: m.update(classes=["normal", "tumor", "other"], positive=None, threshold=None),
     "body.weight"),
    ("shape-kind", lambda m: (_set("config.kind", "mlp")(m), _set("config.hidden", 65536)(m)), "body.0.weight"),
]


@pytest.mark.parametrize("case, edit, names", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_head_json_is_one_line_naming_the_field_and_builds_nothing(tmp_path, monkeypatch, case,
                                                                           edit, names):
    d, _, _ = _saved(tmp_path)
    bad = _craft(d, tmp_path / "crafted", edit)
    built = []
    monkeypatch.setattr(persist, "build_head_module", lambda *a, **k: built.append(a) or 1 / 0)
    with pytest.raises(HeadError) as info:
        load_head(bad)
    msg = str(info.value)
    assert "\n" not in msg and names in msg and str(bad) in msg, msg
    assert not built, "a module was built before the check"


def test_crafted_weights_files_are_one_line(tmp_path):
    d, head, _ = _saved(tmp_path)
    mlp, _, _ = _saved(tmp_path, kind="mlp", name="mlp")
    garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + b"\x00" * 64
    cases = {
        "swapped": (_craft(d, tmp_path / "swapped", weights=(mlp / "head.safetensors").read_bytes()), "sha256"),
        "swapped-old-layout": (_craft(d, tmp_path / "swapped-old", drop_sha=True,
                                      weights=(mlp / "head.safetensors").read_bytes()), "body.weight"),
        "garbage": (_craft(d, tmp_path / "garbage", drop_sha=True, weights=garbage), "head.safetensors"),
        "empty": (_craft(d, tmp_path / "empty", drop_sha=True, weights=b""), "head.safetensors"),
        "truncated": (_craft(d, tmp_path / "truncated", drop_sha=True,
                             weights=(d / "head.safetensors").read_bytes()[:-9]), "head.safetensors"),
    }
    for case, (bad, names) in cases.items():
        with pytest.raises(HeadError) as info:
            load_head(bad)
        msg = str(info.value)
        assert "\n" not in msg and names in msg and str(bad) in msg, (case, msg)


def test_predict_store_refuses_a_batch_size_below_one_before_writing(tmp_path):
    store, x, y = fake_store(n=60)
    head = train_head(x, y, config=HeadConfig(epochs=2), seed=0)
    head.fingerprint = store.fingerprint()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            predict_store(store, head, tmp_path / "preds.arrow", batch_size=bad)
    assert not list(tmp_path.iterdir())
    assert predict_store(store, head, tmp_path / "preds.arrow", batch_size=np.int64(7))["rows"] == 60


def test_predict_store_streams_every_row_to_arrow(tmp_path):
    import pyarrow as pa
    store, x, y = fake_store()
    head = train_head(x, y, config=HeadConfig(epochs=10), seed=0,)
    head.fingerprint = store.fingerprint()
    thumb = np.full((40, 50, 3), 230, np.uint8)
    spec = HeatmapSpec(slide="slide2", out=tmp_path / "heat.png", thumbnail=thumb, downsample=64.0)
    res = predict_store(store, head, tmp_path / "preds.arrow", batch_size=128, heatmap=spec)
    table = pa.ipc.open_file(str(tmp_path / "preds.arrow")).read_all()
    assert table.num_rows == res["rows"] == len(x)
    assert table.column_names == ["key", "pred", "prob_0", "prob_1", "slide", "x", "y"]
    prob = np.c_[table["prob_0"].to_numpy(), table["prob_1"].to_numpy()]
    assert np.allclose(prob, head.predict_proba(store.emb), atol=1e-6)
    assert table["key"].to_pylist() == list(store.keys)
    assert table["pred"].to_pylist() == [head.classes[i] for i in head.decide(prob)]
    assert table["x"].to_pylist() == store.xy[:, 0].tolist()
    assert (tmp_path / "heat.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png", "preds.arrow"]


def test_predict_refuses_another_embedding_space_and_writes_nothing(tmp_path):
    store, x, y = fake_store()
    head = train_head(x, y, config=HeadConfig(epochs=3), seed=0)
    head.fingerprint = store.fingerprint()
    save_head(head, tmp_path / "head")
    other, _, _ = fake_store(fingerprint={"backbone": {"name": "uni"}, "weights_sha256": "abc", "transform": {}})
    with pytest.raises(BackboneMismatchError) as info:
        predict_store(other, load_head(tmp_path / "head"), tmp_path / "preds.arrow")
    assert "\n" not in str(info.value) and "backbone" in str(info.value)
    head.fingerprint = {**store.fingerprint(), "transform": ()}           # tuple vs list: same space
    store._fp = {**store._fp, "transform": []}
    check_fingerprint(head, store.fingerprint())
    unbound = train_head(x, y, config=HeadConfig(epochs=2))
    with pytest.raises(HeadError, match="no store fingerprint"):
        predict_store(store, unbound, tmp_path / "preds.arrow")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_render_heatmap_paints_tiles(tmp_path):
    coords = np.array([[0, 0], [512, 0], [0, 512]])
    out = render_heatmap(np.zeros((20, 20, 3), np.uint8), 51.2, coords, np.array([0.1, 0.5, 0.9]),
                         tmp_path / "h.png", title="t")
    from PIL import Image
    img = np.asarray(Image.open(out))
    assert img.shape[0] > 100 and img.std() > 10


# ---------------------------------------------------------------- store binding

def test_labelled_set_from_task_and_csv(tmp_path):
    store, x, y = fake_store(n=120)
    ls = labelled_set(store, task="tumor")
    assert len(ls) == 120 and set(ls.labels) == {"normal", "tumor"}
    assert ls.columns["slide"][0] == "slide0"
    assert np.array_equal(gather_features(store, ls.ids), store.emb)
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "patient"])
        w.writerows([[f"t{i:05d}", "a" if i % 2 else "b", f"p{i % 4}"] for i in range(0, 120, 3)])
    ls = labelled_set(store, labels=path)
    assert np.array_equal(ls.ids, np.arange(0, 120, 3)) and ls.columns["patient"][1] == "p3"
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(["t99999", "a", "p0"])
    with pytest.raises(LabelsError, match=r"does not hold: 1 key\(s\) not in mem://store, first: 't99999'"):
        labelled_set(store, labels=path)
    with pytest.raises(LabelsError, match="not both"):
        labelled_set(store, task="tumor", labels=path)
    assert len(labelled_set(store)) == 120                           # extraction labels
    assert view_bank(store, ls.ids[:-1]) is None                     # a store without views


def test_view_bank_reads_only_the_requested_tiles_views():
    store, x, y = fake_store(n=50)
    view_ids = np.repeat(np.arange(50), 2)
    view_emb = (np.repeat(store.emb, 2, axis=0) + 1).astype(np.float16)
    store._views = (view_ids, np.tile([1, 2], 50).astype(np.uint8), view_emb)
    bank = view_bank(store, np.array([7, 3, 40]))
    assert np.array_equal(bank.ids, [7, 3, 40]) and np.array_equal(bank.counts, [2, 2, 2])
    assert np.array_equal(bank.base_ids, [7, 7, 3, 3, 40, 40])
    assert np.array_equal(bank.emb, view_emb[[14, 15, 6, 7, 80, 81]])


def test_slide_bag_dataset_reads_bags_from_the_store():
    store, x, y = fake_store(n=120)
    ds = SlideBagDataset(store, labels={f"slide{i}": "pos" if i < 2 else "neg" for i in range(6)})
    assert len(ds) == 6 and ds.classes == ["neg", "pos"]
    item = ds[0]
    assert item["slide"] == "slide0" and item["label"].item() == 1
    assert item["emb"].dtype == torch.float32 and item["emb"].shape == (20, 16)
    assert item["coords"].shape == (20, 2)
    assert torch.equal(item["emb"], torch.from_numpy(store.emb[item["ids"].numpy()].astype(np.float32)))
    with pytest.raises(LabelsError, match="not in store"):
        SlideBagDataset(store, labels={"slide9": "pos"})
    with pytest.raises(LabelsError, match="has tiles labelled"):
        SlideBagDataset(store, task="tumor")                          # tile labels differ in a slide
    assert (SlideBagDataset(store).targets == -1).all()


def test_train_head_command_end_to_end(tmp_path, monkeypatch):
    import embedstore.heads.jobs as cli
    store, x, y = fake_store(n=600)
    monkeypatch.setattr(cli, "_open", lambda path: store)
    lines: list[str] = []
    res = train_head_command("mem", task="tumor", split="slide", seeds=2, epochs=20,
                             out=tmp_path / "head", echo=lines.append)
    assert res["summary"]["balanced_accuracy"][0] > 0.85
    head = load_head(tmp_path / "head")
    assert head.fingerprint == store.fingerprint() and head.metrics["split"] == "slide"
    assert any("±" in s for s in lines)
    out = cli.predict_command("mem", head_dir=tmp_path / "head", out=tmp_path / "p.arrow", echo=lines.append)
    assert out["rows"] == 600


def test_train_head_command_sweeps_inside_each_fold(monkeypatch):
    import embedstore.heads.jobs as cli
    import embedstore.heads.tuning as sw
    store, x, y = fake_store(n=300)
    monkeypatch.setattr(cli, "_open", lambda path: store)
    monkeypatch.setattr(sw, "DEFAULT_SPACE", {"lr": [1e-6, 3e-3]})
    calls = []
    real = cli.run_sweep
    monkeypatch.setattr(cli, "run_sweep", lambda X, y, **kw: calls.append(len(y)) or real(X, y, **kw))
    res = train_head_command("mem", task="tumor", split="kfold:3", seeds=1, epochs=10, sweep=True,
                             echo=lambda s: None)
    assert len(res["runs"]) == 3
    assert calls[:3] == [200, 200, 200] and calls[3] == 300       # per fold on its training rows, then all
    assert res["config"]["lr"] == 3e-3


# ---------------------------------------------------------------- the real store

def test_against_the_real_store(tmp_path):
    """The binding on an actual store: task labels with split and group, the view bank, train,
    save, predict to Arrow, and refusal of a store from another backbone."""
    import pyarrow as pa
    from embedstore.store import StoreMeta, StoreWriter, import_labels, open_store
    rng = np.random.default_rng(0)
    n, dim = 240, 12
    y = rng.integers(0, 2, n)
    x = (rng.normal(size=(n, dim)) + 2.0 * y[:, None]).astype(np.float16)
    views = (x[:, None, :] + rng.normal(0, 0.1, (n, 2, dim))).astype(np.float16)
    keys = [f"s{i % 6}/{i}" for i in range(n)]

    def make(path, name):
        meta = StoreMeta(dim=dim, dtype="float16", backbone={"name": name}, weights_sha256="w")
        with StoreWriter(path, meta) as w:
            w.add(x, keys, views=views, slide=[f"s{i % 6}" for i in range(n)],
                  x=[(i // 6) % 8 * 224 for i in range(n)], y=[(i // 48) * 224 for i in range(n)])
    make(tmp_path / "store", "fake")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "split", "group"])
        w.writerows([[k, ["neg", "pos"][y[i]], "test" if i % 6 == 5 else "train", f"p{i % 3}"]
                     for i, k in enumerate(keys)])
    import_labels(tmp_path / "store", tmp_path / "labels.csv", "tumor")
    store = open_store(tmp_path / "store")
    ls = labelled_set(store, task="tumor")
    assert len(ls) == n and set(ls.split) == {"train", "test"} and ls.group_column("patient") is not None
    assert np.array_equal(view_bank(store, ls.ids[:5]).counts, [2] * 5)
    res = train_head_command(tmp_path / "store", task="tumor", split="column", seeds=2, epochs=30,
                             augment="views,noise=0.05", out=tmp_path / "head", echo=lambda s: None)
    assert res["summary"]["accuracy"][0] > 0.85
    from embedstore.heads.jobs import predict_command
    out = predict_command(tmp_path / "store", head_dir=tmp_path / "head", out=tmp_path / "p.arrow",
                          echo=lambda s: None)
    table = pa.ipc.open_file(str(tmp_path / "p.arrow")).read_all()
    assert out["rows"] == table.num_rows == n and table["slide"][0].as_py() == "s0"
    make(tmp_path / "other", "another-backbone")
    with pytest.raises(BackboneMismatchError, match="backbone"):
        predict_command(tmp_path / "other", head_dir=tmp_path / "head", out=tmp_path / "q.arrow",
                        echo=lambda s: None)
    assert not (tmp_path / "q.arrow").exists()


# ---------------------------------------------------------------- real tiles

def test_real_tiles_colour_features_kather_mini():
    """Real H&E tiles (Kather 2016, 8 tissue classes, 100 tiles): colour histograms are a weak but
    real signal; a linear head under stratified 5-fold CV must find it as well as scikit-learn."""
    root = DATA / "kather2016_mini"
    if not (root / "labels.csv").exists():
        pytest.skip("shared real data not available")
    from PIL import Image
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    feats, labels = [], []
    for r in rows:
        with Image.open(root / r["path"]) as img:
            im = np.asarray(img.convert("RGB").resize((64, 64)))
        px = im.reshape(-1, 3)
        hist = [np.histogram(px[:, c], bins=8, range=(0, 256))[0] / len(px) for c in range(3)]
        feats.append(np.concatenate(hist + [px.mean(0) / 255, px.std(0) / 255]))
        labels.append(r["label"])
    x, y = np.array(feats, np.float32), np.array(labels, dtype=object)
    folds = plan_splits("kfold:5", np.unique(y, return_inverse=True)[1], seed=0)
    ours = cross_validate(x, y, folds, config=HeadConfig(epochs=200, patience=20), seeds=1)
    ref = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)), x, y,
                          cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="balanced_accuracy")
    assert ours.summary["balanced_accuracy"][0] > 0.5                 # chance is 1/8
    assert ours.summary["balanced_accuracy"][0] > ref.mean() - 0.1


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_folded_standardisation_gives_the_modules_logits(kind: str) -> None:
    """predict runs the body with (x - mean) / std folded into its first layer: the same
    logits as the module, on float16 rows like a store's, and the module is left unchanged."""
    from embedstore.heads.models import HeadConfig, build_head_module
    g = torch.Generator().manual_seed(0)
    dim = 64
    mean, std = torch.randn(dim, generator=g) * 3, torch.rand(dim, generator=g) * 4 + 0.1
    mod = build_head_module(HeadConfig(kind=kind, hidden=32), dim, 3, mean, std).eval()
    before = copy.deepcopy(mod.state_dict())
    x = (torch.randn(500, dim, generator=g) * 5 + 2).to(torch.float16)
    with torch.no_grad():
        want, got = mod(x), mod.folded()(x.to(torch.float32))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in mod.state_dict().items())

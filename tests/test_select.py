"""Backbone selection: the FAISS kNN equals a brute-force reference, grouped folds never leak and
stay stratified, a real selection on the shipped lung tiles ranks the pretrained backbone first
and reuses its cache, and each bad input is one SelectionError line."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.cli import main
from embedstore.errors import NotFittedError, SelectionError, ShapeError
from embedstore.arrays import average_ranks, l2_normalise
from embedstore.select.folds import plan_folds
from embedstore.select.knn import KnnClassifier, KnnConfig, fold_scores
from embedstore.select.proxy import SelectConfig, read_proxy, select_backbones
from embedstore.select.ranking import seed_noise_notes, spearman

ROOT = Path(__file__).resolve().parents[1]
LUNG = ROOT / "sample_data" / "lung"
PCAM = ROOT / "sample_data" / "pcam"
ONNX, TIMM = "mobilenetv2-onnx-int8", "resnet18"


# ------------------------------------------------------------------ data with real structure

def blobs(n: int, dim: int = 24, n_classes: int = 4, seed: int = 0, offset: float = 4.0):
    """Overlapping class blobs sharing a large common offset (what centring removes)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    centres = rng.normal(size=(n_classes, dim))
    x = centres[y] + 1.2 * rng.normal(size=(n, dim)) + offset
    return x.astype(np.float32), y.astype(np.int64)


def reference_votes(train, y, test, k, temperature, centre, n_classes):
    """Brute force in float64 numpy: cosine to every training row, top k, exp(sim / T) votes."""
    train, test = train.astype(np.float64), test.astype(np.float64)
    if centre:
        m = train.mean(axis=0)
        train, test = train - m, test - m
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)  # noqa: E731
    sim = unit(test) @ unit(train).T
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(test), n_classes))
    for i in range(len(test)):
        for j in nn[i]:
            votes[i, y[j]] += np.exp(sim[i, j] / temperature)
    return votes, nn


def cohort(seed: int = 0, n_slides: int = 40, n_classes: int = 3):
    """Slides of 4-30 tiles, each slide with its own class mix; a few tiles have no slide."""
    rng = np.random.default_rng(seed)
    y: list[int] = []
    names: list[str] = []
    for s in range(n_slides):
        n = int(rng.integers(4, 30))
        y += rng.choice(n_classes, size=n, p=rng.dirichlet(np.full(n_classes, 0.8))).tolist()
        names += [f"S{s:02d}"] * n
    groups = np.array(names, dtype=object)
    groups[rng.choice(len(groups), size=15, replace=False)] = None    # own groups
    return np.array(y, dtype=np.int64), groups


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def lung_rows(per_class: dict[str, int] | None = None) -> list[dict]:
    rows = []
    for cls in sorted(p.name for p in LUNG.iterdir()):
        files = sorted((LUNG / cls).iterdir())
        for f in files[: (per_class or {}).get(cls, len(files))]:
            rows.append({"path": str(f), "label": cls})
    return rows


# ---------------------------------------------------------------------------- kNN classifier

@pytest.mark.parametrize("k,centre,temperature", [(1, False, 0.07), (7, False, 0.07),
                                                   (20, True, 0.07), (15, True, 0.5)])
def test_knn_equals_bruteforce_reference(k, centre, temperature):
    x, y = blobs(600, seed=k)
    train, test = np.arange(450), np.arange(450, 600)
    clf = KnnClassifier(KnnConfig(k, temperature, centre)).fit(x[train], y[train], n_classes=4)
    votes, nn = reference_votes(x[train], y[train], x[test], k, temperature, centre, 4)
    scores, ids = clf.kneighbors(x[test])
    assert scores.shape == ids.shape == (150, k)
    assert np.array_equal(np.sort(ids, axis=1), np.sort(nn, axis=1))
    np.testing.assert_allclose(clf.votes(x[test]), votes, rtol=1e-4)
    assert np.array_equal(clf.predict(x[test]), votes.argmax(axis=1))
    assert (clf.predict(x[test]) == y[test]).mean() > 0.5            # real structure, not noise


def test_knn_centring_spreads_crowded_similarities_and_zero_rows_are_safe():
    x, y = blobs(400, offset=25.0, seed=3)          # a common component dominates every cosine
    plain = KnnClassifier(KnnConfig(k=10)).fit(x[:300], y[:300])
    centred = KnnClassifier(KnnConfig(k=10, centre=True)).fit(x[:300], y[:300])
    assert plain.kneighbors(x[300:])[0].min() > 0.9            # votes nearly uniform
    assert centred.kneighbors(x[300:])[0].min() < 0.5          # votes discriminate again
    scores, seconds = fold_scores(x, y, np.arange(400) % 4, KnnConfig(k=10, centre=True))
    assert scores.shape == (4,) and scores.min() > 0.6 and seconds > 0
    z = l2_normalise(np.zeros((2, 5)), None)
    assert np.array_equal(z, np.zeros((2, 5), np.float32))


def test_knn_unfitted_and_spearman_misuse_raise_embedstore_errors():
    with pytest.raises(NotFittedError, match="not fitted"):
        KnnClassifier().kneighbors(np.zeros((2, 4), np.float32))
    with pytest.raises(ShapeError, match=r"two \(n,\) arrays"):
        spearman(np.arange(3.0), np.arange(4.0))


def test_knn_refuses_k_above_training_rows():
    x, y = blobs(30)
    with pytest.raises(SelectionError, match="k=31 is larger than the 30 training rows"):
        KnnClassifier(KnnConfig(k=31)).fit(x, y)
    with pytest.raises(SelectionError, match="positive integer"):
        KnnConfig(k=0)


# ------------------------------------------------------------------------------ folds

def test_grouped_folds_never_split_a_group_and_stay_stratified():
    y, groups = cohort()
    fold = plan_folds(y, groups, folds=5, k=20, seed=1)
    assert np.array_equal(fold, plan_folds(y, groups, folds=5, k=20, seed=1))    # seeded, pure
    named = groups[groups != None]                                               # noqa: E711
    for g in set(named.tolist()):
        assert np.unique(fold[groups == g]).size == 1, f"group {g} straddles folds"
    share = np.bincount(y) / y.size
    for f in range(5):
        part = y[fold == f]
        assert part.size > 0.1 * y.size
        assert np.abs(np.bincount(part, minlength=3) / part.size - share).max() < 0.12
    flat = plan_folds(y, None, folds=5, k=20, seed=1)                            # ungrouped: exact
    for c in range(3):
        per_fold = np.bincount(flat[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert not np.array_equal(flat, plan_folds(y, None, folds=5, k=20, seed=2))


def test_read_proxy_groups_from_csv(tmp_path):
    rows = lung_rows()
    for i, r in enumerate(rows):
        r["slide"] = f"slide{i // 6}"
        r["patient"] = f"p{i // 12}"
    src = write_csv(tmp_path / "proxy.csv", rows)
    p = read_proxy(src)
    assert p.groups is not None
    assert p.group_by == "slide" and len(set(p.groups)) == 10 and p.tile["tile_size"] == 224
    patient = read_proxy(src, "patient").groups
    assert patient is not None and patient[0] == "p0"
    assert read_proxy(src, "none").groups is None
    fold = plan_folds(p.y, p.groups, 5, 20, classes=p.classes, group_by="slide")
    for g in set(p.groups):
        assert np.unique(fold[p.groups == g]).size == 1


def test_spearman_average_ranks():
    assert np.array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])
    assert spearman(np.array([1, 2, 3.0]), np.array([10, 20, 30.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3.0]), np.array([3, 2, 1.0])) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.array([1, 1, 1.0]), np.array([1, 2, 3.0])))
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 40).astype(float)   # many ties
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_seed_noise_notes_flag_unresolved_downstream_order():
    rng = np.random.default_rng(0)
    a, b = 0.80 + 0.01 * rng.standard_normal(10), 0.70 + 0.01 * rng.standard_normal(10)
    close = 0.701 + 0.01 * rng.standard_normal(10)          # within noise of b
    assert seed_noise_notes([("a", a), ("b", b)]) == []
    notes = seed_noise_notes([("b", b), ("close", close), ("a", a)])
    assert len(notes) == 1 and "not resolved" in notes[0]
    assert ("close" in notes[0] and " b " in notes[0]) and " a " not in notes[0]
    assert "one head each" in seed_noise_notes([("a", [0.8]), ("b", [0.7])])[0]


# ---------------------------------------------------------------- a real selection, cached

@pytest.fixture(scope="module")
def lung_selection(tmp_path_factory):
    out = tmp_path_factory.mktemp("select")
    cfg = SelectConfig(proxy=LUNG, backbones=(ONNX, TIMM), out=out, random_init=True,
                       num_workers=0, progress=False)
    return cfg, select_backbones(cfg)


def test_real_selection_ranks_pretrained_first(lung_selection):
    cfg, res = lung_selection
    best, other = res.candidates
    assert (best.backbone, best.weights, best.rank) == (ONNX, "pretrained", 1)
    assert (other.backbone, other.weights) == (TIMM, "random init")     # --random-init: timm only
    assert best.mean > other.mean + 0.03 and best.mean > 0.8
    assert len(best.fold_scores) == 5 and best.tiles_written == 60 and best.dim == 1280
    assert best.extract_s > 0 and best.knn_s > 0
    table = res.table()
    assert "mobilenetv2-onnx-int8" in table and "random init applied to: resnet18" in table
    assert res.notes == ["k=20 exceeds the 16 training tiles of class 'lung_aca' in some fold: larger "
                         "classes outvote it (--k 16 or less avoids that)"]     # 20 a class, 5 folds
    d = json.loads((Path(cfg.out) / "selection.json").read_text())
    assert [c["backbone"] for c in d["candidates"]] == [ONNX, TIMM]
    assert d["proxy"]["tiles"] == 60 and sum(d["proxy"]["fold_sizes"]) == 60
    assert d["proxy"]["classes"] == {"lung_aca": 20, "lung_n": 20, "lung_scc": 20}
    png = (Path(cfg.out) / "selection.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (Path(cfg.out) / "stores" / ONNX / "STORE.json").exists()


def test_second_run_reuses_the_cache_through_the_cli(lung_selection, tmp_path):
    cfg, first = lung_selection
    r = CliRunner().invoke(main, ["select", "--proxy", str(LUNG), "--backbone", ONNX, "--backbone", TIMM,
                                  "--random-init", "--cache", str(Path(cfg.out) / "stores"),
                                  "--out", str(tmp_path), "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "(cached)" in r.output and "random init applied to: resnet18" in r.output
    d = json.loads((tmp_path / "selection.json").read_text())
    assert [c["tiles_written"] for c in d["candidates"]] == [0, 0]
    assert [c["fold_scores"] for c in d["candidates"]] == [c.fold_scores for c in first.candidates]


def test_validate_trains_downstream_heads_and_reports_spearman(lung_selection, tmp_path):
    """The reduced acceptance run: proxy = shipped lung tiles, downstream = shipped PCam tiles
    (train/valid), the pretrained MobileNetV2 against a random ResNet-18."""
    cfg, first = lung_selection
    res = select_backbones(SelectConfig(proxy=LUNG, backbones=(ONNX, TIMM), out=tmp_path / "v",
                                        random_init=True, cache=cfg.cache_root,
                                        validate=PCAM / "labels.csv", validate_cache=tmp_path / "pcam",
                                        head_seeds=4, num_workers=0, progress=False))
    best, other = res.candidates
    assert [c.tiles_written for c in res.candidates] == [0, 0]           # proxy stores reused
    for c in res.candidates:
        d = c.downstream
        assert d["tiles_written"] == 200 and d["seeds"] == 4 and len(d["f1_runs"]) == 4
        assert d["train_tiles"] + d["valid_tiles"] == 200
        assert d["f1"][0] == pytest.approx(np.mean(d["f1_runs"]))
    assert best.downstream["f1"][0] > other.downstream["f1"][0] and best.downstream["auroc"][0] > 0.7
    assert res.spearman == pytest.approx(1.0)
    assert "Spearman(proxy score, downstream F1) = 1.000" in res.table()
    assert json.loads((tmp_path / "v" / "selection.json").read_text())["spearman"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ bad input

def run_cfg(tmp_path, proxy, backbones=(ONNX, TIMM), **kw):
    kw.setdefault("random_init", True)
    return select_backbones(SelectConfig(proxy=proxy, backbones=backbones, out=tmp_path / "o",
                                         progress=False, num_workers=0, **kw))


def test_proxy_with_one_class(tmp_path):
    src = write_csv(tmp_path / "one.csv", lung_rows({"lung_n": 0, "lung_scc": 0}))
    with pytest.raises(SelectionError, match=r"one class \(lung_aca\)"):
        run_cfg(tmp_path, src)


def test_class_with_fewer_tiles_than_folds(tmp_path):
    src = write_csv(tmp_path / "few.csv", lung_rows({"lung_n": 3}))
    with pytest.raises(SelectionError, match="class 'lung_n' has 3 tile.*fewer than the 5 folds"):
        run_cfg(tmp_path, src)


def test_unknown_backbone_lists_close_matches(tmp_path):
    with pytest.raises(SelectionError, match="unknown backbone 'resnet1888'.*close matches: .*resnet18"):
        run_cfg(tmp_path, LUNG, backbones=(ONNX, "resnet1888"))
    r = CliRunner().invoke(main, ["select", "--proxy", str(LUNG), "--backbone", "resnet1888",
                                  "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and r.output.startswith("error: unknown backbone 'resnet1888'")
    assert len(r.output.strip().splitlines()) == 1


def test_k_larger_than_smallest_training_fold(tmp_path):
    with pytest.raises(SelectionError, match=r"k=49 is larger than the smallest training fold \(48 tiles\)"):
        run_cfg(tmp_path, LUNG, k=49)


def test_cached_store_of_another_geometry(tmp_path):
    from embedstore.extract.runner import ExtractConfig, extract
    pcam = write_csv(tmp_path / "pcam.csv", [{"path": str(p), "label": p.parent.name}
                                              for p in sorted((PCAM / "train").rglob("*.jpg"))[:8]])
    extract([pcam], ExtractConfig(store=tmp_path / "cache" / ONNX, backbone=ONNX, progress=False,
                                  num_workers=0, tile_size=96))   # 96 px tiles; the lung tiles are 224 px
    with pytest.raises(SelectionError, match="another geometry.*tile_size': 96.*tile_size': 224"):
        run_cfg(tmp_path, LUNG, cache=tmp_path / "cache")


def test_other_bad_inputs(tmp_path):
    with pytest.raises(SelectionError, match="folder, which has no columns"):
        run_cfg(tmp_path, LUNG, group_by="patient")
    with pytest.raises(SelectionError, match="no tile of .* has a slide value"):
        run_cfg(tmp_path, LUNG, group_by="slide")
    with pytest.raises(SelectionError, match="listed twice"):
        run_cfg(tmp_path, LUNG, backbones=(ONNX, ONNX))
    rows = [dict(r, split="train") for r in lung_rows()]
    task = write_csv(tmp_path / "task.csv", rows)
    with pytest.raises(SelectionError, match="no tile has split=valid"):
        run_cfg(tmp_path, LUNG, validate=task)
    with pytest.raises(SelectionError, match="--head-seeds must be at least 1"):
        run_cfg(tmp_path, LUNG, head_seeds=0)
    with pytest.raises(SelectionError, match="unknown metric"):
        run_cfg(tmp_path, LUNG, metric="auroc")

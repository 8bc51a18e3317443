"""`select` past the memory budget: the kNN folds scored from the memory-mapped proxy store (an
exact index filled block by block, or a blocked search with a running top k) give the in-RAM
predictions and votes on a real store, read bounded blocks, and `--memory-budget` forces it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.cli import main
from embedstore.heads.stream import LazyRows
from embedstore.select import stream as stream_mod
from embedstore.select.folds import plan_folds
from embedstore.select.knn import KnnClassifier, KnnConfig, fold_scores
from embedstore.select.proxy import SelectConfig, read_proxy, select_backbones
from embedstore.select.stream import block_rows, knn_ram_bytes, streamed_fold_scores, streamed_votes
from embedstore.store import open_store

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROXY = DATA / "kather2016_mini" / "labels.csv"        # 100 real tiles, 8 classes
ONNX = "mobilenetv2-onnx-int8"

pytestmark = pytest.mark.skipif(not PROXY.exists(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def kather(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Kather proxy embedded by the ONNX model through `select` (in RAM), its store, rows."""
    out = tmp_path_factory.mktemp("select_stream")
    cfg = SelectConfig(proxy=PROXY, backbones=(ONNX,), out=out / "ram", k=10, num_workers=0,
                       progress=False)
    res = select_backbones(cfg)
    store = open_store(res.candidates[0].store)
    proxy = read_proxy(PROXY)
    ids = store.ids(proxy.keys.tolist())
    fold = plan_folds(proxy.y, proxy.groups, 5, 10, 0, proxy.classes, proxy.group_by)
    return {"cfg": cfg, "res": res, "store": store, "ids": ids, "y": proxy.y, "fold": fold,
            "n_classes": len(proxy.classes)}


class CountingRows(LazyRows):
    """LazyRows over the store that records how many rows each read takes."""
    reads: list[int]

    def read(self, pos: np.ndarray) -> np.ndarray:
        self.reads.append(int(np.asarray(pos).size))
        return super().read(pos)


def _lazy(k: dict[str, Any]) -> CountingRows:
    s = k["store"]
    rows = CountingRows(k["ids"], lambda i: np.asarray(s.gather(i)), s.dim, s.dtype)
    rows.reads = []
    return rows


@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("path", ["index", "blocked"])
def test_streamed_votes_equal_the_in_ram_classifier_on_a_real_store(kather: dict[str, Any], centre: bool,
                                                                    path: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    emb = np.asarray(kather["store"].gather(kather["ids"]), dtype=np.float32)
    y, fold, c = kather["y"], kather["fold"], kather["n_classes"]
    dim = emb.shape[1]
    # index: the training rows (80 x 1280 float32, 410 KB) fit half the budget; blocked: they do not
    budget = 1 << 20 if path == "index" else 64 << 10
    blocked: list[int] = []
    real = stream_mod._search_blocked
    monkeypatch.setattr(stream_mod, "_search_blocked", lambda *a: blocked.append(1) or real(*a))
    cfg = KnnConfig(10, 0.07, centre)
    rows = _lazy(kather)
    for f in range(5):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        ref = KnnClassifier(cfg).fit(emb[train], y[train], c).votes(emb[test])
        got = streamed_votes(rows, y, train, test, cfg, c, budget)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-9 * ref.max())
        assert np.array_equal(got.argmax(axis=1), ref.argmax(axis=1))
    assert bool(blocked) == (path == "blocked")
    assert max(rows.reads) <= block_rows(budget, dim, 2) < len(y)      # bounded reads, never all rows
    ram, _ = fold_scores(emb, y, fold, cfg, n_classes=c)
    streamed, _ = streamed_fold_scores(rows, y, fold, cfg, n_classes=c, budget=budget)
    np.testing.assert_array_equal(streamed, ram)
    assert ram.mean() > 0.5                                # real structure: 8 classes, chance 0.125


def test_streamed_path_refuses_what_the_in_ram_path_refuses(kather: dict[str, Any]) -> None:
    rows, y = _lazy(kather), kather["y"]
    with pytest.raises(ValueError, match="larger than the 5 training rows"):
        streamed_votes(rows, y, np.arange(5), np.arange(5, 10), KnnConfig(10), 8, 1 << 20)
    with pytest.raises(ValueError, match="unknown metric"):
        streamed_fold_scores(rows, y, kather["fold"], KnnConfig(10), metric="auc")


def test_memory_budget_on_the_cli_forces_the_streamed_path(kather: dict[str, Any], tmp_path: Path) -> None:
    first = kather["res"].candidates[0]
    assert not first.streamed                              # the default budget: in RAM
    s = kather["store"]
    assert knn_ram_bytes(100, s.dim, 2) > 64 << 10         # 64K is far below what RAM would take
    cache = str(Path(kather["cfg"].out) / "stores")
    base = ["select", "--proxy", str(PROXY), "--backbone", ONNX, "--k", "10", "--cache", cache,
            "--workers", "0", "--quiet"]
    r = CliRunner().invoke(main, base + ["--memory-budget", "64K", "--out", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)["candidates"][0]
    assert d["streamed"] is True and d["tiles_written"] == 0
    assert d["fold_scores"] == first.fold_scores           # same folds, same scores
    assert json.loads((tmp_path / "s" / "selection.json").read_text())["config"]["memory_budget"] == 65536
    r = CliRunner().invoke(main, base + ["--memory-budget", "64K", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0 and "(streamed)" in r.output, r.output
    r = CliRunner().invoke(main, base + ["--memory-budget", "lots", "--out", str(tmp_path / "u")])
    assert r.exit_code == 2 and "--memory-budget 'lots'" in r.output and "Traceback" not in r.output


def test_validate_heads_train_from_the_store_past_the_budget(kather: dict[str, Any], tmp_path: Path) -> None:
    """`--validate` under a tiny budget: the downstream linear heads stream from the task store
    (the Kather tiles again, split train/valid)."""
    import csv
    with open(PROXY, newline="") as fh:
        rows = list(csv.DictReader(fh))
    task = tmp_path / "task.csv"
    with open(task, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows({"path": str(PROXY.parent / r["path"]), "label": r["label"],
                     "split": "valid" if i % 4 == 0 else "train"} for i, r in enumerate(rows))
    cfg = kather["cfg"]
    got = {}
    for budget in (None, "64K"):
        res = select_backbones(SelectConfig(proxy=PROXY, backbones=(ONNX,), out=tmp_path / str(budget), k=10,
                                            cache=cfg.cache_root, validate=task, validate_cache=tmp_path / "task",
                                            head_seeds=2, memory_budget=budget, num_workers=0, progress=False))
        got[budget] = c = res.candidates[0]
        assert c.tiles_written == 0 and c.downstream is not None
    assert not got[None].downstream["streamed"] and got["64K"].downstream["streamed"]   # type: ignore[index]
    assert got["64K"].downstream["tiles_written"] == 0                                  # type: ignore[index]
    assert got["64K"].streamed and got["64K"].fold_scores == got[None].fold_scores
    f1 = [got[b].downstream["f1"][0] for b in (None, "64K")]                            # type: ignore[index]
    assert min(f1) > 0.5 and abs(f1[0] - f1[1]) < 0.15, f1                             # 8 classes: chance 0.125

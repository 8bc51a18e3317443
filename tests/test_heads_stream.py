"""Heads over a store larger than a memory budget: the streamed path (rows read from the store
as training goes, prefetched in a thread) against the in-RAM one."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embedstore.heads import HeadConfig, labelled_set, train_head
from embedstore.heads.augment import parse_augment
from embedstore.heads.jobs import train_head_command
from embedstore.heads.stream import (LazyRows, LazyViews, Prefetcher, in_ram_bytes, locality_order,
                                     resolve_budget, stream_budget)
from embedstore.heads.stream_train import streaming_moments
from embedstore.store import open_store

from synthetic import write_units

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX = "mobilenetv2-onnx-int8"
TINY = "16K"          # forces the streamed path on every store here


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "syn"
    write_units(path, list(range(30)))
    return path


@pytest.fixture(scope="module")
def pcam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped PCam tiles (200, train/valid) embedded by the ONNX model, with 2 views each."""
    from embedstore.extract.runner import ExtractConfig, extract
    path = tmp_path_factory.mktemp("stream") / "pcam"
    extract([SAMPLE / "pcam" / "labels.csv"], ExtractConfig(store=path, views=2, backbone=ONNX, progress=False,
                                                            num_workers=1, num_threads=1))
    return path


class SpyStore:
    """A store that records the size of every read of rows or views."""

    def __init__(self, store: Any) -> None:
        self._store, self.reads = store, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        self.reads.append(len(ids))
        return self._store.gather(ids)

    def views(self) -> Any:
        bank = self._store.views()
        spy = self

        class Views:
            ids, view = bank.ids, bank.view

            def gather(self, j: np.ndarray) -> np.ndarray:
                spy.reads.append(len(j))
                return bank.gather(j)
        return Views()


def test_streamed_and_in_ram_paths_reach_the_same_f1_on_real_tiles(pcam: Path) -> None:
    kw: dict[str, Any] = dict(task="pcam", split="column", seeds=5, epochs=30, augment="views",
                              echo=lambda s: None)
    ram = train_head_command(pcam, memory_budget=None, **kw)
    streamed = train_head_command(pcam, memory_budget=TINY, **kw)
    assert not ram["streamed"] and streamed["streamed"]
    (m1, s1), (m2, s2) = ram["summary"]["f1"], streamed["summary"]["f1"]
    pooled = float(np.sqrt((s1 ** 2 + s2 ** 2) / 2))
    print(f"F1 in-RAM {m1:.4f} ± {s1:.4f}, streamed {m2:.4f} ± {s2:.4f}")
    assert m1 > 0.7 and m2 > 0.7
    assert abs(m1 - m2) < 2 * pooled + 0.02


def test_streamed_path_reads_windows_never_the_labelled_matrix(syn: Path) -> None:
    spy = SpyStore(open_store(syn))
    ls = labelled_set(spy)
    cfg = HeadConfig(epochs=4, augment=parse_augment("views,noise=0.1,mixup=0.2"))
    X, views = LazyRows.of_store(spy, ls.ids, chunk_rows=32), LazyViews.of_store(spy, ls.ids)
    spy.reads.clear()
    head = train_head(X, ls.labels, config=cfg, views=views, memory_budget=TINY)
    info = head.history["streamed"]
    assert len(ls) >= 250 and spy.reads
    assert max(spy.reads) <= max(info["window_rows"], 32) < len(ls)
    assert head.history["n_fit"] + head.history["n_valid"] == len(ls)


def test_streamed_training_is_seeded_and_differs_by_seed(syn: Path) -> None:
    store = open_store(syn)
    ls = labelled_set(store)
    cfg = HeadConfig(epochs=3, augment=parse_augment("views,dropout=0.1"))

    def weights(seed: int) -> list[torch.Tensor]:
        X, v = LazyRows.of_store(store, ls.ids), LazyViews.of_store(store, ls.ids)
        head = train_head(X, ls.labels, config=cfg, views=v, seed=seed, memory_budget=TINY)
        return [t.clone() for t in head.module.state_dict().values()]
    a, b, c = weights(1), weights(1), weights(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_fitting_sets_train_in_ram_exactly_as_before() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)).astype(np.float16)
    y = np.where(X[:, 0] > 0, "a", "b")
    heads = [train_head(X, y, config=HeadConfig(epochs=5), memory_budget=b) for b in (None, "1G")]
    lazy = train_head(LazyRows.of_array(X), y, config=HeadConfig(epochs=5), memory_budget="1G")
    for h in heads[1:] + [lazy]:
        assert "streamed" not in h.history
        assert all(torch.equal(p, q) for p, q in zip(heads[0].module.state_dict().values(),
                                                      h.module.state_dict().values()))
    streamed = train_head(X, y, config=HeadConfig(epochs=5), memory_budget="4K")   # an array streams too
    assert "streamed" in streamed.history


def test_budget_decision_and_default() -> None:
    assert resolve_budget("2G") == 2 << 30 and 0 < resolve_budget(None)
    X = np.zeros((1000, 100), np.float16)
    assert stream_budget(X, None, False, None) is None                  # arrays: in RAM by default
    assert stream_budget(X, None, False, in_ram_bytes(1000, 0, 100, 2)) is None
    assert stream_budget(X, None, False, in_ram_bytes(1000, 0, 100, 2) - 1) is not None


def test_streaming_moments_match_numpy() -> None:
    X = np.random.default_rng(1).normal(3, 2, size=(1001, 5)).astype(np.float32)
    X[:, 4] = 7.0                                                          # a constant feature
    mean, std = streaming_moments(LazyRows.of_array(X, chunk_rows=97))
    np.testing.assert_allclose(mean.numpy(), X.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std.numpy()[:4], X.std(0)[:4], rtol=1e-5)
    assert std[4] == 1.0


def test_locality_order_reads_shuffled_blocks_of_consecutive_ids() -> None:
    ids = np.arange(1000) * 3
    order = locality_order(ids, np.arange(1000), 50, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    blocks = order.reshape(20, 50)
    assert all((np.diff(b) == 1).all() and b[0] % 50 == 0 for b in blocks)
    assert not (np.diff(blocks[:, 0]) > 0).all()                           # blocks shuffled


def test_prefetch_errors_are_raised_in_the_caller_and_the_thread_ends() -> None:
    def items() -> Any:
        yield 1
        yield 2
        raise OSError("disk gone")
    before = threading.active_count()
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for x in Prefetcher(items(), depth=2):
            got.append(x)
    assert got == [1, 2] and threading.active_count() == before
    for x in Prefetcher(iter(range(100)), depth=2):                        # leaving early stops it
        if x == 3:
            break
    assert threading.active_count() == before


def test_a_read_failing_mid_training_is_raised_by_train_head() -> None:
    X = np.random.default_rng(2).normal(size=(400, 4)).astype(np.float32)
    y = np.where(X[:, 0] > 0, "a", "b")
    calls = []

    def read(ids: np.ndarray) -> np.ndarray:
        calls.append(len(ids))
        if len(calls) > 12:
            raise OSError("shard vanished")
        return X[ids]
    rows = LazyRows(np.arange(400), read, 4, np.dtype(np.float32), chunk_rows=64)
    with pytest.raises(OSError, match="shard vanished"):
        train_head(rows, y, config=HeadConfig(epochs=20, patience=0), memory_budget="2K")

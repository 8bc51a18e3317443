"""The store contract (tests/store_contract.py) run over the real store — fresh, compacted (ids
with gaps) and without views — and over the fakes that tests of the index and of heads use."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import test_heads
import test_index
from embedstore.store import Store, StoredViews, StoreLike, compact, delete, open_store
from embedstore.store.protocol import CORE, OPTIONAL
from store_contract import Expected, StoreContract
from synthetic import expected, unit_data, write_units

UNITS = list(range(6))


def real_expected(units: list[int], views: bool = True, drop: frozenset[str] = frozenset()) -> Expected:
    exp = {k: v for k, v in expected(units).items() if k not in drop}
    keys = list(exp)
    cols = {c: np.array([v[j] for v in exp.values()], dtype=object)
            for j, c in enumerate(("emb", "slide", "x", "y", "label")) if c != "emb"}
    out = Expected(keys, np.stack([v[0] for v in exp.values()]), cols)
    if views:
        for u in units:
            d = unit_data(u)
            out.views.update({k: d["views"][i] for i, k in enumerate(d["keys"]) if k not in drop})
    return out


class RealStore(StoreContract):
    def delete(self, store: Any, keys: list[str]) -> None:
        delete(store.path, keys=keys)


class TestStore(RealStore):
    """Several shards (20 rows each) with views beside them."""

    def make(self, tmp_path: Path) -> tuple[Any, Expected]:
        write_units(tmp_path / "st", UNITS, rows_per_shard=20)
        return open_store(tmp_path / "st"), real_expected(UNITS)


class TestCompactedStore(RealStore):
    """Tombstones compacted away: rewritten shards carry ids, which now have gaps."""

    def make(self, tmp_path: Path) -> tuple[Any, Expected]:
        write_units(tmp_path / "st", UNITS, rows_per_shard=20)
        drop = frozenset(list(expected(UNITS))[2::4])
        delete(tmp_path / "st", keys=sorted(drop))
        assert compact(tmp_path / "st")["rewritten"] > 0
        store = open_store(tmp_path / "st")
        assert store.n_rows_committed == len(store) and store.all_ids()[-1] >= len(store)
        return store, real_expected(UNITS, drop=drop)


class TestStoreWithoutViews(RealStore):
    """One shard, no views: ``views()`` is empty."""

    def make(self, tmp_path: Path) -> tuple[Any, Expected]:
        write_units(tmp_path / "st", UNITS, rows_per_shard=10_000, views=False)
        return open_store(tmp_path / "st"), real_expected(UNITS, views=False)


class TestIndexFake(StoreContract):
    """``tests/test_index.py``'s FakeStore: rows and ids only, with deletion."""

    def make(self, tmp_path: Path) -> tuple[Any, Expected]:
        n, dim = 40, 8
        emb = np.random.default_rng(3).normal(size=(n, dim)).astype(np.float32)
        slides = [f"s{i % 4}" for i in range(n)]
        labels = [None if i % 5 == 0 else ("a" if i % 2 else "b") for i in range(n)]
        store = test_index.FakeStore(tmp_path / "fake", emb, slides, labels)
        cols = {"slide": np.array(slides, dtype=object), "x": np.arange(n) * 224,
                "y": np.zeros(n, np.int64), "label": np.array(labels, dtype=object)}
        return store, Expected([f"{s}/{i}" for i, s in enumerate(slides)], emb, cols)

    def delete(self, store: Any, keys: list[str]) -> None:
        store.delete(store.ids(keys))


class TestHeadsFake(StoreContract):
    """``tests/test_heads.py``'s FakeStore: every row live, slides, views and a task."""

    def make(self, tmp_path: Path) -> tuple[Any, Expected]:
        n, dim = 48, 8
        view_ids = np.repeat(np.arange(0, n, 3), 2)
        view_num = np.tile(np.array([1, 2], np.uint8), len(view_ids) // 2)
        view_emb = np.random.default_rng(4).normal(size=(len(view_ids), dim)).astype(np.float16)
        store, _, _ = test_heads.fake_store(n=n, dim=dim, seed=0, views=(view_ids, view_num, view_emb))
        cols = {"slide": store.slide_of, "x": store.xy[:, 0], "y": store.xy[:, 1], "label": store.task}
        views = {store.keys[i]: view_emb[view_ids == i][np.argsort(view_num[view_ids == i])]
                 for i in np.unique(view_ids)}
        return store, Expected(list(store.keys), store.emb, cols, views)


# -- the protocol itself -----------------------------------------------------------------------

def protocol_members() -> list[str]:
    names = set(getattr(StoreLike, "__annotations__", {}))
    names |= {n for n, v in vars(StoreLike).items() if callable(v) or isinstance(v, property)}
    return sorted(n for n in names if not n.startswith("_") or n == "__len__")


def test_the_real_store_has_every_member(tmp_path: Path) -> None:
    """mypy checks ``Store`` against ``StoreLike`` (end of store/reader.py); this checks the
    member list the contract suite relies on."""
    members = protocol_members()
    assert set(CORE) <= set(members) and not set(OPTIONAL) & set(members)
    assert {"slides", "slide", "views", "task_table", "fingerprint", "meta", "units"} <= set(members)
    write_units(tmp_path / "st", [0, 1])
    store = open_store(tmp_path / "st")
    assert isinstance(store, Store)
    assert [m for m in members if not hasattr(store, m)] == []
    assert isinstance(store.views(), StoredViews)

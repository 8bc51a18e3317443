"""One suite of tests for everything that claims to be a ``StoreLike`` (zarr's ``StoreTests`` is
the model): the real store and every fake used in tests run the same tests.

Subclass :class:`StoreContract` in a ``Test*`` class and implement :meth:`StoreContract.make`,
returning the store under test and an :class:`Expected` (what it holds, as plain arrays). A
store that supports deletion also implements :meth:`StoreContract.delete`. Members of
``StoreLike`` outside ``CORE`` are tested when the store has them and skipped when it does not
(a fake made for the index need not have slides or views).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstore.errors import UnknownKeyError
from embedstore.store.protocol import CORE

META = ("slide", "x", "y", "label")


@dataclass
class Expected:
    """What a store under test holds: one entry per live tile, in any order."""
    keys: list[str]
    emb: np.ndarray                        # (n, dim) rows of ``keys``, as the store returns them
    columns: dict[str, np.ndarray]         # slide, x, y, label of ``keys`` (object / int arrays)
    views: dict[str, np.ndarray] = field(default_factory=dict)   # key -> (K, dim) views

    def index(self) -> dict[str, int]:
        return {k: j for j, k in enumerate(self.keys)}


def _has(store: Any, *names: str) -> None:
    missing = [n for n in names if not hasattr(store, n)]
    if missing:
        pytest.skip(f"{type(store).__name__} has no {', '.join(missing)} (optional in StoreLike)")


def _column(values: Any) -> list[Any]:
    return [None if v is None else (int(v) if isinstance(v, (int, np.integer)) else str(v))
            for v in np.asarray(values, dtype=object)]


class StoreContract:
    """The tests; a subclass says how to make the store (and, optionally, delete from it)."""

    def make(self, tmp_path: Path) -> tuple[Any, Expected]:
        raise NotImplementedError

    def delete(self, store: Any, keys: list[str]) -> None:
        pytest.skip(f"{type(self).__name__}: this store does not support deletion")

    @pytest.fixture()
    def made(self, tmp_path: Path) -> tuple[Any, Expected]:
        return self.make(tmp_path)

    # -- shape of the store ---------------------------------------------------------------
    def test_core_members_present(self, made: tuple[Any, Expected]) -> None:
        store, _ = made
        assert [m for m in CORE if not hasattr(store, m)] == []

    def test_len_dim_dtype(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        assert len(store) == len(exp.keys) > 0
        assert store.n_rows_committed >= len(store)
        assert store.dim == exp.emb.shape[1]
        some = store.gather(store.all_ids()[:3])
        assert some.shape == (3, store.dim) and some.dtype == np.dtype(store.dtype)

    def test_all_ids_sorted_unique_int64(self, made: tuple[Any, Expected]) -> None:
        store, _ = made
        ids = store.all_ids()
        assert ids.dtype == np.int64 and len(ids) == len(store)
        assert np.all(np.diff(ids) > 0)

    # -- rows -----------------------------------------------------------------------------
    @pytest.mark.parametrize("batch_size", [1, 7, 65536])
    def test_scan_covers_live_rows_in_id_order(self, made: tuple[Any, Expected], batch_size: int) -> None:
        store, _ = made
        ids, blocks = [], []
        for b_ids, block in store.scan(batch_size=batch_size):
            assert b_ids.dtype == np.int64 and block.shape == (len(b_ids), store.dim)
            assert len(b_ids) <= batch_size
            ids.append(b_ids)
            blocks.append(np.asarray(block))
        np.testing.assert_array_equal(np.concatenate(ids), store.all_ids())
        np.testing.assert_array_equal(np.concatenate(blocks), store.gather(store.all_ids()))

    def test_gather_any_order_equals_scan_rows(self, made: tuple[Any, Expected]) -> None:
        store, _ = made
        ids = np.concatenate([i for i, _ in store.scan()])
        rows = np.concatenate([np.asarray(b) for _, b in store.scan()])
        pick = np.random.default_rng(0).permutation(len(ids))
        pick = np.concatenate([pick, pick[:5]])              # repeats too
        got = store.gather(ids[pick])
        assert got.shape == (len(pick), store.dim)
        np.testing.assert_array_equal(got, rows[pick])
        assert store.gather(ids[:0]).shape == (0, store.dim)

    def test_rows_are_what_was_written(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        np.testing.assert_array_equal(store.gather(store.ids(exp.keys)), exp.emb.astype(store.dtype))

    # -- keys and ids ---------------------------------------------------------------------
    def test_ids_and_keys_of_round_trip(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        ids = store.all_ids()
        keys = list(store.keys_of(ids))
        assert sorted(keys) == sorted(exp.keys)
        np.testing.assert_array_equal(store.ids(keys), ids)
        perm = [exp.keys[j] for j in np.random.default_rng(1).permutation(len(exp.keys))]
        got = store.ids(perm)
        assert got.dtype == np.int64
        assert list(store.keys_of(got)) == perm

    def test_unknown_key_raises(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        with pytest.raises(UnknownKeyError):
            store.ids([exp.keys[0], "no/such/key"])
        with pytest.raises(KeyError):                         # UnknownKeyError is a KeyError
            store.ids(["no/such/key"])

    def test_unknown_id_raises(self, made: tuple[Any, Expected]) -> None:
        store, _ = made
        beyond = np.array([store.all_ids().max() + 1000], dtype=np.int64)
        with pytest.raises(UnknownKeyError):
            store.gather(beyond)
        with pytest.raises(UnknownKeyError):
            store.keys_of(beyond)
        with pytest.raises(UnknownKeyError):
            store.gather(np.array([-1], dtype=np.int64))

    # -- metadata and labels ----------------------------------------------------------------
    def test_metadata_columns_in_the_order_asked(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        perm = np.random.default_rng(2).permutation(len(exp.keys))
        keys = [exp.keys[j] for j in perm]
        ids = store.ids(keys)
        for columns in (("key",), ("y", "slide"), ("key",) + META):
            got = store.metadata(ids, columns)
            assert list(got) == list(columns)
            assert all(len(v) == len(ids) for v in got.values())
        got = store.metadata(ids, ("key",) + META)
        assert _column(got["key"]) == keys == list(store.keys_of(ids))
        for c in META:
            assert _column(got[c]) == _column(exp.columns[c][perm]), c

    def test_arrow_metadata_is_the_same_columns_with_nulls(self, made: tuple[Any, Expected]) -> None:
        """Optional metadata_arrow: the same values as metadata, integers' -1 as Arrow nulls,
        for ids in any order and for a consecutive run (a scan batch, sliced not taken)."""
        store, exp = made
        if getattr(store, "metadata_arrow", None) is None:
            pytest.skip("this store has no metadata_arrow")
        all_ids = np.sort(store.ids(exp.keys))
        perm = np.random.default_rng(3).permutation(len(all_ids))
        for ids in (all_ids[perm], all_ids[1:-1]):
            want = store.metadata(ids, ("key",) + META)
            got = store.metadata_arrow(ids, ("key",) + META)
            assert list(got) == ["key", *META]
            for c, arr in got.items():
                vals = arr.to_pylist()
                if c in ("x", "y"):
                    vals = [-1 if v is None else v for v in vals]
                assert _column(vals) == _column(want[c]), c

    def test_labels_recorded_at_extraction(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        got = store.labels(exp.keys)
        assert len(got) == len(exp.keys)
        assert _column(got) == _column(exp.columns["label"])
        assert _column(got) == _column(store.metadata(store.ids(exp.keys), ("label",))["label"])

    # -- deletion (when supported) -----------------------------------------------------------
    def _delete_some(self, store: Any, exp: Expected) -> tuple[list[str], np.ndarray]:
        gone = exp.keys[1:4] + exp.keys[-2:]
        ids = store.ids(gone)
        before = store.n_rows_committed
        self.delete(store, gone)
        assert store.n_rows_committed == before      # tombstones keep their rows (and ids)
        return gone, ids

    def test_deletions_are_honoured_everywhere(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        n = len(store)
        gone, ids = self._delete_some(store, exp)
        assert len(store) == n - len(gone)
        live = store.all_ids()
        assert not np.isin(ids, live).any() and len(live) == len(store)
        scanned = np.concatenate([i for i, _ in store.scan(batch_size=5)])
        np.testing.assert_array_equal(scanned, live)
        for one in ids:
            with pytest.raises(UnknownKeyError):
                store.gather(np.array([one]))
            with pytest.raises(UnknownKeyError):
                store.metadata(np.array([one]), ("key",))
        if hasattr(store, "is_deleted"):
            assert store.is_deleted(ids).all() and not store.is_deleted(live).any()
        if hasattr(store, "views"):
            assert not np.isin(store.views().ids, ids).any()

    def test_a_deleted_key_is_unknown(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        gone, _ = self._delete_some(store, exp)
        with pytest.raises(UnknownKeyError):
            store.ids(gone[:1])

    # -- optional members: slides, views, tasks, the embedding space ------------------------
    def test_slides_and_their_bags(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        _has(store, "slides", "slide")
        names = list(store.slides())
        assert names == sorted(names) == sorted({s for s in _column(exp.columns["slide"]) if s is not None})
        at = exp.index()
        covered = []
        for name in names:
            bag = store.slide(name)
            ids = np.asarray(bag.ids)
            assert np.all(np.diff(ids) > 0)
            if getattr(store, "slide_ids", None) is not None:    # optional: the ids alone
                np.testing.assert_array_equal(store.slide_ids(name), ids)
            np.testing.assert_array_equal(np.asarray(bag.emb), store.gather(ids))
            assert list(bag.keys) == list(store.keys_of(ids))
            meta = store.metadata(ids, ("slide", "x", "y"))
            assert set(_column(meta["slide"])) == {name}
            np.testing.assert_array_equal(np.asarray(bag.coords), np.stack([meta["x"], meta["y"]], 1))
            assert np.asarray(bag.coords).shape == (len(ids), 2)
            covered += [at[k] for k in bag.keys]
        with_slide = [j for j, s in enumerate(_column(exp.columns["slide"])) if s is not None]
        assert sorted(covered) == with_slide

    def test_unknown_slide_raises(self, made: tuple[Any, Expected]) -> None:
        store, _ = made
        _has(store, "slide")
        with pytest.raises(UnknownKeyError):
            store.slide("no-such-slide")

    def test_views(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        _has(store, "views")
        bank = store.views()
        ids, num = np.asarray(bank.ids), np.asarray(bank.view)
        assert len(ids) == len(num) == sum(len(v) for v in exp.views.values())
        emb = np.asarray(bank.gather(np.arange(len(ids))))
        assert emb.shape == (len(ids), store.dim)
        if not len(ids):
            return
        assert np.isin(ids, store.all_ids()).all()
        keys = store.keys_of(ids)
        for j, (k, v) in enumerate(zip(keys, num.tolist())):
            np.testing.assert_array_equal(emb[j], exp.views[k][v - 1].astype(emb.dtype))
        pick = np.array([len(ids) - 1, 0])
        np.testing.assert_array_equal(np.asarray(bank.gather(pick)), emb[pick])

    def test_task_table_of_labels_recorded_at_extraction(self, made: tuple[Any, Expected]) -> None:
        store, exp = made
        _has(store, "task_table")
        t = store.task_table(None)
        ids = np.asarray(t["ids"])
        assert np.all(np.diff(ids) > 0)
        assert list(t["keys"]) == list(store.keys_of(ids))
        assert _column(t["label"]) == _column(store.labels(list(t["keys"])))
        labelled = {k for k, lab in zip(exp.keys, _column(exp.columns["label"])) if lab is not None}
        assert set(t["keys"]) == labelled

    def test_fingerprint_and_meta(self, made: tuple[Any, Expected]) -> None:
        store, _ = made
        _has(store, "fingerprint")
        fp = store.fingerprint()
        assert isinstance(fp, dict) and fp == store.fingerprint()
        json.dumps(fp)                                        # it is written into head files
        if hasattr(store, "meta"):
            assert store.meta.dim == store.dim
            assert isinstance(store.meta.tile, dict)

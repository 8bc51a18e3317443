"""View shards live in STORE/views/, so a plain Arrow reader of STORE/shards sees one row per tile;
stores of the old layout (view shards in shards/) still read, write, compact and rebuild the
same, and `embedstore upgrade` moves them, safe to interrupt."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from clirun import run
from embedstore.errors import StoreLockedError, StoreNotFoundError
from embedstore.store import StoreWriter, compact, delete, open_store, upgrade, verify_store
from embedstore.store.rebuild import rebuild_catalog
from synthetic import meta, unit_data, write_units

UNITS = list(range(6))


def _views_snapshot(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vb = open_store(path).views()
    order = np.lexsort((vb.view, vb.ids))
    return vb.ids[order], vb.view[order], vb.gather(order)


def _to_old_layout(path: Path) -> list[str]:
    """Put every view shard where stores made before views/ kept them."""
    moved = []
    for f in sorted((path / "views").glob("*.arrow")):
        f.rename(path / "shards" / f.name)
        moved.append(f.name)
    (path / "views").rmdir()
    return moved


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    p = tmp_path / "st"
    write_units(p, UNITS)
    return p


def test_view_shards_have_their_own_directory(store: Path) -> None:
    s = open_store(store)
    assert list((store / "views").glob("*.v.arrow"))
    assert not list((store / "shards").glob("*.v.arrow"))
    # the failure: pyarrow.dataset over shards/ counted every view as a row
    assert ds.dataset(store / "shards", format="ipc").count_rows() == len(s) == sum(len(unit_data(u)["keys"]) for u in UNITS)
    assert ds.dataset(store / "views", format="ipc").count_rows() == 2 * len(s)
    rep = verify_store(store)
    assert rep.ok and not rep.notes, rep


def test_old_layout_reads_the_same_and_upgrade_moves_it(store: Path) -> None:
    before = _views_snapshot(store)
    emb_before = open_store(store).get(open_store(store).keys())
    moved = _to_old_layout(store)
    assert moved
    got = _views_snapshot(store)
    for a, b in zip(before, got):
        np.testing.assert_array_equal(a, b)
    rep = verify_store(store)
    assert rep.ok and any("embedstore upgrade" in n for n in rep.notes), rep.notes

    code, stdout, stderr = run("upgrade", store, "--json")
    assert code == 0, stderr
    out = json.loads(stdout)
    assert out["moved"] == len(moved) and out["bytes"] > 0
    assert sorted(f.name for f in (store / "views").iterdir()) == moved
    assert not list((store / "shards").glob("*.v.arrow"))
    for a, b in zip(before, _views_snapshot(store)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(open_store(store).get(open_store(store).keys()), emb_before)
    rep = verify_store(store)
    assert rep.ok and not rep.notes
    code, stdout, _ = run("upgrade", store)
    assert code == 0 and "already has the current layout" in stdout


def test_an_interrupted_upgrade_reads_the_same_and_finishes_when_rerun(store: Path) -> None:
    before = _views_snapshot(store)
    moved = _to_old_layout(store)
    assert len(moved) >= 2
    (store / "views").mkdir()
    (store / "shards" / moved[0]).rename(store / "views" / moved[0])   # killed after one rename
    for a, b in zip(before, _views_snapshot(store)):
        np.testing.assert_array_equal(a, b)
    assert verify_store(store).ok
    assert upgrade(store)["moved"] == len(moved) - 1
    for a, b in zip(before, _views_snapshot(store)):
        np.testing.assert_array_equal(a, b)


def test_old_layout_store_takes_new_writes_compacts_and_rebuilds(store: Path) -> None:
    _to_old_layout(store)
    write_units(store, UNITS + [6, 7])              # appends: new view shards go to views/
    s = open_store(store)
    assert list((store / "views").glob("*.v.arrow")) and list((store / "shards").glob("*.v.arrow"))
    assert len(s.views().ids) == 2 * len(s)
    d = unit_data(1)
    assert delete(store, keys=d["keys"][:2]) == 2
    compact(store)
    s = open_store(store)
    assert len(s.views().ids) == 2 * len(s)
    assert verify_store(store).ok
    before = _views_snapshot(store)
    rebuild_catalog(store)
    for a, b in zip(before, _views_snapshot(store)):
        np.testing.assert_array_equal(a, b)
    assert verify_store(store).ok


def test_upgrade_refuses_a_missing_store_and_a_running_writer(store: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="not a store"):
        upgrade(tmp_path / "nothing")
    code, _, stderr = run("upgrade", tmp_path / "nothing")
    assert code == 2 and "not a store" in stderr and len(stderr.strip().splitlines()) == 1
    with StoreWriter(store, meta()):
        with pytest.raises(StoreLockedError, match="upgrade when no extraction"):
            upgrade(store)


def test_views_are_read_on_first_use_and_survive_a_compaction_meanwhile(store: Path) -> None:
    """Opening reads no view rows (info counts them from the catalog), and a reader that
    opened before a compaction unlinked the old view shards still reads its own snapshot's
    views afterwards: the files were mapped at open."""
    expected = _views_snapshot(store)
    s = open_store(store)
    assert s.snapshot._views is None                 # len, info and search never read a view
    assert s.info()["views"] == 2 * len(s) and s.snapshot._views is None
    d = unit_data(2)
    assert delete(store, keys=d["keys"][:3]) == 3
    old = sorted(p.name for p in (store / "views").glob("*.arrow"))
    assert compact(store)["rewritten"] > 0
    assert set(old) - {p.name for p in (store / "views").glob("*.arrow")}, "compaction unlinked none"
    vb = s.views()                                   # the first read, after the unlink
    order = np.lexsort((vb.view, vb.ids))
    got = (vb.ids[order], vb.view[order], vb.gather(order))
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert len(open_store(store).views().ids) == len(expected[0]) - 2 * 3

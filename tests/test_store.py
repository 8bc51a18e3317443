"""The store: round trips, reading API, deletion, compaction, verify, labels, h5, bad input."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedstore.errors import (BackboneMismatchError, ConfigError, CorruptShardError, DimensionMismatchError,
                               DuplicateKeyError, LabelsError, NotAStoreError, RowRangeError, ShapeError,
                               StoreLockedError, StoreNotFoundError, UnknownKeyError)
from embedstore.store import (StoreMeta, StoreWriter, compact, delete, import_labels, open_store,
                              verify_store)
from embedstore.store.h5io import export_h5, import_h5

from synthetic import DIM, expected, meta, unit_data, write_units

UNITS = list(range(12))


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    p = tmp_path / "st"
    write_units(p, UNITS)
    return p


def check_against(store_path: Path, units: list[int]) -> None:
    """Every key of ``units`` present exactly once with its embedding and metadata."""
    s = open_store(store_path)
    exp = expected(units)
    keys = s.keys()
    assert len(keys) == len(set(keys)) == len(exp) == len(s)
    assert set(keys) == set(exp)
    emb = s.get(keys)
    meta_ = s.metadata(s.ids(keys), ("slide", "x", "y", "label"))
    for j, k in enumerate(keys):
        e, slide, x, y, label = exp[k]
        assert np.array_equal(emb[j], e), k
        assert (meta_["slide"][j], meta_["x"][j], meta_["y"][j], meta_["label"][j]) == (slide, x, y, label)


def test_round_trip_bit_exact(store: Path) -> None:
    check_against(store, UNITS)
    s = open_store(store)
    assert s.dim == DIM and s.meta.dtype == "float16"
    assert verify_store(store).ok


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_dtypes_and_shards_readable_by_plain_arrow(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 8)).astype(dtype)
    with StoreWriter(tmp_path / "s", StoreMeta(dim=8, dtype=dtype), rows_per_shard=64) as w:
        for u in range(6):
            w.add(emb[u * 50:(u + 1) * 50], [f"k{i}" for i in range(u * 50, (u + 1) * 50)], unit=f"u{u}")
            w.end_unit(f"u{u}")
    s = open_store(tmp_path / "s")
    assert np.array_equal(s.to_numpy(), emb)                # all rows, in id order
    assert s.embeddings[10:20].base is not None             # a view, not a copy
    np.testing.assert_array_equal(s.embeddings[[299, 0, 150]], emb[[299, 0, 150]])
    np.testing.assert_array_equal(s.gather(np.array([5, 260, 5])), emb[[5, 260, 5]])
    got = np.concatenate([b for _, b in s.scan(batch_size=7)])
    np.testing.assert_array_equal(got, emb)
    # a shard is an ordinary Arrow file: any Arrow reader sees the columns
    t = pa.ipc.open_file(s.shard_files()[0]).read_all()
    assert t.num_rows > 0 and t.column("key")[0].as_py() == "k0"


def test_reading_api(store: Path) -> None:
    s = open_store(store)
    d3 = unit_data(3)
    ids = s.ids(d3["keys"])
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(s.get(d3["keys"]), d3["emb"].astype(np.float16))
    assert s.keys_of(ids) == d3["keys"]
    assert list(s.labels(d3["keys"])) == d3["label"]
    with pytest.raises(UnknownKeyError, match="nope"):
        s.ids(["nope"])
    # per-slide bags, read contiguously
    assert s.slides() == sorted(unit_data(u)["slide"] for u in UNITS)
    bag = s.slide(d3["slide"])
    np.testing.assert_array_equal(bag.emb, d3["emb"].astype(np.float16))
    np.testing.assert_array_equal(bag.coords, np.stack([d3["x"], d3["y"]], 1))
    assert bag.keys == d3["keys"]
    # views: (tile id, view number), aligned with the base tiles
    vb = s.views()
    assert len(vb.ids) == 2 * len(s)
    j = np.flatnonzero(vb.ids == ids[1])
    assert sorted(vb.view[j]) == [1, 2]
    np.testing.assert_array_equal(vb.gather(j[np.argsort(vb.view[j])]),
                                  d3["views"][1].astype(np.float16))
    info = s.info()
    assert info["rows"] == len(s) and info["units_done"] == len(UNITS) and info["slides"] == len(UNITS)


def test_snapshot_and_refresh(store: Path) -> None:
    s = open_store(store)
    n = len(s)
    write_units(store, [50, 51])
    assert len(s) == n                       # the snapshot taken at open
    s.refresh()
    assert len(s) == n + len(expected([50, 51]))


def test_delete_is_honoured_at_once_and_compact_keeps_ids(store: Path) -> None:
    s = open_store(store)
    d2, d5 = unit_data(2), unit_data(5)
    keep_key = d5["keys"][-1]
    keep_id = s.ids([keep_key])[0]
    n = len(s)
    ndel = delete(store, keys=d5["keys"][:-1], slides=[d2["slide"]], reason="withdrawn consent")
    assert ndel == len(d5["keys"]) - 1 + len(d2["keys"])
    # the reader opened before the deletion hides the rows at once
    assert len(s) == n - ndel
    assert d2["slide"] not in s.slides()
    assert not set(d5["keys"][:-1]) & set(s.keys())
    scanned = np.concatenate([i for i, _ in s.scan(batch_size=5)])
    assert len(scanned) == len(s)
    with pytest.raises(UnknownKeyError):
        s.get([d5["keys"][0]])
    before = {k: v for k, v in zip(s.keys(), s.get(s.keys()))}
    r = compact(store)
    assert r["removed_rows"] == ndel
    s2 = open_store(store)
    assert s2.ids([keep_key])[0] == keep_id  # ids survive compaction
    after = dict(zip(s2.keys(), s2.get(s2.keys())))
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert len(s2.views().ids) == 2 * len(s2)
    assert verify_store(store).ok
    # the old snapshot still reads (its files are mapped) and still hides the deleted rows
    assert len(s) == len(s2)


def test_compact_refuses_while_a_writer_is_open(store: Path) -> None:
    delete(store, keys=[unit_data(0)["keys"][0]])
    with StoreWriter(store):
        with pytest.raises(StoreLockedError):
            compact(store)


def test_labels_tasks(store: Path, tmp_path: Path) -> None:
    keys = open_store(store).keys()
    f = tmp_path / "labels.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "group"])
        for i, k in enumerate(keys):
            w.writerow([k, "pos" if i % 4 == 0 else "neg", "train" if i % 2 else "valid", f"p{i % 5}"])
    rec = import_labels(store, f, "meta")
    assert rec["n"] == len(keys) and rec["classes"]["pos"] == (len(keys) + 3) // 4
    s = open_store(store)
    assert list(s.labels(keys[:4], task="meta")) == ["pos", "neg", "neg", "neg"]
    tab = s.task_table("meta")
    assert tab["keys"] == keys and list(tab["split"][:2]) == ["valid", "train"]
    np.testing.assert_array_equal(tab["ids"], s.ids(keys))
    with pytest.raises(UnknownKeyError, match="meat"):
        s.labels(keys[:1], task="meat")


def test_labels_bad_csv_writes_nothing(store: Path, tmp_path: Path) -> None:
    bad_cols = tmp_path / "a.csv"
    bad_cols.write_text("file,class\nx,1\n")
    with pytest.raises(LabelsError, match="needs columns key"):
        import_labels(store, bad_cols, "t")
    unknown = tmp_path / "b.csv"
    k0 = open_store(store).keys()[0]
    unknown.write_text(f"key,label\n{k0},a\nnot/a/key.png,b\n")
    with pytest.raises(LabelsError, match="1 of 2 keys are not in"):
        import_labels(store, unknown, "t")
    assert open_store(store).tasks() == {}


def test_bad_input_clear_errors(store: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        open_store(tmp_path / "missing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("hi")
    with pytest.raises(NotAStoreError, match="no STORE.json"):
        open_store(tmp_path / "foreign")
    with StoreWriter(store) as w:
        with pytest.raises(DimensionMismatchError, match=f"{DIM}"):
            w.add(np.zeros((2, DIM + 1)), ["a", "b"])
        with pytest.raises(DuplicateKeyError, match="already in"):
            w.add(np.zeros((1, DIM)), [unit_data(0)["keys"][0]])
        with pytest.raises(DuplicateKeyError, match="within one"):
            w.add(np.zeros((2, DIM)), ["dup", "dup"])
    other = StoreMeta(dim=DIM, dtype="float16", backbone={"name": "uni"}, transform={"size": 224},
                      tile={"tile_size": 224, "mpp": 0.5}, weights_sha256="0" * 64)
    with pytest.raises(BackboneMismatchError, match="backbone"):
        StoreWriter(store, other)
    from dataclasses import replace
    with pytest.raises(DimensionMismatchError, match=f"{DIM}-d"):
        StoreWriter(store, replace(meta(), dim=DIM * 2))
    # the store is intact after all of that
    check_against(store, UNITS)


def test_misuse_raises_classes_of_the_hierarchy(store: Path, tmp_path: Path) -> None:
    """The store raises only errors.py classes, which still subclass the fitting builtin; a
    rejected add() leaves nothing behind."""
    with StoreWriter(store) as w:
        with pytest.raises(ConfigError, match="unknown metadata columns"):
            w.add(np.zeros((1, DIM)), ["new/0"], colour="red")
        with pytest.raises(ShapeError, match="3 values for 2 rows"):
            w.add(np.zeros((2, DIM)), ["new/1", "new/2"], x=[1, 2, 3])
        with pytest.raises(ValueError):                       # ShapeError is a ValueError
            w.add(np.zeros((2, DIM)), ["new/1", "new/2"], unit="u", slide=["a"])
    with pytest.raises(ConfigError, match="on_duplicate"):
        StoreWriter(store, on_duplicate="overwrite")
    with pytest.raises(ConfigError, match="dtype"):
        StoreMeta(dim=4, dtype="int8")
    s = open_store(store)
    with pytest.raises(RowRangeError):
        s.embeddings.take(np.array([len(s.embeddings)]))
    with pytest.raises(IndexError):                           # RowRangeError is an IndexError
        s.embeddings.take(np.array([-1]))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotAStoreError, match="is a file"):
        verify_store(tmp_path / "a-file")
    check_against(store, UNITS)                               # nothing of the rejected rows


def test_truncated_and_corrupted_shards_are_named(store: Path) -> None:
    s = open_store(store)
    f1, f2 = [f for f in s.shard_files() if not f.name.endswith(".v.arrow")][:2]
    good = f1.read_bytes()
    for where in (os.path.getsize(f1) // 2, os.path.getsize(f1) - 20):  # data, then the footer
        with open(f1, "r+b") as fh:  # flip bytes: same size, wrong checksum
            fh.seek(where)
            fh.write(b"\xff\xfe\xfd\xfc")
        rep = verify_store(store)
        assert not rep.ok and f1.name in rep.text()
    with pytest.raises(CorruptShardError, match=f1.name):     # a broken footer: not readable
        open_store(store)
    f1.write_bytes(good)
    os.truncate(f2, os.path.getsize(f2) - 100)
    with pytest.raises(CorruptShardError, match=f2.name):
        open_store(store)
    r = subprocess.run([sys.executable, "-m", "embedstore", "verify", str(store)], capture_output=True, text=True)
    assert r.returncode == 2 and f2.name in r.stdout + r.stderr


def test_lmdb_map_grows_instead_of_failing(tmp_path: Path) -> None:
    from embedstore.store import catalog
    old = catalog.INITIAL_MAP
    catalog.INITIAL_MAP = 64 << 10  # 64 KB: fills after a few hundred keys
    try:
        n = 5000
        with StoreWriter(tmp_path / "s", StoreMeta(dim=4)) as w:
            w.add(np.ones((n, 4)), [f"a-rather-long-tile-key-to-fill-the-map/{i:06d}" for i in range(n)], unit="u")
            w.end_unit("u")
        s = open_store(tmp_path / "s")
        assert len(s) == n and s.cat.env.info()["map_size"] > 64 << 10
    finally:
        catalog.INITIAL_MAP = old


def test_catalog_reopened_after_fork(store: Path) -> None:
    s = open_store(store)
    n = len(s)
    pid = os.fork()
    if pid == 0:  # child: a fresh environment, not the inherited one
        try:
            ok = s.cat.pid == os.getpid() and len(s.refresh()) == n and len(open_store(store)) == n
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_h5_round_trip(store: Path, tmp_path: Path) -> None:
    s = open_store(store)
    out = tmp_path / "h5"
    r = export_h5(s, out, progress=False)
    assert r["files"] == len(UNITS)
    import h5py
    d4 = unit_data(4)
    with h5py.File(out / "slide004.h5") as f:
        assert f["features"].shape == (len(d4["keys"]), DIM)
        np.testing.assert_array_equal(f["coords"][()], np.stack([d4["x"], d4["y"]], 1))
        assert f.attrs["encoder"] == "synthetic"
    st2 = tmp_path / "imported"
    r2 = import_h5(out, st2, progress=False)
    assert r2["rows"] == len(s)
    s2 = open_store(st2)
    assert s2.meta.backbone["name"] == "synthetic"
    for name in s.slides():
        a, b = s.slide(name), s2.slide(name)
        np.testing.assert_array_equal(a.emb, b.emb)
        np.testing.assert_array_equal(a.coords, b.coords)
    assert import_h5(out, st2, progress=False)["skipped"] == len(UNITS)  # resumable
    assert len(open_store(st2)) == len(s)


def test_h5_without_encoder_needs_backbone_name(tmp_path: Path) -> None:
    import h5py
    from embedstore.errors import SourceError
    d = tmp_path / "feats"
    d.mkdir()
    with h5py.File(d / "a.h5", "w") as f:
        f["features"] = np.ones((3, 4), np.float32)
        f["coords"] = np.array([[0, 0], [256, 0], [512, 0]])
    with pytest.raises(SourceError, match="--backbone-name"):
        import_h5(d, tmp_path / "s", progress=False)
    import_h5(d, tmp_path / "s", backbone_name="uni", progress=False)
    assert open_store(tmp_path / "s").slide("a").coords[2, 0] == 512


def test_cli_info_and_help(store: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "embedstore", "info", str(store)], capture_output=True, text=True)
    assert r.returncode == 0 and "rows" in r.stdout and "synthetic" in r.stdout
    r = subprocess.run([sys.executable, "-m", "embedstore", "info", str(store / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_store_deleted_and_made_again_at_the_same_path(tmp_path: Path) -> None:
    import shutil
    p = tmp_path / "again"
    for n in (3, 5):  # the process-wide catalog must not outlive the deleted directory
        shutil.rmtree(p, ignore_errors=True)
        with StoreWriter(p, StoreMeta(dim=4)) as w:
            w.add(np.ones((n, 4)), [f"k{i}" for i in range(n)], unit="u")
            w.end_unit("u")
        assert len(open_store(p)) == n and verify_store(p).ok

"""Shard checksums (issue 14, writes at disk speed): new shards record a fast checksum kind
(xxh3_128) beside its digest; stores whose records hold only ``sha256`` still verify; a flipped
byte is caught either way, and rebuilding the catalog keeps verify's verdict. Also the writer's
batched paths against simple references: one ``putmulti`` of a shard's keys, and metadata
columns built from arrays, lists and scalars alike."""
from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedstore.errors import ConfigError
from embedstore.store import StoreWriter, open_store, rebuild_catalog, verify_store
from embedstore.store._checksum import default_kind
from embedstore.store._pending import slide_runs
from embedstore.store.catalog import Catalog, from_u64, open_catalog

from synthetic import DIM, meta, write_units

UNITS = list(range(6))


def records(store: Path) -> dict[str, dict]:
    return open_catalog(store).json_map("shards")


def shard_path(store: Path, name: str) -> Path:
    return next(p for p in (store / "shards" / name, store / "views" / name) if p.exists())


def flip_byte(path: Path, at: int) -> bytes:
    """Flip one byte of ``path`` in place (same size); returns the original contents."""
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([data[at] ^ 0x01]))
    return data


def corrupt_and_check(store: Path, kind: str) -> None:
    """A flipped byte in the middle of each shard (base and view) fails verify, naming the
    shard and the checksum kind; put back, verify passes again."""
    for name in sorted(records(store))[:2] + [n for n in sorted(records(store)) if n.endswith(".v.arrow")][:1]:
        f = shard_path(store, name)
        good = flip_byte(f, os.path.getsize(f) // 2)
        rep = verify_store(store)
        assert not rep.ok and any(name in p and f"{kind} checksum differs" in p for p in rep.problems), rep.text()
        f.write_bytes(good)
    assert verify_store(store).ok


def test_new_shards_record_the_fast_checksum(tmp_path: Path) -> None:
    xxhash = pytest.importorskip("xxhash")
    store = tmp_path / "st"
    write_units(store, UNITS)
    recs = records(store)
    assert any(n.endswith(".v.arrow") for n in recs) and len(recs) > 2
    for name, rec in recs.items():   # the digest of the bytes written is that of the file
        assert rec["hash"] == "xxh3_128" and "sha256" not in rec
        assert rec["digest"] == xxhash.xxh3_128(shard_path(store, name).read_bytes()).hexdigest()
    assert verify_store(store).ok
    corrupt_and_check(store, "xxh3_128")


def test_sha256_records_still_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "st"
    monkeypatch.setenv("EMBEDSTORE_SHARD_HASH", "sha256")
    write_units(store, UNITS[:3])
    recs = records(store)
    for name, rec in recs.items():
        assert rec["hash"] == "sha256"
        assert rec["digest"] == hashlib.sha256(shard_path(store, name).read_bytes()).hexdigest()
    # a store from before the kind was recorded: {"sha256": digest} only
    cat = open_catalog(store)

    def to_old(t: object) -> None:
        for name, rec in recs.items():
            old = {k: v for k, v in rec.items() if k not in ("hash", "digest")}
            cat.put_json(t, "shards", name, dict(old, sha256=rec["digest"]))
    cat.write(to_old)
    assert all(set(r) >= {"sha256"} and "hash" not in r for r in records(store).values())
    assert verify_store(store).ok
    corrupt_and_check(store, "sha256")
    # new shards appended to the old store get the default kind; both kinds verify side by side
    monkeypatch.delenv("EMBEDSTORE_SHARD_HASH")
    write_units(store, UNITS)
    kinds = {r.get("hash", "old") for r in records(store).values()}
    assert kinds == {"old", default_kind()} and verify_store(store).ok


def test_rebuild_keeps_the_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("xxhash")
    store = tmp_path / "st"
    monkeypatch.setenv("EMBEDSTORE_SHARD_HASH", "sha256")
    write_units(store, UNITS[:3])
    monkeypatch.delenv("EMBEDSTORE_SHARD_HASH")
    write_units(store, UNITS)                         # sha256 and xxh3_128 shards in one store
    before = records(store)
    assert {r["hash"] for r in before.values()} == {"sha256", "xxh3_128"}
    keys = open_store(store).keys()
    rebuild_catalog(store)
    after = records(store)
    assert set(after) == set(before) and all(r["hash"] == "xxh3_128" for r in after.values())
    for name, rec in after.items():   # same files, same digests where the kind is the same
        if before[name]["hash"] == "xxh3_128":
            assert rec["digest"] == before[name]["digest"] and rec["size"] == before[name]["size"]
    assert verify_store(store).ok and sorted(open_store(store).keys()) == sorted(keys)
    corrupt_and_check(store, "xxh3_128")


def test_without_the_fast_hash_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """xxhash missing: new shards fall back to sha256 (and say so); a shard recorded as
    xxh3_128 is reported as not checkable, with the fix."""
    pytest.importorskip("xxhash")
    store = tmp_path / "st"
    write_units(store, UNITS[:2])
    monkeypatch.setitem(sys.modules, "xxhash", None)   # import xxhash now raises ImportError
    assert default_kind() == "sha256"
    rep = verify_store(store)
    assert not rep.ok and all("pip install xxhash" in p for p in rep.problems), rep.text()
    other = tmp_path / "other"
    write_units(other, UNITS[:2])
    assert {r["hash"] for r in records(other).values()} == {"sha256"} and verify_store(other).ok
    monkeypatch.setenv("EMBEDSTORE_SHARD_HASH", "md5")
    with pytest.raises(ConfigError, match="EMBEDSTORE_SHARD_HASH"):
        default_kind()


def test_put_new_ids_matches_one_put_per_key(tmp_path: Path) -> None:
    """One putmulti per shard gives the same keys -> ids and the same duplicate rows as the
    per-key reference (a key already present, or twice in one shard, keeps its first id)."""
    rng = random.Random(3)
    universe = [f"slide_{s:04d}/{x}_{y}".encode() for s in range(3) for x in range(0, 2240, 224) for y in (0, 224)]
    cats = [Catalog(tmp_path, create=True, dirname=d) for d in ("fast", "ref")]
    first, dups_seen = 0, 0
    for _ in range(6):
        keys = [rng.choice(universe) for _ in range(25)]
        got = cats[0].write(lambda t: cats[0].put_new_ids(t, keys, first))

        def ref(t: object) -> list[int]:
            out = []
            for i, k in enumerate(keys):
                if not t.put(k, (first + i).to_bytes(8, "big"), db=cats[1].db["keys"], overwrite=False):
                    out.append(i)
            return out
        assert got == cats[1].write(ref)
        dups_seen += len(got)
        first += len(keys)
    assert dups_seen > 10
    maps = [c.read(lambda t, c=c: {bytes(k): from_u64(v) for k, v in t.cursor(db=c.db["keys"])}) for c in cats]
    assert maps[0] == maps[1]
    for c in cats:
        c.close()


def test_metadata_from_arrays_lists_and_scalars(tmp_path: Path) -> None:
    """The same rows given as numpy arrays, Arrow arrays, lists or one scalar are stored the
    same; slide runs match a per-row reference."""
    n = 12
    x = np.arange(n, dtype=np.int32) * 224
    emb = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    forms = {"np": dict(x=x, y=x[::-1].copy(), slide="s.svs", level=np.int16(1), label=None),
             "pa": dict(x=pa.array(x.astype(np.int64)), y=pa.array(x[::-1].astype(np.int64)),
                        slide=pa.array(["s.svs"] * n), level=[1] * n, label=pa.nulls(n, pa.string())),
             "list": dict(x=x.tolist(), y=x[::-1].tolist(), slide=["s.svs"] * n, level=1, label=[None] * n)}
    got = {}
    for name, cols in forms.items():
        p = tmp_path / name
        with StoreWriter(p, meta()) as w:
            w.add(emb, [f"s.svs/{i}" for i in range(n)], unit="u", mpp=0.5, tile_size=224, **cols)
            w.end_unit("u")
        s = open_store(p)
        got[name] = s.metadata(s.ids([f"s.svs/{i}" for i in range(n)]), ("slide", "x", "y", "level", "label"))
        assert verify_store(p).ok
    for name in ("pa", "list"):
        for c in got["np"]:
            assert list(got[name][c]) == list(got["np"][c]), (name, c)
    assert list(got["np"]["x"]) == x.tolist() and list(got["np"]["level"]) == [1] * n
    rng = random.Random(5)
    for _ in range(20):
        slides = [rng.choice(["a", "b", None]) for _ in range(rng.randint(0, 30))]
        ref: list[list[object]] = []
        for i, s in enumerate(slides):
            if s is not None and ref and ref[-1][0] == s and ref[-1][1] + ref[-1][2] == 7 + i:
                ref[-1][2] += 1
            elif s is not None:
                ref.append([s, 7 + i, 1])
        assert slide_runs(pa.array(slides, pa.string()), 7) == ref

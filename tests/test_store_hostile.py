"""The store against a hostile user (issue 11): an edited STORE.json, a damaged catalog and its
rebuild from the shards, two writers over the same units, slide ids that try to leave
``export-h5 --out``. Every failure is one line and exit status 2 through the CLI."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedstore.errors import CatalogDamagedError, NotAStoreError
from embedstore.store import (StoreWriter, delete, import_labels, open_store, rebuild_catalog,
                              verify_store)

from synthetic import DIM, expected, meta, unit_data, write_units
from clirun import run

HERE = Path(__file__).resolve().parent
UNITS = list(range(8))


def one_line_failure(args: tuple[object, ...], *words: str) -> str:
    code, out, err = run(*args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    p = tmp_path / "st"
    write_units(p, UNITS)
    return p


def contents(store: Path) -> dict[str, tuple[int, bytes]]:
    s = open_store(store)
    keys = s.keys()
    emb = s.get(keys)
    return {k: (int(i), emb[j].tobytes()) for j, (k, i) in enumerate(zip(keys, s.ids(keys)))}


def shard_rows(store: Path) -> int:
    """Rows on disk in every base shard file (duplicates included)."""
    n = 0
    for f in (store / "shards").glob("*.arrow"):
        if not f.name.endswith(".v.arrow"):
            with pa.memory_map(str(f)) as m:
                n += pa.ipc.open_file(m).read_all().num_rows
    return n


def _edit_meta(store: Path, **changes: object) -> None:
    f = store / "STORE.json"
    d = json.loads(f.read_text())
    d.update(changes)
    f.write_text(json.dumps(d))


# -- item 4: STORE.json is checked against the shards' own schema ------------------------------
def test_shards_record_geometry_as_schema_metadata(store: Path) -> None:
    f = next(f for f in (store / "shards").glob("*.arrow"))
    with pa.memory_map(str(f)) as m:
        md = pa.ipc.open_file(m).schema.metadata
    rec = json.loads(md[b"embedstore"])
    assert rec["dim"] == DIM and rec["dtype"] == "float16" and rec["format_version"] == 1
    assert rec["tile"] == {"tile_size": 224, "mpp": 0.5} and rec["backbone"]["name"] == "synthetic"
    assert rec["weights_sha256"] == "0" * 64


@pytest.mark.parametrize("change,field", [({"dim": 8}, "dim"), ({"dim": 32}, "dim"),
                                          ({"dtype": "float32"}, "dtype"), ({"dtype": "float64"}, "dtype"),
                                          ({"tile": {"tile_size": 512, "mpp": 0.5}}, "tile"),
                                          ({"backbone": {"name": "other"}}, "backbone")])
def test_edited_store_json_is_refused(store: Path, change: dict, field: str) -> None:
    _edit_meta(store, **change)
    with pytest.raises(NotAStoreError, match=f"STORE.json.*{field}"):
        open_store(store)
    with pytest.raises(NotAStoreError, match=f"STORE.json.*{field}"):
        verify_store(store)
    for cmd in ("verify", "info"):
        one_line_failure((cmd, store), "STORE.json", field)
    with pytest.raises(NotAStoreError, match="STORE.json"):
        StoreWriter(store)


def test_old_shards_without_metadata_still_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedstore.store import schema
    monkeypatch.setattr(schema, "shard_metadata", lambda meta: None)
    p = tmp_path / "old"
    write_units(p, [0, 1])
    f = next((p / "shards").glob("*.arrow"))
    with pa.memory_map(str(f)) as m:
        assert not pa.ipc.open_file(m).schema.metadata
    monkeypatch.undo()
    assert len(open_store(p)) == len(expected([0, 1])) and verify_store(p).ok
    write_units(p, [2])   # new shards beside old ones
    assert verify_store(p).ok and len(open_store(p)) == len(expected([0, 1, 2]))
    _edit_meta(p, dim=8)  # the width of the embedding field is checked even without metadata
    one_line_failure(("verify", p), "STORE.json", "dim")


# -- item 8: a damaged catalog says so, and is rebuilt from the shards ------------------------
def _damage(store: Path, how: str) -> None:
    """Damage the catalog as a user would between runs (this process's environments closed
    first: truncating a file LMDB has mapped would kill the process with SIGBUS)."""
    from embedstore.store import catalog
    with catalog._ENVS_LOCK:
        for k, c in list(catalog._ENVS.items()):
            c.env.close()
            del catalog._ENVS[k]
    data = store / "catalog" / "data.mdb"
    if how == "deleted":
        import shutil
        shutil.rmtree(store / "catalog")
    elif how == "truncated":
        os.truncate(data, data.stat().st_size // 3)
    elif how == "overwritten":
        b = bytearray(data.read_bytes())
        mid = len(b) // 2
        b[4096:mid] = bytes(range(256)) * ((mid - 4096) // 256) + bytes((mid - 4096) % 256)
        data.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["deleted", "truncated", "overwritten"])
def test_damaged_catalog_is_one_line_and_rebuilt(store: Path, how: str, tmp_path: Path) -> None:
    keys = open_store(store).keys()
    delete(store, keys=keys[:3], reason="qc")
    before = contents(store)
    units = open_store(store).units_done()
    _damage(store, how)
    for cmd in ("verify", "info", "errors"):
        one_line_failure((cmd, store), "catalog", "damaged", f"embedstore rebuild-catalog {store}")
    with pytest.raises(CatalogDamagedError, match="rebuild-catalog"):
        write_units(store, [20])
    code, out, err = run("rebuild-catalog", store)
    assert code == 0, err
    assert "tombstones" not in out or "lost" not in out.split("tombstones")[0][-40:]
    assert verify_store(store).ok
    assert contents(store) == before            # keys, ids and embeddings, deletions honoured
    assert open_store(store).units_done() == units
    assert sorted(open_store(store).slides()) == sorted(unit_data(u)["slide"] for u in UNITS)
    write_units(store, UNITS + [20])           # resumes: nothing redone, the new unit added
    assert len(open_store(store)) == len(before) + len(expected([20]))


def _label_five(store: Path, tmp_path: Path) -> list[str]:
    """Import task "t" labelling the first five tiles "a"; returns every key, in id order."""
    labels = tmp_path / "l.csv"
    keys = open_store(store).keys()
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([["key", "label"]] + [[k, "a"] for k in keys[:5]])
    import_labels(store, labels, "t")
    return keys


def test_rebuild_reports_what_it_cannot_recover(store: Path, tmp_path: Path) -> None:
    keys = _label_five(store, tmp_path)
    journal = store / "journal.jsonl"   # an import older than the journal: the shards lack it
    journal.write_text("".join(x + "\n" for x in journal.read_text().splitlines() if '"op":"labels"' not in x))
    _damage(store, "deleted")
    r = rebuild_catalog(store)
    assert r["shards"] > 0 and r["rows"] == len(keys)
    assert any("t" in x and "label" in x for x in r["lost"]), r
    code, out, err = run("rebuild-catalog", store, "--json")
    assert code == 0 and json.loads(out)["ids_preserved"] is True


def test_rebuild_of_a_healthy_catalog_keeps_labels(store: Path, tmp_path: Path) -> None:
    keys = _label_five(store, tmp_path)
    before = contents(store)
    r = rebuild_catalog(store)
    assert not r["lost"], r
    assert contents(store) == before and list(open_store(store).labels(keys[:5], "t")) == ["a"] * 5


# -- item 3: two writers over the same units --------------------------------------------------
WRITER = """
import json, sys
from pathlib import Path
from embedstore.store import StoreWriter
from synthetic import meta, unit_data
claim = sys.argv[2] == "claim"
with StoreWriter(Path(sys.argv[1]), meta(), rows_per_shard=12, spill_rows=4) as w:
    for u in range(int(sys.argv[3])):
        name = f"u{u}"
        if claim and not w.claim(name):
            continue
        d = unit_data(u)
        half = len(d["keys"]) // 2
        for a, b in ((0, half), (half, len(d["keys"]))):
            w.add(d["emb"][a:b], d["keys"][a:b], unit=name, slide=d["slide"], x=d["x"][a:b], y=d["y"][a:b])
        w.end_unit(name)
print(json.dumps(w.committed))
"""


@pytest.mark.parametrize("mode", ["claim", "noclaim"])
def test_two_writers_over_the_same_units_store_each_row_once(tmp_path: Path, mode: str) -> None:
    store = tmp_path / "st"
    write_units(store, [])   # created first, so both open the same store
    n_units = 30
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{HERE.parent}")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), mode, str(n_units)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    committed = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    exp = expected(list(range(n_units)))
    assert shard_rows(store) == len(exp), "no duplicate rows on disk"
    # each writer reports what it really committed; together exactly the expected rows
    assert sum(sum(c.values()) for c in committed) == len(exp)
    assert set(committed[0]) & set(committed[1]) == set()
    s = open_store(store)
    assert sorted(s.keys()) == sorted(exp) and verify_store(store).ok
    for c in committed:
        for u, n in c.items():
            assert n == len(unit_data(int(u[1:]))["keys"])


def test_claims(tmp_path: Path) -> None:
    store = tmp_path / "st"
    write_units(store, [0])
    with StoreWriter(store, meta()) as a, StoreWriter(store, meta()) as b:
        assert not a.claim("u0")                 # already done
        assert a.claim("u1") and a.claim("u1")   # idempotent for its owner
        assert not b.claim("u1")                 # held by a live writer
        assert b.claim("u2")
    with StoreWriter(store, meta()) as c:        # claims are released on close
        assert c.claim("u1") and c.claim("u2")
    # a dead writer's claim is taken over
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{HERE.parent}")
    code = ("import sys, os, signal; from pathlib import Path; from embedstore.store import StoreWriter; "
            "from synthetic import meta; w = StoreWriter(Path(sys.argv[1]), meta()); "
            "assert w.claim('u5'); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(store)], env=env)
    with StoreWriter(store, meta()) as d:
        assert d.claim("u5")


# -- item 12: export-h5 never writes outside --out --------------------------------------------
HOSTILE = ["../escape.svs", "/abs/x.svs", "a/../../b.svs", "sub/ok.svs", "tab\there.svs", "..", "plain.svs"]


def test_export_h5_keeps_every_file_under_out(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    store = tmp_path / "deep" / "st"
    rng = np.random.default_rng(0)
    with StoreWriter(store, meta()) as w:
        for i, s in enumerate(HOSTILE):
            w.add(rng.normal(size=(3, DIM)), [f"k{i}/{j}" for j in range(3)], unit=f"u{i}", slide=s,
                  x=[0, 1, 2], y=[0, 0, 0])
            w.end_unit(f"u{i}")
    out = tmp_path / "deep" / "out"
    code, stdout, err = run("export-h5", store, "--out", out, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    outside = [p for p in tmp_path.rglob("*.h5") if out not in p.parents]
    assert not outside and not Path("/abs/x.h5").exists()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.h5"))
    assert len(files) == len(HOSTILE) == d["files"]
    assert "sub/ok.h5" in files and "plain.h5" in files
    with (out / "slides.csv").open() as f:
        mapping = {r["slide"]: r["file"] for r in csv.DictReader(f)}
    assert set(mapping) == set(HOSTILE) and sorted(mapping.values()) == files
    assert d["mapping"] == str(out / "slides.csv")
    import h5py
    for s, rel in mapping.items():
        with h5py.File(out / rel) as f:
            assert f.attrs["slide_id"] == s

"""An index larger than RAM: an IVF whose inverted lists live in STORE/index/*.ivfdata and are
memory-mapped at search. Over a real 50,000 x 64 store: recall against exact search, the files
found by the store layout only, streamed reads (no batch past the bound: never the full
matrix), search after reopening, tombstones, --update, the automatic choice when nothing fits
in memory, and hostile index.json / .ivfdata files."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from embedstore.errors import BudgetError, VectorIndexError
from embedstore.index import build_index, exact_search, load_index, recall_at_k, search, update_index
from embedstore.index.choose import fits_in_memory, parse_memory, plan_on_disk
from embedstore.index.stored import RERANK_ROWS
from embedstore.store import StoreMeta, StoreWriter, delete, open_store
from test_index import clustered

N, DIM, UNIT = 50_000, 64, 5_000
BATCH = 8_192                    # scan / gather batch the build is given
BOUND = max(BATCH, RERANK_ROWS)  # no single read may exceed this (the store holds 50,000 rows)
SHARD = 16_384                   # rows encoded in memory per shard: 4 shards
TARGET = 0.95
search_mod = importlib.import_module("embedstore.index.search")   # the module, not the function


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


class SpyStore:
    """A real store whose scan and gather record the largest batch they were asked for."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.largest = 0
        self.rows_read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def scan(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, emb in self._inner.scan(batch_size):
            self.largest = max(self.largest, len(ids))
            self.rows_read += len(ids)
            yield ids, emb

    def gather(self, ids: np.ndarray) -> np.ndarray:
        self.largest = max(self.largest, len(ids))
        self.rows_read += len(ids)
        return self._inner.gather(ids)


def _write(path: Path, emb: np.ndarray, lo: int, hi: int) -> None:
    with StoreWriter(path, StoreMeta(dim=DIM, dtype="float16"), rows_per_shard=10_000) as w:
        for s in range(lo, hi, UNIT):
            e = min(hi, s + UNIT)
            slide = f"s{s // UNIT}"
            w.add(emb[s:e], [f"{slide}/{i}" for i in range(s, e)], unit=f"u{s}", slide=slide,
                  x=list(range(s, e)), y=0)
            w.end_unit(f"u{s}")


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(N + 2_000, DIM, 200, seed=3)[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, data: np.ndarray) -> tuple[Path, Any, SpyStore]:
    path = tmp_path_factory.mktemp("ondisk") / "store"
    _write(path, data, 0, N)
    spy = SpyStore(open_store(path))
    info = build_index(spy, on_disk=True, n_queries=200, batch_size=BATCH, shard_rows=SHARD,
                       target_recall=TARGET)
    return path, info, spy


def _fresh_queries(data: np.ndarray, n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(11)
    picks = data[rng.choice(N, n, replace=False)].astype(np.float32)
    return picks + 0.05 * rng.standard_normal(picks.shape).astype(np.float32)


def test_on_disk_build_reaches_recall_on_fresh_queries(built: tuple, data: np.ndarray) -> None:
    path, info, _ = built
    assert info.on_disk and info.kind == "ivf-pq" and info.n_covered == N
    assert info.recall_met and info.recall_at_10 >= TARGET
    store = open_store(path)
    q = _fresh_queries(data)
    found = np.stack([h.ids for h in search(store, vectors=q, k=10)])
    _, truth = exact_search(store, q, 10)
    assert recall_at_k(found, truth, 10) >= TARGET - 0.02


def test_files_live_under_store_index_only(built: tuple) -> None:
    path, info, _ = built
    token = info.file[len("index-"):-len(".faiss")]
    assert info.ivfdata == f"index-{token}.ivfdata"
    names = sorted(p.name for p in (path / "index").iterdir())
    assert names == sorted(["index.json", info.file, info.ivfdata])      # no shard, no staging
    assert (path / "index" / info.ivfdata).stat().st_size == info.ivfdata_bytes
    saved = json.loads((path / "index" / "index.json").read_text())
    assert saved["on_disk"] is True and saved["ivfdata"] == info.ivfdata
    assert "/" not in saved["ivfdata"] and "/" not in saved["file"]


def test_build_reads_the_store_in_bounded_batches(built: tuple) -> None:
    _, info, spy = built
    assert 0 < spy.largest <= BOUND < N          # never the full matrix in one read
    assert spy.rows_read >= N                    # ... but every row was read


def test_search_after_reopening_maps_the_lists_read_only(built: tuple, data: np.ndarray) -> None:
    import faiss

    path, info, _ = built
    search_mod._CACHE.clear()
    store = open_store(path)
    vindex = load_index(store)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(vindex.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
    assert Path(lists.filename) == path / "index" / info.ivfdata
    key = "s3/15007"
    hit = search(store, keys=[key], k=5)[0]
    assert hit.keys[0] == key and hit.method.startswith("index IVF")
    assert search(store, keys=[key], k=5, exclude_same_slide=True)[0].meta["slide"].tolist() \
        and "s3" not in set(search(store, keys=[key], k=5, exclude_same_slide=True)[0].meta["slide"])


def test_deleted_rows_never_returned_then_update(tmp_path: Path, data: np.ndarray) -> None:
    path = tmp_path / "store"
    _write(path, data, 0, 20_000)
    build_index(open_store(path), on_disk=True, n_queries=100, batch_size=BATCH, shard_rows=SHARD)
    key = "s1/5003"
    first = search(open_store(path), keys=[key], k=10)[0]
    gone = first.keys[1:4]
    delete(path, keys=gone)
    store = open_store(path)
    again = search(store, keys=[key], k=10)[0]
    assert not set(gone) & set(again.keys) and len(again.keys) == 10
    q = np.asarray(store.gather(store.ids([key])), np.float32)
    assert not set(gone) & set(store.keys_of(search(store, vectors=q, k=50)[0].ids))
    old = json.loads((path / "index" / "index.json").read_text())["ivfdata"]
    _write(path, data, 20_000, 25_000)
    info = update_index(open_store(path), batch_size=BATCH)
    assert info.on_disk and info.n_covered == 25_000 and info.n_added == 5_000
    names = {p.name for p in (path / "index").iterdir()}
    assert old not in names and names == {"index.json", info.file, info.ivfdata}
    store = open_store(path)
    assert search(store, keys=["s4/24999"], k=1)[0].keys == ["s4/24999"]
    assert not set(gone) & set(search(store, keys=[key], k=10)[0].keys)


def test_auto_goes_on_disk_only_when_nothing_fits_in_memory(tmp_path: Path,
                                                             data: np.ndarray) -> None:
    assert fits_in_memory(N, DIM, parse_memory("8G"))
    assert not fits_in_memory(100_000_000, 1536, parse_memory("1G"))
    big = plan_on_disk(100_000_000, 1536, parse_memory("4G"))
    assert big.on_disk and big.train_size <= 1 << 18 and big.disk_bytes > 4 * (1 << 30)
    assert big.memory_bytes + big.train_bytes <= parse_memory("4G")
    with pytest.raises(VectorIndexError, match="on-disk index is an inverted file"):
        plan_on_disk(N, DIM, parse_memory("8G"), kind="hnsw")
    with pytest.raises(BudgetError) as err:
        plan_on_disk(100_000_000, 1536, parse_memory("100M"))
    assert "\n" not in str(err.value) and "at least" in str(err.value)
    budget = parse_memory("3M")                  # the codes alone do not fit; the rest does
    assert not fits_in_memory(N, DIM, budget)
    path = tmp_path / "store"
    _write(path, data, 0, N)
    info = build_index(open_store(path), memory_budget=budget, n_queries=100, batch_size=BATCH)
    assert info.on_disk and info.n_covered == N and "on disk" in info.reason
    never = build_index(open_store(path), memory_budget="8G", n_queries=100, on_disk=False,
                        kind="ivf-pq", batch_size=BATCH)
    assert not never.on_disk and {p.suffix for p in (path / "index").iterdir()} == {".json", ".faiss"}


@pytest.fixture()
def copy(built: tuple, tmp_path: Path) -> Path:
    path = tmp_path / "store"
    shutil.copytree(built[0], path)
    search_mod._CACHE.clear()
    return path


def _edit(path: Path, **changes: object) -> None:
    info = path / "index" / "index.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), **changes}))


@pytest.mark.parametrize("name", ["../elsewhere.ivfdata", "/etc/passwd", "index-000000000000.ivfdata"])
def test_ivfdata_name_must_be_the_layouts(copy: Path, name: str) -> None:
    _edit(copy, ivfdata=name)
    with pytest.raises(VectorIndexError) as err:
        load_index(open_store(copy))
    assert "\n" not in str(err.value) and "refusing" in str(err.value)


def test_ivfdata_link_or_truncated_is_refused(copy: Path, tmp_path: Path) -> None:
    info = json.loads((copy / "index" / "index.json").read_text())
    lists = copy / "index" / info["ivfdata"]
    moved = tmp_path / "outside.ivfdata"
    shutil.move(lists, moved)
    lists.symlink_to(moved)
    with pytest.raises(VectorIndexError, match="is a link"):
        load_index(open_store(copy))
    lists.unlink()
    lists.write_bytes(moved.read_bytes()[:1000])
    with pytest.raises(VectorIndexError, match="truncated"):
        load_index(open_store(copy))
    _edit(copy, ivfdata_bytes=1000)              # size agrees, but the lists need more
    with pytest.raises(VectorIndexError) as err:
        load_index(open_store(copy))
    assert "\n" not in str(err.value) and "truncated" in str(err.value)


def test_gpu_is_refused_in_one_line(built: tuple) -> None:
    with pytest.raises(VectorIndexError, match="drop --gpu"):
        load_index(open_store(built[0]), gpu=True)


def test_cli_text_names_the_lists(built: tuple) -> None:
    from embedstore.cli.index import format_info

    path, info, _ = built
    text = format_info(info, path)
    assert "storage        on disk" in text and info.ivfdata in text


def test_cli_on_disk_json_is_one_document(tmp_path: Path, data: np.ndarray) -> None:
    """faiss prints "resizing ..." from C while merging lists: it must not reach --json stdout."""
    path = tmp_path / "store"
    _write(path, data, 0, 20_000)
    run = subprocess.run([sys.executable, "-m", "embedstore", "index", str(path), "--on-disk",
                          "--json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["on_disk"] and info["ivfdata"].endswith(".ivfdata")
    assert "resizing" in run.stderr

"""The store at scale: gathers that map nothing they do not return, key lookups and label
tables without one Python object (or one LMDB get) per row, and labels that survive a
rebuilt catalog (issue 14, and issue 11's labels replay)."""
from __future__ import annotations

import functools
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from embedstore.store import StoreWriter, delete, import_labels, open_store, rebuild_catalog
from embedstore.store import matrix as matrix_mod
from embedstore.store import reader as reader_mod
from embedstore.store import uring

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import meta  # noqa: E402

RSS_PROBE = r"""
import json, sys
import numpy as np
def rss():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
from embedstore.store import open_store
s = open_store(sys.argv[1])
ids = np.random.default_rng(7).choice(s.n_rows_committed, int(sys.argv[2]), replace=False)
before = rss()
out = s.gather(ids)
after = rss()
from embedstore.store import uring
print(json.dumps({"bytes": out.nbytes, "sum": float(out[:, :4].astype(np.float64).sum()),
                  "ring_off": uring.disabled(), **{k: after[k] - before[k] for k in before}}))
"""


def _write(path: Path, n: int, dim: int, rows_per_shard: int, unit_rows: int = 5000) -> None:
    rng = np.random.default_rng(0)
    with StoreWriter(path, meta(dim=dim), rows_per_shard=rows_per_shard, spill_rows=rows_per_shard) as w:
        for u, s in enumerate(range(0, n, unit_rows)):
            m = min(unit_rows, n - s)
            w.add(rng.standard_normal((m, dim), dtype=np.float32).astype(np.float16),
                  [f"s{u:05d}/{i}" for i in range(m)], unit=f"u{u}", slide=f"s{u:05d}",
                  x=np.arange(m), y=np.zeros(m, np.int64))
            w.end_unit(f"u{u}")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400,000 x 256 float16 (200 MB of rows) in shards of 16,384 rows."""
    path = tmp_path_factory.mktemp("scale") / "s"
    _write(path, 400_000, 256, 16_384)
    return path


@pytest.mark.parametrize("ring", ["1", "0"])
def test_a_sparse_gather_grows_the_process_by_about_what_it_returns(big: Path, ring: str) -> None:
    # Before: the gather's page faults mapped whole 2 MB page-cache folios (or 16-page
    # fault-around) of the shards: 10,000 rows (5.1 MB) grew RssFile by ~203 MB, the whole file.
    # Over both read paths: io_uring (its rings, its threads) and preadv.
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, str(big), "10000"], capture_output=True,
                       text=True, check=True, env={**os.environ, uring.ENV: ring})
    got = json.loads(r.stdout)
    assert got["bytes"] == 10_000 * 256 * 2
    assert (got["ring_off"] is None) == (ring == "1") or (ring == "1" and not _ring_ok()), got
    grew = got["RssAnon"] + got["RssFile"]
    assert grew < 20 * got["bytes"] + (30 << 20), got
    assert got["RssFile"] < 8 << 20, got             # nothing of the shards is mapped


SCAN_PROBE = r"""
import json, sys
import numpy as np
def rss(kind="RssFile:"):
    for line in open("/proc/self/status"):
        if line.startswith(kind):
            return int(line.split()[1]) * 1024
rss_file = rss
from embedstore.store import open_store
s = open_store(sys.argv[1])
how, m = sys.argv[2], s.embeddings
before, peak, total, rows = rss_file(), 0, 0.0, 0
anon0, anon_peak = rss("RssAnon:"), 0
if how.startswith("gather"):       # dense blocks of consecutive ids, as the streamed heads read
    m.release_behind = how == "gather-release"
    blocks = ((a, m.take(np.arange(a, min(a + 16384, len(m))))) for a in range(0, len(m), 16384))
else:
    blocks = m.batches(16384, release=how == "release", read_ahead=how == "read")
for start, block in blocks:
    wide = block.astype(np.float32)           # a consumer's temporary, as predict makes
    total += float(wide[:, :8].astype(np.float64).sum())
    rows += len(block)
    peak = max(peak, rss_file() - before)
    anon_peak = max(anon_peak, rss("RssAnon:") - anon0)
print(json.dumps({"peak": peak, "sum": total, "rows": rows, "anon_peak": anon_peak}))
"""


def test_released_scans_and_dense_gathers_hold_one_block_mapped(big: Path) -> None:
    # a 10M-row `predict` grew RssFile to the whole 15 GB store (and was OOM-killed beside other
    # work): a scan kept every page it had touched mapped
    def probe(how: str) -> dict:
        r = subprocess.run([sys.executable, "-c", SCAN_PROBE, str(big), how], capture_output=True,
                           text=True, check=True)
        return json.loads(r.stdout)
    kept, released, read = probe("keep"), probe("release"), probe("read")
    assert kept["rows"] == released["rows"] == read["rows"] == 400_000
    assert kept["sum"] == released["sum"] == read["sum"]
    assert kept["peak"] > 150 << 20, kept            # the 200 MB of rows stay mapped
    assert released["peak"] < 40 << 20, released     # a block is 8 MB
    assert read["peak"] < 8 << 20, read              # read into arrays: nothing mapped
    # blocks read in helper threads, freed by the consumer: malloc kept them (and the
    # consumer's temporaries) in its heaps, 3.4 GB after 1M rows of 768 float16
    assert read["anon_peak"] < 80 << 20, read        # 4 blocks of 8 MB in flight + temporaries
    kept, released = probe("gather-keep"), probe("gather-release")
    assert kept["rows"] == released["rows"] == 400_000 and kept["sum"] == released["sum"]
    assert kept["peak"] > 150 << 20, kept
    assert released["peak"] < 40 << 20, released


def _evict(path: Path) -> None:
    for f in path.rglob("*.arrow"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _root(a: np.ndarray) -> object:
    """The object that owns an array's memory (through views and memoryviews)."""
    obj: object = a
    while True:
        nxt = obj.base if isinstance(obj, np.ndarray) else getattr(obj, "obj", None)
        if nxt is None:
            return obj
        obj = nxt


def _in_shard(block: np.ndarray, m: object) -> bool:
    """Whether ``block`` lies in one of the matrix's shard mappings."""
    at = block.__array_interface__["data"][0]
    return any(p.shard.base <= at < p.shard.base + len(p.shard.mm) for p in m.pieces)  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="cannot drop files from the page cache")
def test_a_cold_scan_reads_ahead_into_arrays_and_a_warm_one_hands_out_views(tmp_path: Path) -> None:
    """Shards out of the page cache are read with preadv, a block ahead in a helper thread
    (stopped when the consumer leaves early); cached ones are zero-copy views; same rows."""
    _write(tmp_path / "s", 60_000, 64, 16_384)
    _evict(tmp_path / "s")
    m = open_store(tmp_path / "s").embeddings
    views = [(a, b) for a, b in m.batches(10_000, read_ahead=False)]
    _evict(tmp_path / "s")
    m = open_store(tmp_path / "s").embeddings          # a fresh map, its pages not cached
    if m._piece_cached(0):
        pytest.skip("this machine keeps the shards cached")
    auto = list(m.batches(10_000))
    assert [a for a, _ in auto] == [a for a, _ in views]
    for (_, got), (_, want) in zip(auto, views):
        np.testing.assert_array_equal(got, want)
    assert all(b.flags.writeable and not _in_shard(b, m) for _, b in auto)  # read, not mapped
    # each in its own anonymous mapping, not malloc's heap (made in a helper thread, freed by
    # the consumer)
    assert all(isinstance(_root(b), mmap.mmap) for _, b in auto)
    assert not m._mapped.any()
    assert all(_in_shard(b, m) for _, b in m.batches(10_000))              # now cached: views
    it = m.batches(5_000, read_ahead=True)
    next(it)
    assert any(t.name.startswith("embedstore-scan") for t in threading.enumerate())
    it.close()
    assert not any(t.name.startswith("embedstore-scan") for t in threading.enumerate())


def test_a_read_ahead_scan_closes_the_descriptor_of_each_block_read(tmp_path: Path) -> None:
    """Each block read of a cold scan opens its own descriptor (sequential advice) and closes
    it after the read; the rows are the shards', also when the consumer leaves early."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd to count descriptors in")
    _write(tmp_path / "s", 30_000, 32, 4_096)
    m = open_store(tmp_path / "s").embeddings
    whole = np.concatenate([b for _, b in m.batches(5_000, read_ahead=False)])
    before = len(os.listdir("/proc/self/fd"))
    got = list(m.batches(3_000, read_ahead=True))
    assert len(os.listdir("/proc/self/fd")) == before
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), whole)
    assert not any(_in_shard(b, m) for _, b in got)
    it = m.batches(1_000, read_ahead=True)
    next(it), next(it)
    it.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_gathers_by_pread_and_by_map_agree_with_the_matrix(big: Path) -> None:
    s = open_store(big)
    m = s.embeddings
    rng = np.random.default_rng(3)
    rows = np.concatenate([rng.choice(len(m), 3000, replace=False),           # sparse: pread
                           np.arange(100_000, 103_000),                        # dense: the map
                           [5, 5, 6, 7, 16_383, 16_384, len(m) - 1]])          # repeats, edges
    rng.shuffle(rows)
    whole = np.concatenate([b for _, b in m.batches(50_000, stop=len(m), read_ahead=False)])
    for prefetch in (None, True, False):
        np.testing.assert_array_equal(m.take(rows, prefetch=prefetch), whole[rows])
    np.testing.assert_array_equal(m.take(np.sort(rows)), whole[np.sort(rows)])
    assert m.take(np.array([], np.int64)).shape == (0, 256)
    np.testing.assert_array_equal(m[12345], whole[12345])
    assert m._mapped.all()                          # scanned whole: later gathers use the map
    np.testing.assert_array_equal(m.take(rows), whole[rows])


def test_a_gather_reads_sparse_rows_without_the_map(big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = matrix_mod._read_runs
    monkeypatch.setattr(matrix_mod, "_read_runs", lambda *a: calls.append(len(a[1])) or real(*a))
    s = open_store(big)
    ids = np.array([10, 11, 12, 40_000, 399_999])
    np.testing.assert_array_equal(s.gather(ids), np.stack([s.embeddings[i:i + 1][0] for i in ids]))
    assert calls and calls[0] == 3                  # runs: 10..12, 40000, 399999


@pytest.mark.parametrize("preadv", [True, False])
def test_preadv_runs_scatter_into_any_order(big: Path, monkeypatch: pytest.MonkeyPatch, preadv: bool) -> None:
    """Every row read with preadv (DENSE=0, io_uring off): runs of adjacent rows whose
    destinations are scattered, runs split at IOV_MAX buffers, repeats, piece edges; and the
    pread fallback."""
    monkeypatch.setattr(uring, "_why_off", "off for this test")
    s = open_store(big)
    m = s.embeddings
    whole = np.concatenate([b for _, b in m.batches(50_000, stop=len(m), read_ahead=False)])
    m._mapped[:] = False                          # as if not scanned: the reads below use preadv
    monkeypatch.setattr(matrix_mod, "DENSE", 0)
    monkeypatch.setattr(matrix_mod, "IOV_MAX", 4)
    if not preadv:
        monkeypatch.delattr(matrix_mod.os, "preadv")
    rng = np.random.default_rng(5)
    rows = np.concatenate([np.arange(16_380, 16_390), np.arange(200_000, 200_050), [7, 7, 8],
                           rng.choice(len(m), 500, replace=False)])
    calls: list[int] = []
    real = matrix_mod._read_runs
    monkeypatch.setattr(matrix_mod, "_read_runs", lambda *a: calls.append(len(a[1])) or real(*a))
    for r in (rows, rng.permutation(rows), np.sort(rows)):
        np.testing.assert_array_equal(m.take(r, prefetch=False), whole[r])
    assert len(calls) == 3 and min(calls) > 500   # read by preadv, not the map
    calls.clear()
    np.testing.assert_array_equal(m.take(np.arange(100, 110)[::-1]), whole[109:99:-1])
    assert calls == [3]                           # one run, ten scattered rows: calls of <= 4


def test_a_truncated_shard_is_a_corrupt_shard_error(tmp_path: Path) -> None:
    path = tmp_path / "t"
    _write(path, 20_000, 64, 8192)
    s = open_store(path)
    shard = max(s.embeddings.pieces, key=lambda p: p.start).shard
    assert shard.fd is not None                   # read by pread, not the map
    with open(shard.path, "r+b") as fh:           # the last rows vanish after the open
        fh.truncate(shard.path.stat().st_size // 2)
    from embedstore.errors import CorruptShardError
    with pytest.raises(CorruptShardError, match="shorter than its rows"):
        s.embeddings.take(np.array([len(s.embeddings) - 1, 3]), prefetch=False)
    many = np.arange(0, len(s.embeddings), 97)     # enough rows for io_uring: a short read there
    with pytest.raises(CorruptShardError, match="shorter than its rows"):
        s.embeddings.take(many, prefetch=False)


@functools.lru_cache(maxsize=None)
def _ring_ok() -> bool:
    """Whether this machine lets a process read through io_uring (seccomp filters, such as
    Docker's default, and kernel.io_uring_disabled refuse it)."""
    r = subprocess.run([sys.executable, "-c", RING_PROBE], capture_output=True, text=True, check=True)
    return r.stdout.strip() == "None"


RING_PROBE = r"""
import os, tempfile
import numpy as np
from embedstore.store import uring
with tempfile.TemporaryFile() as f:
    f.write(bytes(range(256)) * 64)
    f.flush()
    out = np.zeros(64, np.uint8)
    got = uring.read(np.array([f.fileno()]), np.array([1000]), np.array([out.ctypes.data]),
                     np.array([64]), out)
    ok = got is not None and got[0] == 64 and out.tolist() == [(1000 + i) % 256 for i in range(64)]
    print(uring.disabled() if got is not None else "off: " + str(uring.disabled()) if not ok else None)
"""


@pytest.fixture()
def ring(monkeypatch: pytest.MonkeyPatch) -> Any:
    """io_uring reads on, in fresh rings (skipped where the machine refuses them)."""
    if not _ring_ok():
        pytest.skip("io_uring is refused on this machine: the preadv path is the one in use")
    monkeypatch.setattr(uring, "_why_off", None)
    monkeypatch.setattr(uring, "_local", threading.local())
    return uring


def _count_preadv(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = matrix_mod._read_runs
    monkeypatch.setattr(matrix_mod, "_read_runs", lambda *a: calls.append(len(a[1])) or real(*a))
    return calls


def test_io_uring_reads_scattered_runs_in_threads(big: Path, ring: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm sparse gathers go through io_uring: one read per stretch of adjacent rows going to
    consecutive output rows, split over threads past SPLIT_ROWS reads; preadv reads nothing."""
    s = open_store(big)
    m = s.embeddings
    whole = np.concatenate([b for _, b in m.batches(50_000, stop=len(m), read_ahead=False)])
    m._mapped[:] = False
    monkeypatch.setattr(matrix_mod, "DENSE", 0)
    monkeypatch.setattr(uring, "SPLIT_ROWS", 300)
    monkeypatch.setattr(uring, "ENTRIES", 64)              # several ring-fulls per thread
    seen = set()
    real_part = uring._part
    monkeypatch.setattr(uring, "_part", lambda *a: seen.add(threading.get_ident()) or real_part(*a))
    calls = _count_preadv(monkeypatch)
    rng = np.random.default_rng(8)
    rows = np.concatenate([np.arange(16_380, 16_390), np.arange(200_000, 200_050), [7, 7, 8],
                           rng.choice(len(m), 3000, replace=False)])
    for r in (rows, rng.permutation(rows), np.sort(rows)):
        np.testing.assert_array_equal(m.take(r, prefetch=False), whole[r])
    assert ring.disabled() is None and calls == []
    assert len(seen) == min(uring._threads(), 3000 // 300) or uring._threads() == 1


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="cannot drop files from the page cache")
def test_rows_not_in_the_page_cache_fall_back_to_preadv(tmp_path: Path, ring: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of pages the page cache lacks fails with -EAGAIN (RWF_NOWAIT) rather than going
    async; those stretches are read with preadv, and the ring stays on."""
    _write(tmp_path / "s", 60_000, 128, 8192)
    s = open_store(tmp_path / "s")
    m = s.embeddings
    whole = np.concatenate([b for _, b in m.batches(50_000, stop=len(m), read_ahead=False)])
    m._mapped[:] = False
    rows = np.random.default_rng(2).choice(len(m), 2000, replace=False)
    calls = _count_preadv(monkeypatch)
    got = []
    real_read = uring.read
    monkeypatch.setattr(uring, "read", lambda *a: got.append(real_read(*a)) or got[-1])
    for p in m.pieces:                            # pages mapped here cannot be dropped
        p.shard.release(p.emb)
    _evict(tmp_path / "s")
    np.testing.assert_array_equal(m.take(rows, prefetch=False), whole[rows])
    assert (got[0] == -11).sum() > 1000, got      # EAGAIN for most: evicted
    assert calls and sum(calls) == (got[0] != 128 * 2).sum()
    assert ring.disabled() is None
    calls.clear()
    np.testing.assert_array_equal(m.take(rows, prefetch=False), whole[rows])
    assert calls == [] and (got[1] == 256).all()   # cached now: all through the ring


def test_a_refused_or_failing_ring_turns_itself_off_and_preadv_reads_all(
        big: Path, ring: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = open_store(big)
    m = s.embeddings
    whole = np.concatenate([b for _, b in m.batches(50_000, stop=len(m), read_ahead=False)])
    m._mapped[:] = False
    rows = np.random.default_rng(4).choice(len(m), 500, replace=False)
    calls = _count_preadv(monkeypatch)
    monkeypatch.setattr(uring, "_OP_READ", 250)               # an opcode no kernel has: -EINVAL
    np.testing.assert_array_equal(m.take(rows, prefetch=False), whole[rows])
    assert "io_uring reads: Invalid argument" in (ring.disabled() or "") and sum(calls) == 500
    np.testing.assert_array_equal(m.take(rows, prefetch=False), whole[rows])   # off: preadv
    assert sum(calls) == 1000
    monkeypatch.setattr(uring, "_why_off", None)
    monkeypatch.setattr(uring, "_local", threading.local())
    monkeypatch.setattr(uring, "_SETUP", 100_000)             # no such syscall: ENOSYS
    np.testing.assert_array_equal(m.take(rows, prefetch=False), whole[rows])
    assert (ring.disabled() or "").startswith("io_uring unavailable") and sum(calls) == 1500


def test_an_interrupted_ring_read_leaves_a_working_ring(big: Path, ring: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between two submissions: the gather raises KeyboardInterrupt, the ring it used is
    closed (RWF_NOWAIT: nothing was left in flight, so nothing is kept), the next gather is right."""
    s = open_store(big)
    m = s.embeddings
    whole = np.concatenate([b for _, b in m.batches(50_000, stop=len(m), read_ahead=False)])
    m._mapped[:] = False
    rows = np.random.default_rng(6).choice(len(m), 1000, replace=False)
    monkeypatch.setattr(uring, "ENTRIES", 128)
    np.testing.assert_array_equal(m.take(rows, prefetch=False), whole[rows])
    first = uring._local.ring
    real_enter, n = uring._Ring._enter, [0]

    def enter(self: Any, submit: int, wait: int) -> int:
        r = real_enter(self, submit, wait)
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt
        return r
    monkeypatch.setattr(uring._Ring, "_enter", enter)
    with pytest.raises(KeyboardInterrupt):
        m.take(rows, prefetch=False)
    assert uring._local.ring is None and first.fd == -1 and uring._kept == []
    np.testing.assert_array_equal(m.take(rows, prefetch=False), whole[rows])
    assert uring._local.ring is not None and ring.disabled() is None


FORK_PROBE = r"""
import os, sys
import numpy as np
from embedstore.store import open_store, uring
uring.SPLIT_ROWS = 500
s = open_store(sys.argv[1])
rows = np.random.default_rng(1).choice(s.n_rows_committed, 4000, replace=False)
want = s.gather(rows)                      # the parent's ring and thread pool exist now
parent = uring._local.ring
pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:                           # a forked worker: its own ring, its own pool
        ok = all((s.gather(rows) == want).all() for _ in range(3))
        ok = ok and uring._local.ring is not parent and uring._pool[0] == os.getpid()
        os._exit(0 if ok and uring.disabled() is None else 3)
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
print(codes, (s.gather(rows) == want).all(), uring._local.ring is parent)
"""


def test_forked_workers_get_their_own_rings(big: Path) -> None:
    if not _ring_ok():
        pytest.skip("io_uring is refused on this machine")
    r = subprocess.run([sys.executable, "-c", FORK_PROBE, str(big)], capture_output=True,
                       text=True, check=True, timeout=120)
    assert r.stdout.split() == ["[0,", "0]", "True", "True"], r.stdout + r.stderr


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    path = tmp_path / "k"
    _write(path, 30_000, 8, 4096, unit_rows=1000)
    return path


def test_keys_array_and_vectorised_ids_match_the_catalog(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    delete(small, keys=["s00003/7", "s00010/0"])
    s = open_store(small)
    keys = s.keys()
    arr = s.keys_array()
    assert isinstance(arr, pa.ChunkedArray) and arr.to_pylist() == keys and len(keys) == 30_000 - 2
    assert "s00003/7" not in set(keys)
    rng = np.random.default_rng(1)
    pick = [keys[i] for i in rng.choice(len(keys), 5000)]          # with repeats
    monkeypatch.setattr(reader_mod, "SCAN_MIN", 10**9)
    by_lmdb = s.ids(pick)
    monkeypatch.setattr(reader_mod, "SCAN_MIN", 1)
    calls = []
    real = s.snapshot.find
    monkeypatch.setattr(s.snapshot, "find", lambda *a: calls.append(1) or real(*a))
    np.testing.assert_array_equal(s.ids(pick), by_lmdb)
    np.testing.assert_array_equal(s.ids(pa.array(pick)), by_lmdb)
    np.testing.assert_array_equal(s.ids(np.array(pick)), by_lmdb)
    assert len(calls) == 3
    np.testing.assert_array_equal(s.ids(keys), s.all_ids())
    for bad in (["s00003/7"], ["nope"]):                            # deleted, unknown
        with pytest.raises(KeyError, match="not in"):
            s.ids(pick[:10] + bad)
    assert (s.find_ids(["s00003/7", pick[0]]) == [-1, by_lmdb[0]]).all()
    info = s.info()
    assert info["units_done"] == 30 and info["errors"] == 0 and info["rows"] == 30_000 - 2


def test_many_labels_import_and_read_back(small: Path) -> None:
    s = open_store(small)
    keys = s.keys()
    rows = [{"key": k, "label": "ab"[i % 2], "split": "train" if i % 3 else "test", "group": None}
            for i, k in enumerate(keys[::2])]
    rows.reverse()
    rec = import_labels(small, None, "t", rows=rows)
    assert rec["n"] == len(rows) and rec["classes"] == {"a": (len(rows) + 1) // 2, "b": len(rows) // 2}
    table = open_store(small).task_table("t")
    assert table["keys"] == keys[::2] and list(table["label"]) == ["ab"[i % 2] for i in range(len(rows))]
    assert (np.diff(table["ids"]) > 0).all() and table["group"] is None
    assert list(open_store(small).labels(keys[:4], "t")) == ["a", None, "b", None]
    import_labels(small, None, "t", rows=rows[:10])                 # an import replaces the task
    assert len(open_store(small).task_table("t")["keys"]) == 10


def _close_catalogs() -> None:
    from embedstore.store import catalog
    with catalog._ENVS_LOCK:
        for k, c in list(catalog._ENVS.items()):
            c.env.close()
            del catalog._ENVS[k]


def test_rebuild_replays_journaled_labels_over_a_lost_catalog(small: Path) -> None:
    keys = open_store(small).keys()
    import_labels(small, None, "old", rows=[{"key": k, "label": "x", "split": None, "group": None}
                                           for k in keys[:50]])
    import_labels(small, None, "old", rows=[{"key": k, "label": "y", "split": "val", "group": "p1"}
                                           for k in keys[100:120]])         # replaces the first
    import_labels(small, None, "t2", rows=[{"key": k, "label": str(i % 3), "split": None, "group": None}
                                          for i, k in enumerate(keys[:5000])])
    s = open_store(small)
    before = {t: s.task_table(t) for t in ("old", "t2")}
    tasks = s.tasks()
    _close_catalogs()
    shutil.rmtree(small / "catalog")
    r = rebuild_catalog(small)
    assert not any("label" in x for x in r["lost"]), r
    s = open_store(small)
    assert s.tasks() == tasks
    for t, tab in before.items():
        got = s.task_table(t)
        assert got["keys"] == tab["keys"] and (got["ids"] == tab["ids"]).all()
        for c in ("label", "split", "group"):
            assert (got[c] is None and tab[c] is None) or list(got[c]) == list(tab[c])
    assert list(s.labels(keys[:2], "old")) == [None, None]
    r = rebuild_catalog(small)                      # over a readable catalog: the same
    assert open_store(small).tasks() == tasks and not r["lost"]


def test_opening_a_store_does_not_import_pandas(small: Path) -> None:
    # pyarrow's Array.to_numpy imports pandas on first use: 0.25 s of every open (and every
    # `embedstore info`), measured on the 10M-row archive store
    code = ("import sys; from embedstore.store import open_store; s = open_store(sys.argv[1]); "
            "n = len(s); v = s.views(); print(n, len(v.ids), 'pandas' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(small)], capture_output=True, text=True, check=True)
    n, views, pandas = r.stdout.split()
    assert int(n) > 0 and pandas == "False", r.stdout


def test_a_slides_tile_side_comes_from_its_coordinates_without_reading_its_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that records no geometry: predict's level-0 tile side is the grid step of the
    slide's coordinates, read from two metadata columns, not through slide() (every row)."""
    from embedstore.store.geometry import level0_sides
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "s", meta(dim=16)) as w:
        for u, step in enumerate((224, 448)):
            i = np.arange(300)
            w.add(rng.standard_normal((300, 16), dtype=np.float32).astype(np.float16),
                  [f"s{u}/{j}" for j in i], unit=f"u{u}", slide=f"s{u}", x=(i % 20) * step, y=(i // 20) * step)
            w.end_unit(f"u{u}")
    s = open_store(tmp_path / "s")
    monkeypatch.setattr(type(s), "slide", lambda *a: pytest.fail("slide() read every row"))
    got = level0_sides(s)(np.array(["s1", "s0", "s1", None, "nope"], dtype=object))
    np.testing.assert_array_equal(got[:3], [448.0, 224.0, 448.0])
    assert np.isnan(got[3:]).all()


def test_adds_racing_the_background_commit_see_no_false_duplicates(tmp_path: Path) -> None:
    """The background thread takes committed keys out of the pending set while add() screens
    new keys against it; an add() whose screen a commit interleaved with raised a
    DuplicateKeyError for a fresh key (seen once in a full test run). The window is widened
    here: every update of the pending set sleeps before add() checks its size."""
    import time as _time

    class SlowSet(set):  # type: ignore[type-arg]
        def update(self, *more: Any) -> None:
            super().update(*more)
            _time.sleep(0.02)
    rng = np.random.default_rng(0)
    w = StoreWriter(tmp_path / "s", meta(dim=8), rows_per_shard=100, spill_rows=100, background=True)
    w._pending_keys = SlowSet()
    for u in range(40):
        w.add(rng.standard_normal((50, 8), dtype=np.float32).astype(np.float16),
              [f"u{u}/{i}" for i in range(50)], unit=f"u{u}", slide=f"u{u}")
        w.end_unit(f"u{u}")
    w.close()
    assert len(open_store(tmp_path / "s")) == 2000

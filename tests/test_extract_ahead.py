"""Decode-ahead (0 DataLoader workers): the next batch is read and decoded in one helper thread
while the model runs, the sampler stays in the calling thread. The store it makes is byte for
byte the one the plain loop makes; a tile that cannot be read is still an error of its unit;
an exception or Ctrl-C in the model loop stops the helper before the slides are closed."""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embedstore.errors import ConfigError, ShapeError
from embedstore.extract.dataset import DecodeAhead, TileDataset, TileSpec
from embedstore.extract.pipeline import Pipeline
from embedstore.extract.runner import ExtractConfig, extract
from embedstore.store import open_store, verify_store
from embedstore.store.schema import META_COLUMNS

ONNX = "mobilenetv2-onnx-int8"
ROOT = Path(__file__).resolve().parents[1]
LUNG = sorted((ROOT / "sample_data" / "lung").rglob("*.jpeg"))
HELPERS = ("embedstore-ahead", "embedstore-plan", "embedstore-decode")


def cfg(store: Path, **kw: Any) -> ExtractConfig:
    base: dict[str, Any] = dict(store=store, backbone=ONNX, progress=False, num_workers=0,
                                batch_size=16, num_threads=1, rows_per_shard=40, decode_ahead=True)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def slides(shared_data: Path) -> list[Path]:
    """Two real pyramidal TIFFs (tifffile: pages and SubIFDs), 107 tissue tiles together."""
    return [shared_data / "wsi" / "CMU-1-Small-Region.pyramid.tiff",
            shared_data / "wsi" / "CMU-1-Small-Region.ome.tiff"]


@pytest.fixture(scope="module")
def plain(slides: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store the plain loop makes (each batch decoded in the model's thread)."""
    st = tmp_path_factory.mktemp("plain") / "st"
    res = extract(slides, cfg(st, decode_ahead=False))
    assert res.exit_code == 0 and res.tiles_written > 3 * 16
    return st


def _shard_bytes(st: Path) -> list[str]:
    """sha256 of every committed shard file, in commit order (names carry the writer's id)."""
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in open_store(st).shard_files()]


def _files(st: Path, sub: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((st / sub).iterdir())}


def _same_store(a: Path, b: Path, ordered: bool = True) -> None:
    """The same keys (in the same order unless not ``ordered``: a resumed run appends), rows
    and metadata, and the same units done."""
    sa, sb = open_store(a), open_store(b)
    keys = sa.keys()
    assert keys == sb.keys() if ordered else sorted(keys) == sorted(sb.keys())
    assert sa.get(keys).tobytes() == sb.get(keys).tobytes()
    if ordered:
        assert sa.to_numpy().tobytes() == sb.to_numpy().tobytes()
    cols = tuple(META_COLUMNS)
    ma, mb = sa.metadata(sa.ids(keys), cols), sb.metadata(sb.ids(keys), cols)
    assert ma.keys() == mb.keys() and all(np.array_equal(ma[c], mb[c]) for c in ma)
    assert sorted(sa.units_done()) == sorted(sb.units_done())


def _no_helpers_left() -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(t.name.startswith(HELPERS) for t in threading.enumerate()):
        time.sleep(0.01)
    assert [t.name for t in threading.enumerate() if t.name.startswith(HELPERS)] == []


def test_decode_ahead_store_is_byte_identical(slides: list[Path], plain: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Same shard bytes, masks, keys, rows and metadata; batches were fetched in the helper
    thread and the sampler ran in the calling one."""
    where: dict[str, set[str]] = {"decode": set(), "sample": set()}
    fetch, start = TileDataset.__getitems__, Pipeline._start

    def spy_fetch(self: TileDataset, specs: list[TileSpec]) -> Any:
        where["decode"].add(threading.current_thread().name)
        return fetch(self, specs)

    def spy_start(self: Pipeline, got: Any) -> list[TileSpec]:
        where["sample"].add(threading.current_thread().name)
        return start(self, got)
    monkeypatch.setattr(TileDataset, "__getitems__", spy_fetch)
    monkeypatch.setattr(Pipeline, "_start", spy_start)
    st = tmp_path / "ahead"
    res = extract(slides, cfg(st))
    assert res.exit_code == 0 and res.tiles_written == len(open_store(plain))
    assert where["sample"] == {threading.current_thread().name}
    assert len(where["decode"]) == 1 and where["decode"].pop().startswith("embedstore-ahead")
    assert _shard_bytes(st) == _shard_bytes(plain) and len(_shard_bytes(st)) >= 2
    assert _files(st, "masks") == _files(plain, "masks")
    _same_store(st, plain)
    assert set(res.stages) >= {"wait", "read+decode", "forward"} and res.stages["read+decode"] > 0
    _no_helpers_left()


def test_a_failing_tile_read_is_an_error_of_its_unit(slides: list[Path], plain: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One tile of the second slide fails to read in the helper thread: recorded as that
    tile's error, its unit left not done, every other tile stored; a rerun completes it."""
    bad = sorted(k for k in open_store(plain).keys() if k.startswith(slides[1].name))[5]
    x, y = (int(v) for v in re.findall(r"(\d+)_(\d+)$", bad)[0])
    read = TileDataset._read

    def failing(self: TileDataset, s: TileSpec) -> np.ndarray:
        if s.key == bad:
            raise OSError(f"injected read error at {s.x},{s.y}")
        return read(self, s)
    monkeypatch.setattr(TileDataset, "_read", failing)
    st = tmp_path / "st"
    res = extract(slides, cfg(st))
    assert res.exit_code == 1
    assert res.errors == [(f"slide:{slides[1].name}|{bad}", f"OSError: injected read error at {x},{y}")]
    s = open_store(st)
    assert res.tiles_written == len(s) == len(open_store(plain)) - 1 and bad not in s.keys()
    assert s.units_done() == {f"slide:{slides[0].name}"}
    assert f"slide:{slides[1].name}|{bad}" in s.errors()
    monkeypatch.setattr(TileDataset, "_read", read)
    again = extract(slides, cfg(st))
    assert again.exit_code == 0 and again.tiles_written == 1
    _same_store(st, plain, ordered=False)
    _no_helpers_left()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_in_the_model_loop_stops_the_helper(slides: list[Path], plain: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         exc: type[BaseException]) -> None:
    """Ctrl-C (or any exception) while batches are in flight: it reaches the caller, no helper
    thread is left, no slide is read after the dataset closed it, the store verifies and a
    rerun gives the uninterrupted store."""
    write, calls = Pipeline.write, []
    closed = threading.Event()
    late: list[str] = []
    read, close = TileDataset._read, TileDataset.close

    def stopping(self: Pipeline, specs: list[TileSpec], emb: np.ndarray) -> None:
        calls.append(len(specs))
        if len(calls) == 3:
            raise exc("stop")
        write(self, specs, emb)

    def slow_read(self: TileDataset, s: TileSpec) -> np.ndarray:
        time.sleep(0.02)                      # slower than the model: the helper is mid-batch when it stops
        if closed.is_set():
            late.append(s.key)
        return read(self, s)

    def closing(self: TileDataset) -> None:
        closed.set()
        close(self)
    monkeypatch.setattr(Pipeline, "write", stopping)
    monkeypatch.setattr(TileDataset, "_read", slow_read)
    monkeypatch.setattr(TileDataset, "close", closing)
    st = tmp_path / "st"
    with pytest.raises(exc):
        extract(slides, cfg(st))
    assert closed.is_set() and late == []
    _no_helpers_left()
    assert verify_store(st).ok and len(open_store(st)) < len(open_store(plain))
    monkeypatch.setattr(Pipeline, "write", write)
    assert extract(slides, cfg(st)).exit_code == 0
    _same_store(st, plain, ordered=False)


def test_decode_ahead_keeps_one_batch_in_flight_and_passes_errors_on() -> None:
    """The sampler runs in the calling thread, one helper decodes, never two batches at once;
    a bug in collating (tiles of two shapes) is raised to the caller, the helper stopped."""
    class Spy(TileDataset):
        def __init__(self) -> None:
            super().__init__(decode_threads=2)
            self.busy, self.most, self.threads = 0, 0, set()
            self.guard = threading.Lock()

        def __getitems__(self, specs: list[TileSpec]) -> Any:
            with self.guard:
                self.busy += 1
                self.most = max(self.most, self.busy)
            self.threads.add(threading.current_thread().name)
            try:
                time.sleep(0.02)
                return super().__getitems__(specs)
            finally:
                with self.guard:
                    self.busy -= 1

    specs = [TileSpec(0, p.name, str(p), tile_size=224) for p in LUNG[:24]]
    sampled: list[str] = []

    def sampler() -> Any:
        for b in range(0, len(specs), 4):
            sampled.append(threading.current_thread().name)
            yield specs[b:b + 4]
    ds = Spy()
    got = [b["specs"] for b in DecodeAhead(ds, sampler())]
    assert got == [specs[b:b + 4] for b in range(0, len(specs), 4)]
    assert set(sampled) == {threading.current_thread().name} and len(sampled) == 6
    assert ds.most == 1 and ds.threads and threading.current_thread().name not in ds.threads
    ds.close()
    mixed = [specs[:2], [specs[2], specs[3]._replace(tile_size=96)], specs[4:6]]
    loader = DecodeAhead(TileDataset(), iter(mixed))
    with pytest.raises(ShapeError, match="different shapes"):
        list(loader)
    _no_helpers_left()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no per-thread priorities here")
def test_a_low_priority_helper_decodes_at_nice_19_and_leaves_the_caller_alone() -> None:
    """low_priority (the model on every core): the helper and the decode threads it starts run
    at nice 19 and SCHED_IDLE, so they take idle cores only; the iterating thread keeps its
    priority."""
    nice: dict[str, int] = {}
    policy: set[int] = set()

    class Spy(TileDataset):
        def __getitem__(self, s: TileSpec) -> Any:
            t = threading.current_thread()
            nice[t.name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            policy.add(os.sched_getscheduler(threading.get_native_id()))
            return super().__getitem__(s)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    specs = [TileSpec(0, p.name, str(p), tile_size=224) for p in LUNG[:8]]
    ds = Spy(decode_threads=2)
    plain = [b["tiles"] for b in DecodeAhead(TileDataset(), iter([specs[:4], specs[4:]]))]
    got = [b["tiles"] for b in DecodeAhead(ds, iter([specs[:4], specs[4:]]), low_priority=True)]
    assert all(torch.equal(a, b) for a, b in zip(got, plain)) and len(got) == 2
    assert nice and set(nice.values()) == {19}, nice
    assert policy == {os.SCHED_IDLE}                                     # and below every normal thread
    assert any(n.startswith("embedstore-decode") for n in nice), nice   # the pool inherited it
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    ds.close()
    _no_helpers_left()


def test_decode_ahead_must_be_a_bool_and_helpers_yield_when_the_model_has_every_core(tmp_path: Path) -> None:
    from embedstore.extract.config import model_leaves_a_core, usable_cores
    with pytest.raises(ConfigError, match="decode_ahead must be True, False or None, got 'no'"):
        cfg(tmp_path / "st", decode_ahead="no")
    assert ExtractConfig(store=tmp_path / "st", backbone=ONNX).decode_ahead is None
    cores = usable_cores()
    assert not model_leaves_a_core("cpu", cores)                  # the model on every core
    assert model_leaves_a_core("cpu", cores - 1) == (cores > 1)   # a core left for decoding
    assert model_leaves_a_core("cuda:0", cores)


def _policy() -> tuple[str, int, int]:
    """The calling thread: (name, scheduling policy, nice)."""
    tid = threading.get_native_id()
    return threading.current_thread().name, os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="no per-thread scheduling policies here")
def test_auto_decode_ahead_decodes_and_plans_in_helpers_at_idle_priority_beside_a_busy_model(
        slides: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_ahead=None: batches are decoded in the helper thread(s) and slides planned one
    ahead in another; with the model on every core both run at SCHED_IDLE and nice 19 (they
    take the cycles the model leaves), with a core left over at the caller's priority. The
    model's thread keeps its own either way."""
    from embedstore.extract.config import usable_cores
    from embedstore.extract.tiling import TilePlanner
    fetched: set[tuple[str, int, int]] = set()
    planned: set[tuple[str, int, int]] = set()
    fetch, plan = TileDataset.__getitems__, TilePlanner.plan_timed

    def spy_fetch(self: TileDataset, specs: list[TileSpec]) -> Any:
        fetched.add(_policy())
        return fetch(self, specs)

    def spy_plan(self: TilePlanner, index: int, item: Any) -> Any:
        planned.add(_policy())
        return plan(self, index, item)
    monkeypatch.setattr(TileDataset, "__getitems__", spy_fetch)
    monkeypatch.setattr(TilePlanner, "plan_timed", spy_plan)
    mine = _policy()
    cores = usable_cores()
    assert extract(slides[:2], cfg(tmp_path / "a", decode_ahead=None, num_threads=cores)).exit_code == 0
    assert {n.split("_")[0] for n, _, _ in fetched} == {"embedstore-ahead"}, fetched
    assert {n.split("_")[0] for n, _, _ in planned} == {"embedstore-plan"}, planned
    assert {(p, nice) for _, p, nice in fetched | planned} == {(os.SCHED_IDLE, 19)}
    assert _policy() == mine
    if cores > 1:
        fetched.clear()
        planned.clear()
        assert extract(slides[:2], cfg(tmp_path / "b", decode_ahead=None, num_threads=cores - 1)).exit_code == 0
        assert {n.split("_")[0] for n, _, _ in fetched} == {"embedstore-ahead"}, fetched
        assert {(p, nice) for _, p, nice in fetched | planned} == {mine[1:]}, (fetched, planned)

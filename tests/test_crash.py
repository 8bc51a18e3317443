"""Crash safety and concurrency: writers killed with SIGKILL at random moments and at forced
points inside every commit step; two writers appending at once while a reader polls."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedstore.store import open_store, verify_store

from synthetic import expected, write_units

HERE = Path(__file__).resolve().parent
N_UNITS = 14


def _spawn(store: Path, n_units: int, sleep: float, crash_at: str | None = None,
           first: int = 0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{HERE.parent}")
    env.pop("EMBEDSTORE_CRASH_AT", None)
    if crash_at:
        env["EMBEDSTORE_CRASH_AT"] = crash_at
    code = ("import sys; from pathlib import Path; from synthetic import write_units; "
            f"write_units(Path(sys.argv[1]), list(range({first}, {first + n_units})), sleep={sleep})")
    return subprocess.Popen([sys.executable, "-c", code, str(store)], env=env)


def _check_consistent(store: Path, universe: list[int]) -> set[str]:
    """Verify clean; every visible key once, with its exact embedding; returns the keys."""
    if not (store / "STORE.json").exists():
        return set()
    rep = verify_store(store)
    assert rep.ok, rep.text()
    s = open_store(store)
    keys = s.keys()
    assert len(keys) == len(set(keys))
    exp = expected(universe)
    emb = s.get(keys) if keys else np.empty((0,))
    for j, k in enumerate(keys):
        assert np.array_equal(emb[j], exp[k][0]), k
    # units are atomic: a unit is either wholly visible and marked done, or absent
    done = s.units_done()
    for u in universe:
        d = {k for k in exp if k.startswith(f"slide{u:03d}.svs/")}
        if f"u{u}" in done:
            assert d <= set(keys)
        else:
            assert not d & set(keys)
    return set(keys)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    p = tmp_path_factory.mktemp("ref") / "st"
    write_units(p, list(range(N_UNITS)))
    s = open_store(p)
    return dict(zip(s.keys(), s.get(s.keys())))


def _assert_same_as(store: Path, reference: dict[str, np.ndarray]) -> None:
    s = open_store(store)
    keys = s.keys()
    assert sorted(keys) == sorted(reference)
    got = s.get(keys)
    assert all(np.array_equal(got[j], reference[k]) for j, k in enumerate(keys))
    m = s.metadata(s.ids(keys), ("slide", "x", "y", "label"))
    exp = expected(list(range(N_UNITS)))
    for j, k in enumerate(keys):
        assert (m["slide"][j], m["x"][j], m["y"][j], m["label"][j]) == exp[k][1:]
    assert len(s.views().ids) == 2 * len(keys)
    assert verify_store(store).ok


@pytest.mark.parametrize("point", ["after_write", "after_fsync", "after_rename", "in_txn"])
def test_forced_crash_inside_each_commit_step(tmp_path: Path, point: str, reference: dict) -> None:
    store = tmp_path / "st"
    p = _spawn(store, N_UNITS, 0.0, crash_at=point)
    assert p.wait(60) == -signal.SIGKILL
    _check_consistent(store, list(range(N_UNITS)))
    leftovers = list((store / "tmp").iterdir()) + [f for f in (store / "shards").iterdir()]
    assert leftovers or point == "in_txn"
    write_units(store, list(range(N_UNITS)))    # resume: the dead writer's files are removed
    _assert_same_as(store, reference)
    assert not list((store / "tmp").iterdir())


def _shard_files(store: Path) -> set[str]:
    return {f.name for d in ("shards", "views") if (store / d).is_dir() for f in (store / d).iterdir()}


def test_sigkill_at_random_moments(tmp_path: Path, reference: dict) -> None:
    rng = random.Random(1234)
    trials = 20
    partial_states = 0
    for t in range(trials):
        store = tmp_path / f"st{t}"
        # each trial kills the writer once or twice before letting it finish
        for _ in range(rng.choice([1, 2])):
            before = _shard_files(store)
            p = _spawn(store, N_UNITS, sleep=0.05)   # ~1 s of writing once started
            # the clock starts at the run's first new shard, not at the spawn: the start-up
            # (imports) takes from 0.2 s to several seconds on a loaded machine
            deadline = time.time() + 60
            while _shard_files(store) <= before and p.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.9))
            p.send_signal(signal.SIGKILL)
            p.wait(30)
            keys = _check_consistent(store, list(range(N_UNITS)))
            partial_states += 0 < len(keys) < len(reference)
        write_units(store, list(range(N_UNITS)))
        _assert_same_as(store, reference)
    assert partial_states >= 3, "kills should land mid-run in several trials"


def test_live_writer_files_are_never_removed(tmp_path: Path) -> None:
    store = tmp_path / "st"
    write_units(store, [0])
    p = _spawn(store, 30, sleep=0.05, first=100)    # a writer that runs for a while
    deadline = time.time() + 20
    while time.time() < deadline and not list((store / "tmp").glob("*.partial")):
        time.sleep(0.01)
    assert list((store / "tmp").glob("*.partial"))
    for u in range(1, 6):                          # other writers open (and clean up) meanwhile
        write_units(store, [u])
    # had any of them removed the live writer's temporary files, its commits would fail
    assert p.wait(60) == 0
    _check_consistent(store, list(range(6)) + list(range(100, 130)))
    assert len(open_store(store)) == len(expected(list(range(6)) + list(range(100, 130))))
    # a killed writer's leftovers go at the next open for writing
    k = _spawn(store, 200, sleep=0.05, first=400)
    while not list((store / "tmp").glob("*.partial")):
        time.sleep(0.01)
    k.kill()
    k.wait()
    assert list((store / "tmp").iterdir())
    write_units(store, [6])
    assert not list((store / "tmp").iterdir())


def test_two_writers_and_a_polling_reader(tmp_path: Path) -> None:
    store = tmp_path / "st"
    write_units(store, [0])
    a = _spawn(store, 12, sleep=0.01, first=100)
    b = _spawn(store, 12, sleep=0.01, first=200)
    s = open_store(store)
    seen = []
    universe = [0] + list(range(100, 112)) + list(range(200, 212))
    exp = expected(universe)
    while a.poll() is None or b.poll() is None:
        s.refresh()
        keys = s.keys()
        seen.append(len(keys))
        assert len(keys) == len(set(keys))
        if keys:
            sample = keys[:: max(1, len(keys) // 10)]
            got = s.get(sample)
            assert all(np.array_equal(got[j], exp[k][0]) for j, k in enumerate(sample))
        time.sleep(0.02)
    assert a.returncode == 0 and b.returncode == 0
    assert seen == sorted(seen), "a reader never sees rows disappear"
    s.refresh()
    assert sorted(s.keys()) == sorted(exp)
    assert verify_store(store).ok
    # the same unit committed by two writers is kept once
    c = _spawn(store, 3, 0.0, first=300)
    d = _spawn(store, 3, 0.0, first=300)
    assert c.wait(60) == 0 and d.wait(60) == 0
    s.refresh()
    assert sorted(s.keys()) == sorted(expected(universe + [300, 301, 302]))


def _contents(store: Path) -> tuple[dict, set]:
    s = open_store(store)
    keys = s.keys()
    emb = s.get(keys)
    return {k: (int(i), emb[j].tobytes()) for j, (k, i) in enumerate(zip(keys, s.ids(keys)))}, s.units_done()


def _spawn_rebuild(store: Path, crash_at: str | None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{HERE.parent}")
    env.pop("EMBEDSTORE_CRASH_AT", None)
    if crash_at:
        env["EMBEDSTORE_CRASH_AT"] = crash_at
    code = "import sys; from embedstore.store import rebuild_catalog; rebuild_catalog(sys.argv[1])"
    return subprocess.Popen([sys.executable, "-c", code, str(store)], env=env)


@pytest.mark.parametrize("damage", ["healthy", "deleted"])
@pytest.mark.parametrize("point", ["rebuild_mid", "publish_swap", "random"])
def test_rebuild_catalog_killed_then_rerun(tmp_path: Path, point: str, damage: str) -> None:
    import shutil
    from embedstore.store import delete, rebuild_catalog
    store = tmp_path / "st"
    write_units(store, list(range(N_UNITS)))
    delete(store, keys=open_store(store).keys()[:4], reason="qc")
    before = _contents(store)
    ref = tmp_path / "ref"                      # an uninterrupted rebuild of a copy
    shutil.copytree(store, ref)
    if damage == "deleted":
        shutil.rmtree(ref / "catalog")
    rebuild_catalog(ref)
    assert _contents(ref) == before
    if damage == "deleted":
        shutil.rmtree(store / "catalog")
    p = _spawn_rebuild(store, None if point == "random" else point)
    if point == "random":
        time.sleep(random.Random(7).uniform(0.2, 0.6))
        p.send_signal(signal.SIGKILL)
    p.wait(60)
    if damage == "healthy" or (store / "catalog").exists() or (store / ".catalog.old").exists():
        # the old catalog is never destroyed before the new one is complete
        assert _contents(store) == before and verify_store(store).ok
    p = _spawn_rebuild(store, None)
    assert p.wait(60) == 0
    assert _contents(store) == _contents(ref) == before
    assert verify_store(store).ok
    assert not (store / ".catalog.rebuild").exists() and not (store / ".catalog.old").exists()

"""``train-head --out DIR`` over an existing head, killed with SIGKILL at every step of saving
and at random moments: afterwards ``DIR`` holds the complete old head or the complete new one
(weights and ``head.json`` from one training run), predicting works, and nothing is left beside it.

Kills come three ways: ``EMBEDSTORE_CRASH_AT`` at the points ``save_head`` marks; before the
k-th ``os.replace`` of the process (which reaches the window between the two renames of the
directory swap, and, in the old writer, between renaming the weights and ``head.json``); and
after a random delay.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedstore.heads import load_head, predict_store, save_head
from embedstore.store import open_store

from synthetic import write_units

HERE = Path(__file__).resolve().parent
TRAIN = ["--split", "kfold:3", "--seeds", "1", "--epochs", "5"]

# runs ``python -m embedstore ARGS`` after wrapping os.replace: KILL_AT_REPLACE=k kills the
# process with SIGKILL just before its k-th os.replace (or os.rename) call
BOOT = """
import os, runpy, signal, sys
k = int(os.environ.get("KILL_AT_REPLACE", "0"))
if k:
    calls = [0]
    def wrap(real):
        def replace(*a, **kw):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        return replace
    os.replace, os.rename = wrap(os.replace), wrap(os.rename)
sys.argv = ["embedstore"] + sys.argv[1:]
runpy.run_module("embedstore", run_name="__main__", alter_sys=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EMBEDSTORE_CRASH_AT", "KILL_AT_REPLACE")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def _spawn(store: Path, out: Path, seed: int, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BOOT, "train-head", str(store), *TRAIN,
                             "--seed", str(seed), "--out", str(out)],
                            env=_env(**extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("heads_crash")
    store = d / "store"
    write_units(store, list(range(8)))
    old = d / "old" / "head"
    t0 = time.perf_counter()
    p = _spawn(store, old, seed=0)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    s = open_store(store)
    return {"store": store, "old": old, "seconds": time.perf_counter() - t0,
            "pair": ((old / "head.json").read_bytes(), (old / "head.safetensors").read_bytes()),
            "emb": s.get(s.keys())}


def _fresh(world: dict, tmp_path: Path) -> Path:
    """A directory ``tmp_path/heads`` holding only a copy of the old head, as ``head``."""
    (tmp_path / "heads").mkdir()
    shutil.copytree(world["old"], tmp_path / "heads" / "head")
    return tmp_path / "heads" / "head"


def _check(world: dict, head_dir: Path, tmp_path: Path) -> str:
    """``"old"`` or ``"new"``: what ``head_dir`` holds after a crash, asserting it is whole."""
    snapshot = tmp_path / "snapshot"                       # the crash state, for the re-save below
    shutil.copytree(head_dir.parent, snapshot, symlinks=True)
    head = load_head(head_dir)
    text, weights = (head_dir / "head.json").read_bytes(), (head_dir / "head.safetensors").read_bytes()
    old_text, old_weights = world["pair"]
    if (text, weights) == (old_text, old_weights):
        kind = "old"
    else:
        meta, old_meta = json.loads(text), json.loads(old_text)
        assert meta.get("weights_sha256") == _sha(weights), "head.json describes other weights"
        assert weights != old_weights and meta.get("run") != old_meta.get("run"), "a mix of two runs"
        kind = "new"
    assert sorted(p.name for p in head_dir.parent.iterdir()) == [head_dir.name], "left behind"
    prob = head.predict_proba(world["emb"])
    assert prob.shape == (len(world["emb"]), 2) and np.allclose(prob.sum(1), 1, atol=1e-5)
    res = predict_store(open_store(world["store"]), head, tmp_path / "preds.arrow")
    assert res["rows"] == len(world["emb"])
    # saving over the crash state as it was left (before load_head tidied it) works too
    save_head(head, snapshot / head_dir.name)
    assert load_head(snapshot / head_dir.name).threshold == head.threshold
    assert sorted(p.name for p in snapshot.iterdir()) == [head_dir.name]
    return kind


@pytest.mark.parametrize("point, expect", [("head.staged_weights", "old"), ("head.staged", "old"),
                                           ("head.published", "new")])
def test_crash_at_each_save_step_leaves_a_whole_head(world: dict, tmp_path: Path, point: str,
                                                     expect: str) -> None:
    head_dir = _fresh(world, tmp_path)
    p = _spawn(world["store"], head_dir, seed=1, EMBEDSTORE_CRASH_AT=point)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, f"not killed at {point}: {p.returncode} {err.decode()}"
    assert _check(world, head_dir, tmp_path) == expect


def test_crash_before_each_rename_leaves_a_whole_head(world: dict, tmp_path: Path) -> None:
    """Killed before the 1st, 2nd, ... rename of the run until a run completes: covers the
    window between the swap's two renames (DIR gone, the old head aside)."""
    kinds = []
    for k in range(1, 12):
        case = tmp_path / f"k{k}"
        case.mkdir()
        head_dir = _fresh(world, case)
        p = _spawn(world["store"], head_dir, seed=1, KILL_AT_REPLACE=str(k))
        _, err = p.communicate(timeout=300)
        assert p.returncode in (0, -signal.SIGKILL), err.decode()
        kinds.append(_check(world, head_dir, case))
        if p.returncode == 0:
            break
    else:
        pytest.fail("train-head never finished: more than 10 renames?")
    assert kinds[-1] == "new" and len(kinds) >= 3, kinds       # at least the swap's two renames


def test_sigkill_at_random_moments(world: dict, tmp_path: Path) -> None:
    rng = random.Random(11)
    budget = time.monotonic() + 20.0
    kinds = []
    for i in range(6):
        if time.monotonic() > budget - world["seconds"]:
            break
        case = tmp_path / f"r{i}"
        case.mkdir()
        head_dir = _fresh(world, case)
        p = _spawn(world["store"], head_dir, seed=1)
        time.sleep(rng.uniform(0.3, 1.0) * world["seconds"])
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=300)
        kinds.append(_check(world, head_dir, case))
    assert kinds, "no time for a single run"

"""Bad input, tried as a hostile user would: each case gets exit status 2, one line on stderr
naming the file or value, and the store's committed rows are unchanged afterwards.

The commands run in-process through click's runner (a subprocess per case would spend most of
its time importing torch); a traceback escaping the CLI shows up as a non-2 exit or as more
than one line.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedstore.extract.runner import ExtractConfig, extract
from embedstore.store import open_store

from clirun import run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX = "mobilenetv2-onnx-int8"


def fingerprint(store: Path) -> str:
    """What a committed store holds: its live keys and their embeddings, hashed."""
    s = open_store(store)
    keys = s.keys()
    h = hashlib.sha256("\n".join(keys).encode())
    if keys:
        h.update(np.ascontiguousarray(s.get(keys)).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    store = d / "lung"
    res = extract([SAMPLE / "lung"], ExtractConfig(store=store, backbone=ONNX, progress=False,
                                                   num_workers=0, num_threads=1, files_per_unit=32))
    assert res.exit_code == 0 and res.tiles_written == 60
    code, out, err = run("index", store, "--kind", "flat")
    assert code == 0, err
    head = d / "head"
    code, out, err = run("train-head", store, "--task", "lung", "--split", "kfold:3", "--seeds", "1",
                         "--epochs", "5", "--out", head)
    assert code == 0, err
    text = d / "notes.png"
    text.write_text("not an image at all\n")
    garbage = d / "weights.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + b"\x00" * 64)
    return {"dir": d, "store": store, "head": head, "text": text, "garbage": garbage}


def _crafted_head(world: dict[str, Path], name: str, **changes: object) -> Path:
    dst = world["dir"] / name
    if not dst.exists():
        shutil.copytree(world["head"], dst)
        meta = json.loads((dst / "head.json").read_text())
        for k, v in changes.items():
            if k in meta.get("config", {}):
                meta["config"][k] = v
            else:
                meta[k] = v
        (dst / "head.json").write_text(json.dumps(meta))
    return dst


def _crafted_index(world: dict[str, Path], name: str, damage: str) -> Path:
    """A copy of the world's store whose index is damaged: ``truncated`` or ``garbage`` faiss
    bytes, or an index.json whose ``file`` is ``../STORE.json`` or the absolute path of the
    world's own (valid) faiss file, so only the name check stands between faiss and it."""
    dst = world["dir"] / name
    if not dst.exists():
        shutil.copytree(world["store"], dst)
        info_path = dst / "index" / "index.json"
        meta = json.loads(info_path.read_text())
        faiss_file = dst / "index" / meta["file"]
        data = faiss_file.read_bytes()
        if damage == "truncated":
            faiss_file.write_bytes(data[: len(data) // 3])
        elif damage == "garbage":
            faiss_file.write_bytes(np.random.default_rng(0).bytes(len(data)))
        else:
            meta["file"] = {"escape": "../STORE.json",
                            "absolute": str(world["store"] / "index" / meta["file"])}[damage]
            info_path.write_text(json.dumps(meta))
    return dst


# (case id, argv builder, text the one-line message must contain)
EXTRACT = ["extract", "{lung}", "--store", "{new}", "--backbone", ONNX]
CASES = [
    ("views-negative", EXTRACT + ["--views", "-1"], "--views"),
    ("views-zero", EXTRACT + ["--views", "0"], "--views"),
    ("batch-size-zero", EXTRACT + ["--batch-size", "0"], "--batch-size"),
    ("batch-size-negative", EXTRACT + ["--batch-size", "-1"], "--batch-size"),
    ("rows-per-shard-zero", EXTRACT + ["--rows-per-shard", "0"], "--rows-per-shard"),
    ("rows-per-shard-negative", EXTRACT + ["--rows-per-shard", "-5"], "--rows-per-shard"),
    ("tile-size-zero", EXTRACT + ["--tile-size", "0"], "--tile-size"),
    ("min-tissue-negative", EXTRACT + ["--min-tissue", "-1"], "--min-tissue"),
    ("files-per-unit-zero", EXTRACT + ["--files-per-unit", "0"], "--files-per-unit"),
    ("files-per-unit-negative", EXTRACT + ["--files-per-unit", "-3"], "--files-per-unit"),
    ("threads-negative", EXTRACT + ["--threads", "-1"], "--threads"),
    ("workers-negative", EXTRACT + ["--workers", "-1"], "--workers"),
    ("slide-mpp-zero", EXTRACT + ["--slide-mpp", "0"], "--slide-mpp"),
    ("weights-and-random-init", ["extract", "{lung}", "--store", "{new}", "--backbone", "resnet18",
                                 "--weights", "{garbage}", "--random-init"], "random"),
    ("crafted-weights", ["extract", "{lung}", "--store", "{new}", "--backbone", "resnet18",
                         "--weights", "{garbage}"], "weights.safetensors"),
    ("predict-batch-size-zero", ["predict", "{store}", "--head", "{head}", "--out", "{out}",
                                 "--batch-size", "0"], "--batch-size"),
    ("predict-batch-size-negative", ["predict", "{store}", "--head", "{head}", "--out", "{out}",
                                     "--batch-size", "-1"], "--batch-size"),
    ("search-image-not-an-image", ["search", "{store}", "--image", "{text}"], "notes.png"),
    ("head-hidden-huge", ["predict", "{store}", "--head", "{head_huge}", "--out", "{out}"], "hidden"),
    ("head-dim-negative", ["predict", "{store}", "--head", "{head_negdim}", "--out", "{out}"], "dim"),
    # --devices is parsed before any process starts or any file is written
    ("devices-empty", EXTRACT + ["--devices", ""], "--devices"),
    ("devices-bogus", EXTRACT + ["--devices", "cpu,bogus"], "bogus"),
    ("devices-no-such-gpu", EXTRACT + ["--devices", "cuda:9"], "cuda:9"),
    # other numbers with a range
    ("search-k-zero", ["search", "{store}", "--key", "{key}", "-k", "0"], "-k"),
    ("index-target-recall-above-1", ["index", "{store}", "--target-recall", "1.5"], "--target-recall"),
    ("train-head-hidden-zero", ["train-head", "{store}", "--task", "lung", "--head", "mlp", "--hidden", "0",
                                "--out", "{new}"], "--hidden"),
    ("train-head-lr-zero", ["train-head", "{store}", "--task", "lung", "--lr", "0", "--out", "{new}"], "--lr"),
    ("select-folds-one", ["select", "--proxy", "{lung}", "--backbone", ONNX, "--folds", "1", "--out", "{new}"],
     "--folds"),
    ("view-seed-not-a-number", EXTRACT + ["--views", "2", "--view-seed", "x"], "--view-seed"),
    # index files: damaged faiss bytes (item 9), index.json naming a path (item 13)
    ("index-truncated", ["search", "{store_truncated}", "--key", "{key}"], ".faiss"),
    ("index-garbage", ["search", "{store_garbage}", "--key", "{key}"], ".faiss"),
    ("index-file-escapes", ["search", "{store_escape}", "--key", "{key}"], "'../STORE.json'"),
    ("index-file-absolute", ["search", "{store_absolute}", "--key", "{key}"], "not a plain"),
    ("index-update-file-escapes", ["index", "{store_escape}", "--update"], "'../STORE.json'"),
]


@pytest.mark.parametrize("case, argv, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(world: dict[str, Path], tmp_path: Path,
                                                       case: str, argv: list[str], names: str) -> None:
    before = fingerprint(world["store"])
    fill = {"lung": SAMPLE / "lung", "new": tmp_path / "new", "store": world["store"],
            "head": world["head"], "out": tmp_path / "p.arrow", "text": world["text"],
            "garbage": world["garbage"],
            "head_huge": _crafted_head(world, "head_huge", hidden=100_000_000, kind="mlp"),
            "head_negdim": _crafted_head(world, "head_negdim", dim=-5),
            "key": open_store(world["store"]).keys()[0],
            **{f"store_{d}": _crafted_index(world, f"store_{d}", d)
               for d in ("truncated", "garbage", "escape", "absolute")}}
    code, out, err = run(*[a.format(**fill) for a in argv])
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, (case, code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, (case, err)
    assert names in lines[0], (case, lines[0])
    assert fingerprint(world["store"]) == before
    assert not (tmp_path / "p.arrow").exists()
    new = tmp_path / "new"
    assert not (new / "STORE.json").exists(), f"{case}: a store was written for a refused run"


@pytest.mark.parametrize("damage", ["truncated", "escape"])
def test_a_refused_index_is_rebuilt_by_the_command_the_message_names(world: dict[str, Path],
                                                                     damage: str) -> None:
    store = _crafted_index(world, f"store_rebuild_{damage}", damage)
    key = open_store(store).keys()[0]
    code, out, err = run("search", store, "--key", key)
    assert code == 2 and f"rebuild with `embedstore index {store}`" in err, err
    code, out, err = run("index", store, "--kind", "flat")
    assert code == 0, err
    code, out, err = run("search", store, "--key", key, "-k", "1", "--json")
    assert code == 0 and json.loads(out)[0]["keys"] == [key], err
    assert (store / "STORE.json").exists()       # '../STORE.json' was named, never read or removed
    assert fingerprint(store) == fingerprint(world["store"])

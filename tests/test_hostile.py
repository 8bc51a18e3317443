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
from click.testing import CliRunner

from embedstore.cli import main
from embedstore.extract.runner import ExtractConfig, extract
from embedstore.store import open_store

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX = "mobilenetv2-onnx-int8"


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    return r.exit_code, r.stdout, r.stderr


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
]


@pytest.mark.parametrize("case, argv, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(world: dict[str, Path], tmp_path: Path,
                                                       case: str, argv: list[str], names: str) -> None:
    before = fingerprint(world["store"])
    fill = {"lung": SAMPLE / "lung", "new": tmp_path / "new", "store": world["store"],
            "head": world["head"], "out": tmp_path / "p.arrow", "text": world["text"],
            "garbage": world["garbage"],
            "head_huge": _crafted_head(world, "head_huge", hidden=100_000_000, kind="mlp"),
            "head_negdim": _crafted_head(world, "head_negdim", dim=-5)}
    code, out, err = run(*[a.format(**fill) for a in argv])
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, (case, code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, (case, err)
    assert names in lines[0], (case, lines[0])
    assert fingerprint(world["store"]) == before
    assert not (tmp_path / "p.arrow").exists()
    new = tmp_path / "new"
    assert not (new / "STORE.json").exists(), f"{case}: a store was written for a refused run"

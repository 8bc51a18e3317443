"""How the CLI fails: an EmbedstoreError is one line and exit 2; any other exception is one line
naming the command and the exception and pointing to --debug, also exit 2; --debug adds the
traceback; a usage error (a value out of its range, an unknown option) is one line naming the
option and value, exit 2, and --help is click's own; exit 1 means only "completed with errors".

Commands run in-process through click's runner (a subprocess per case would mostly import torch).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_units  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX = "mobilenetv2-onnx-int8"
TILE = sorted((SAMPLE / "lung" / "lung_n").glob("*.jpeg"))[0]


def run(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    st = d / "st"
    write_units(st, [0, 1, 2])
    (d / "weights.pt").write_bytes(b"this is no checkpoint")
    (d / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + b"\x00" * 64)
    (d / "model.onnx").write_bytes(b"not a protobuf at all")
    (d / "notes.png").write_text("not an image\n")
    (d / "bad.npy").write_bytes(b"not numpy")
    np.save(d / "cube.npy", np.ones((2, 3, 16), np.float32))
    np.save(d / "words.npy", np.array(["a"] * 16))
    return {"dir": d, "st": st, **{p.stem.replace(".", "_"): p for p in d.iterdir() if p.is_file()}}


def test_weights_with_random_init_is_one_line_and_debug_shows_the_traceback(files: dict[str, Path]) -> None:
    argv = ["extract", SAMPLE / "lung", "--store", files["dir"] / "new", "--backbone", "resnet18",
            "--weights", files["weights"], "--random-init"]
    code, out, err = run(*argv)
    assert code == 2 and "--weights" in one_line(err) and "--random-init" in one_line(err), err
    code, out, err = run("--debug", *argv)
    assert code == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("error: --weights and --random-init")
    assert not (files["dir"] / "new" / "STORE.json").exists()


def test_an_unexpected_exception_names_the_command_and_points_to_debug(
        files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import embedstore.store

    def broken(path: object) -> None:
        raise TypeError("something inside went wrong\non two lines")
    monkeypatch.setattr(embedstore.store, "open_store", broken)
    code, out, err = run("info", files["st"])
    line = one_line(err)
    assert code == 2 and line.startswith("error: info failed unexpectedly: TypeError: something "
                                         "inside went wrong on two lines")
    assert "embedstore --debug info" in line
    code, out, err = run("--debug", "info", files["st"])
    assert code == 2 and "Traceback" in err and "broken" in err


# previously each printed a traceback (and exited 1); now: one line naming the file or value
MISUSES = [
    ("weights-garbage-safetensors", ["extract", "{lung}", "--store", "{new}", "--backbone", "resnet18",
                                     "--weights", "{garbage}"], "garbage.safetensors"),
    ("onnx-not-a-model", ["extract", "{lung}", "--store", "{new}", "--backbone", "{onnx}"], "model.onnx"),
    ("devices-bogus", ["extract", "{lung}", "--store", "{new}", "--backbone", "resnet18", "--random-init",
                       "--devices", "bogus"], "bogus"),
    ("vector-not-npy", ["search", "{st}", "--vector", "{bad}"], "bad.npy"),
    ("vector-3d", ["search", "{st}", "--vector", "{cube}"], "(2, 3, 16)"),
    ("vector-of-words", ["search", "{st}", "--vector", "{words}"], "numbers"),
    ("image-not-an-image", ["search", "{st}", "--image", "{notes}"], "notes.png"),
    ("image-on-a-store-of-a-foreign-spec", ["search", "{st}", "--image", "{tile}"], "synthetic"),
    ("heatmap-of-an-unknown-slide", ["search", "{st}", "--key", "slide000.svs/0_0",
                                     "--slide-heatmap", "nosuch.svs"], "nosuch.svs"),
]


@pytest.mark.parametrize("case, argv, word", MISUSES, ids=[c[0] for c in MISUSES])
def test_misuse_is_one_line_exit_2(files: dict[str, Path], tmp_path: Path, case: str,
                                   argv: list[str], word: str) -> None:
    fill = {"lung": SAMPLE / "lung", "new": tmp_path / "new", "st": files["st"], "tile": TILE,
            "garbage": files["garbage"], "onnx": files["model"], "bad": files["bad"],
            "cube": files["cube"], "words": files["words"], "notes": files["notes"]}
    code, out, err = run(*[a.format(**fill) for a in argv])
    line = one_line(err)
    assert code == 2 and line.startswith("error: ") and word in line, (case, line)
    assert "unexpectedly" not in line, (case, line)
    assert not (tmp_path / "new" / "STORE.json").exists()


def test_usage_errors_keep_clicks_exit_2(files: dict[str, Path]) -> None:
    code, out, err = run("info")
    assert code == 2 and "Missing argument 'STORE'" in err
    code, out, err = run("no-such-command")
    assert code == 2 and "No such command" in err


USAGE = [
    (["extract", "{lung}", "--store", "{new}", "--backbone", ONNX, "--views", "-1"],
     "error: --views: -1 is not in the range x>=1"),
    (["extract", "{lung}", "--store", "{new}", "--backbone", ONNX, "--target-mpp", "-0.5"],
     "error: --target-mpp: -0.5 is not in the range x>0.0"),
    (["search", "{st}", "--key", "k", "-k", "zero"], "error: -k: 'zero' is not a valid integer range"),
    (["train-head", "{st}", "--dropout", "1"], "error: --dropout: 1.0 is not in the range 0.0<=x<1.0"),
    (["train-head", "{st}", "--hidden", "70000"], "error: --hidden: 70000 is not in the range 1<=x<=65536"),
    (["select", "--proxy", "{lung}", "--backbone", ONNX, "--workers", "-2"],
     "error: --workers: -2 is not in the range x>=0"),
    (["extract", "{lung}", "--store", "{new}", "--backbone", ONNX, "--precision", "fp8"],
     "error: --precision: 'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
    (["--bogus"], "error: No such option '--bogus'; see `embedstore --help`"),
    (["info", "{st}", "--bogus"], "error: No such option '--bogus'; see `embedstore info --help`"),
    (["extract", "{lung}", "--backbone", ONNX], "error: Missing option '--store'; see `embedstore extract --help`"),
]


@pytest.mark.parametrize("argv, line", USAGE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USAGE])
def test_usage_errors_are_one_line_naming_the_option_and_value(files: dict[str, Path], tmp_path: Path,
                                                               argv: list[str], line: str) -> None:
    """Before: click's usage block, a 'Try --help' line and 'Error: Invalid value for ...'."""
    fill = {"lung": SAMPLE / "lung", "new": tmp_path / "new", "st": files["st"]}
    code, out, err = run(*[a.format(**fill) for a in argv])
    assert code == 2 and one_line(err) == line and out == ""
    assert not (tmp_path / "new").exists()


def test_help_is_clicks_own_and_shows_the_ranges() -> None:
    code, out, err = run("extract", "--help")
    assert code == 0 and err == "" and out.startswith("Usage: ")
    assert "--views K" in out and "[x>=1]" in out and "[x>=0]" in out and "0.0<=x<=1.0" in out
    code, out, err = run()                               # bare `embedstore`: the group's help
    assert code == 2 and err.startswith("Usage: ") and "Commands:" in err


def test_exit_1_means_completed_with_errors(tmp_path: Path) -> None:
    src = tmp_path / "tiles" / "lung_n"
    src.mkdir(parents=True)
    for p in sorted((SAMPLE / "lung" / "lung_n").glob("*.jpeg"))[:3]:
        shutil.copy(p, src / p.name)
    (src / "broken.jpeg").write_bytes(b"\xff\xd8 truncated")
    code, out, err = run("extract", tmp_path / "tiles", "--store", tmp_path / "st", "--backbone", ONNX,
                         "--workers", "0", "--threads", "1", "--quiet")
    assert code == 1, err
    code, out, err = run("errors", tmp_path / "st")
    assert code == 0 and "broken.jpeg" in out

"""Extraction under hostile conditions (issue 11): a crash before the labels import, bad
configuration values, a huge image among small tiles, another folder's files under the same
keys, control characters in keys, and what a several-process run listens on."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from embedstore.errors import ConfigError, SourceError
from embedstore.extract.runner import ExtractConfig, extract
from embedstore.store import open_store, verify_store

ONNX = "mobilenetv2-onnx-int8"
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
LUNG = sorted((SAMPLE / "lung").rglob("*.jpeg"))
PCAM = sorted((SAMPLE / "pcam").rglob("*.jpg"))


def cfg(store: Path, **kw: Any) -> ExtractConfig:
    base: dict[str, Any] = dict(store=store, backbone=ONNX, progress=False, num_workers=0,
                                batch_size=8, num_threads=1)
    base.update(kw)
    return ExtractConfig(**base)


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedstore", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _folder(root: Path, files: dict[str, Path]) -> Path:
    for rel, src in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / rel)
    return root


# ------------------------------------------------------------------ 1: labels and a crash

def test_labels_are_imported_by_the_resume_after_a_crash_before_their_import(tmp_path: Path) -> None:
    src = _folder(tmp_path / "tiles", {f"{p.parent.name}/{p.name}": p for p in LUNG[::10]})
    st = tmp_path / "st"
    args = ["extract", str(src), "--store", str(st), "--backbone", ONNX, "--workers", "0",
            "--threads", "1", "--quiet"]
    env = dict(os.environ, EMBEDSTORE_CRASH_AT="before_labels")
    r = _cli(*args, env=env)
    assert r.returncode == -9, r.stdout + r.stderr                # killed after the last commit
    s = open_store(st)
    assert len(s) == 6 and "tiles" not in s.tasks()               # every unit done, no labels yet
    env.pop("EMBEDSTORE_CRASH_AT")
    r = _cli(*args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    s = open_store(st)
    assert s.tasks()["tiles"]["classes"] == {"lung_aca": 2, "lung_n": 2, "lung_scc": 2}
    keys = s.keys()
    assert list(s.labels(keys, task="tiles")) == [k.split("/")[0] for k in keys]
    assert verify_store(st).ok


# ------------------------------------------------------------------ 5: configuration

@pytest.mark.parametrize("field, value, message", [
    ("views", -1, "--views must be >= 1, got -1"),
    ("views", 0, "--views must be >= 1, got 0"),
    ("batch_size", 0, "--batch-size must be >= 1, got 0"),
    ("batch_size", -1, "--batch-size must be >= 1, got -1"),
    ("rows_per_shard", -5, "--rows-per-shard must be >= 1, got -5"),
    ("tile_size", 0, "--tile-size must be >= 1, got 0"),
    ("min_tissue", -1.0, "--min-tissue must be a fraction in [0, 1], got -1.0"),
    ("min_tissue", float("nan"), "--min-tissue must be a fraction in [0, 1], got nan"),
    ("files_per_unit", -3, "--files-per-unit must be >= 1, got -3"),
    ("files_per_unit", 0, "--files-per-unit must be >= 1, got 0"),
    ("num_threads", -1, "--threads must be >= 1, got -1"),
    ("num_workers", -1, "--workers must be >= 0, got -1"),
    ("slide_mpp", 0.0, "--slide-mpp must be > 0 (µm/px), got 0.0"),
    ("target_mpp", -0.5, "--target-mpp must be > 0 (µm/px), got -0.5"),
    ("weights", "w.safetensors", "--weights and --random-init exclude each other"),
    ("task", "a\nb", "--task must be a non-empty name without control characters"),
])
def test_bad_configuration_is_refused_before_anything_is_written(tmp_path: Path, field: str,
                                                                  value: Any, message: str) -> None:
    st = tmp_path / "st"
    extra = {"random_init": True, "backbone": "resnet18"} if field == "weights" else {}
    with pytest.raises(ConfigError) as info:
        extract([SAMPLE / "lung"], cfg(st, **{field: value, **extra}))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not st.exists()                                        # no STORE.json, nothing at all


def test_good_configuration_values_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    c = cfg(tmp_path / "st", views=1, batch_size=1, rows_per_shard=1, tile_size=1, min_tissue=0.0,
            files_per_unit=1, num_threads=1, num_workers=0, slide_mpp=0.1, target_mpp=0.1)
    assert c.min_tissue == 0.0 and cfg(tmp_path / "st", min_tissue=1.0).min_tissue == 1.0


# ------------------------------------------------------------------ 6: tile geometry

def test_tile_geometry_is_the_backbones_not_the_first_files(tmp_path: Path) -> None:
    src = tmp_path / "tiles" / "cls"
    src.mkdir(parents=True)
    big = np.full((5000, 5000, 3), 180, np.uint8)
    big[::50] = 40
    Image.fromarray(big).save(src / "000_big.jpeg", quality=80)   # sorts first
    for p in PCAM[:12]:
        shutil.copy(p, src / p.name)
    st = tmp_path / "st"
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "embedstore", "extract",
                        str(tmp_path / "tiles"), "--store", str(st), "--backbone", ONNX, "--workers", "0",
                        "--threads", "1", "--batch-size", "4", "--quiet", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr                   # the big image is an error
    lines = r.stdout.strip().splitlines()
    res, peak_kib = json.loads("\n".join(lines[:-1])), int(lines[-1])
    s = open_store(st)
    assert s.meta.tile == {"kind": "files", "tile_size": 224, "mpp": None}   # the backbone's input
    assert len(s) == 12 and res["tiles_written"] == 12
    [(unit, reason)] = res["errors"]
    assert unit.endswith("|cls/000_big.jpeg") and "5000x5000 px" in reason and "224 px" in reason
    assert peak_kib < 1_500_000, f"peak RSS {peak_kib / 1e6:.2f} GB"  # was > 10 GB at batch size 64


def test_explicit_tile_size_wins_and_a_store_keeps_its_geometry(tmp_path: Path) -> None:
    src = _folder(tmp_path / "tiles", {f"c/{p.name}": p for p in PCAM[:4]})
    st = tmp_path / "st"
    extract([src], cfg(st, tile_size=96, files_per_unit=2))
    assert open_store(st).meta.tile["tile_size"] == 96
    for p in PCAM[4:6]:
        shutil.copy(p, src / "c" / p.name)
    res = extract([src], cfg(st, files_per_unit=2))                  # no flag: the store's 96 px
    assert res.exit_code == 0 and res.tiles_written == 2
    assert open_store(st).meta.tile["tile_size"] == 96


# ------------------------------------------------------------------ 7: same keys, other files

def test_other_files_under_existing_keys_are_errors_naming_both(tmp_path: Path) -> None:
    first = {f"cls/t{i}.jpeg": LUNG[i] for i in range(5)}
    other = {f"cls/t{i}.jpeg": LUNG[30 + i] for i in range(5)}     # same names, other pixels
    a = _folder(tmp_path / "a" / "set1", first)
    st = tmp_path / "st"
    assert extract([a], cfg(st)).exit_code == 0
    before = open_store(st).get([f"cls/t{i}.jpeg" for i in range(5)])
    # another folder name: other units, keys already in the store
    b = _folder(tmp_path / "b" / "set2", other)
    res = extract([b], cfg(st))
    assert res.exit_code == 1 and res.tiles_written == 0 and res.tiles_skipped == 0
    assert len(res.errors) == 5
    for (unit, reason), i in zip(sorted(res.errors), range(5)):
        assert unit.endswith(f"|cls/t{i}.jpeg")
        assert str(b / f"cls/t{i}.jpeg") in reason and str(a / f"cls/t{i}.jpeg") in reason
    assert "set2" not in open_store(st).tasks()                      # no labels on set1's rows
    # the same folder name elsewhere: its units are the ones done, still checked
    c = _folder(tmp_path / "c" / "set1", other)
    res = extract([c], cfg(st))
    assert res.exit_code == 1 and len(res.errors) == 5 and res.tiles_written == 0
    assert all(str(c) in r and str(a) in r for _, r in res.errors)
    s = open_store(st)
    assert s.tasks()["set1"]["n"] == 5
    np.testing.assert_array_equal(s.get([f"cls/t{i}.jpeg" for i in range(5)]), before)
    # a copy of the first folder elsewhere is the same content: nothing to report
    d = _folder(tmp_path / "d" / "set3", first)
    res = extract([d], cfg(st))
    assert res.exit_code == 0 and res.tiles_skipped == 5 and res.errors == []
    assert open_store(st).tasks()["set3"]["n"] == 5


def test_finished_units_record_the_fingerprint_of_every_file(tmp_path: Path) -> None:
    from embedstore.extract.fingerprint import file_fingerprint
    a = _folder(tmp_path / "a", {f"cls/t{i}.jpeg": LUNG[i] for i in range(3)})
    st = tmp_path / "st"
    extract([a], cfg(st))
    [rec] = open_store(st).units().values()
    assert rec["root"] == str(a.resolve())
    assert rec["files"] == {f"cls/t{i}.jpeg": file_fingerprint(LUNG[i]) for i in range(3)}
    assert file_fingerprint(LUNG[0]).startswith(f"{LUNG[0].stat().st_size}:")


# ------------------------------------------------------------------ 11: keys

def test_file_names_with_control_characters_are_errors_and_never_keys(tmp_path: Path) -> None:
    src = _folder(tmp_path / "tiles", {"c/good0.jpeg": LUNG[0], "c/good1.jpeg": LUNG[1],
                                       "c/new\nline.jpeg": LUNG[2], "c/tab\there.jpeg": LUNG[3]})
    st = tmp_path / "st"
    res = extract([src], cfg(st))
    assert res.exit_code == 1 and res.tiles_written == 2
    s = open_store(st)
    assert sorted(s.keys()) == ["c/good0.jpeg", "c/good1.jpeg"]
    errs = s.errors()
    assert len(errs) == 2 and all("\n" not in k + e["reason"] and "\t" not in k + e["reason"]
                                  for k, e in errs.items())
    assert any(k.endswith("|c/new\\nline.jpeg") for k in errs)
    assert s.tasks()["tiles"]["n"] == 2


@pytest.mark.parametrize("row, what", [('"a\nb.jpeg",x', "path"), ("a\tb.jpeg,x", "path"),
                                       ("t0.jpeg,x\x1by", "label")])
def test_csv_rows_with_control_characters_are_refused(tmp_path: Path, row: str, what: str) -> None:
    shutil.copy(LUNG[0], tmp_path / "t0.jpeg")
    (tmp_path / "m.csv").write_text("path,label\n" + row + "\n")
    with pytest.raises(SourceError, match=f"line 2: {what} .* holds the control character") as info:
        extract([tmp_path / "m.csv"], cfg(tmp_path / "st"))
    assert "\n" not in str(info.value) and not (tmp_path / "st").exists()


def test_csv_paths_are_normalised(tmp_path: Path) -> None:
    _folder(tmp_path, {"tiles/x.jpeg": LUNG[0], "tiles/y.jpeg": LUNG[1]})
    (tmp_path / "m.csv").write_text("path,label\n./tiles/x.jpeg,a\ntiles//y.jpeg,b\n")
    st = tmp_path / "st"
    assert extract([tmp_path / "m.csv"], cfg(st)).tiles_written == 2
    assert sorted(open_store(st).keys()) == ["tiles/x.jpeg", "tiles/y.jpeg"]
    (tmp_path / "twice.csv").write_text("path,label\n./tiles/x.jpeg,a\ntiles/x.jpeg,a\n")
    with pytest.raises(SourceError, match=r"line 3: path 'tiles/x.jpeg' listed twice \(line 2: "
                                          r"'./tiles/x.jpeg' names the same file\)"):
        extract([tmp_path / "twice.csv"], cfg(tmp_path / "st2"))


# ------------------------------------------------------------------ 3: two runs, one source

def _shard_rows(store: Path) -> int:
    import pyarrow as pa
    total = 0
    for f in sorted((store / "shards").glob("*.arrow")):
        if f.name.endswith(".v.arrow"):
            continue
        with pa.memory_map(str(f)) as src:
            total += pa.ipc.open_file(src).read_all().num_rows
    return total


def test_two_runs_over_one_source_store_each_row_once_and_report_what_they_committed(
        tmp_path: Path) -> None:
    st = tmp_path / "st"
    args = [sys.executable, "-m", "embedstore", "extract", str(SAMPLE / "lung"), "--store", str(st),
            "--backbone", ONNX, "--files-per-unit", "4", "--batch-size", "2", "--workers", "0",
            "--threads", "1", "--quiet", "--json"]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in runs]
    for p, (out, err) in zip(runs, outs):
        assert p.returncode == 0, out + err
    reports = [json.loads(out) for out, _ in outs]
    assert len(open_store(st)) == 60
    assert _shard_rows(st) == 60                                  # no duplicate row on disk
    assert sum(r["tiles_written"] for r in reports) == 60, reports   # each says what it committed
    assert all(not r["errors"] for r in reports)
    assert verify_store(st).ok
    from embedstore.store import journal                          # the labels task is journaled
    labels = [e for e in journal.read(st) if e["op"] == "labels" and e["task"] == "lung"]
    assert labels and len(labels[-1]["rows"]) == 60 == labels[-1]["record"]["n"]


# ------------------------------------------------------------------ 14: sockets

def _descendants(pid: int) -> set[int]:
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        todo += kids
    return out


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets ``pid`` has open in the LISTEN state."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    out = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:
                host, port = f[1].split(":")
                out.add((str(_address(host)), int(port, 16)))
    return out


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def test_two_processes_listen_on_the_loopback_only(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "embedstore", "extract", str(SAMPLE / "lung"), "--store",
                          str(tmp_path / "st"), "--backbone", ONNX, "--devices", "cpu,cpu",
                          "--files-per-unit", "2", "--batch-size", "1", "--workers", "0", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int]] = set()
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        for pid in _descendants(p.pid):
            seen |= _listening(pid)
        time.sleep(0.05)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, out + err
    assert seen, "no listening socket seen: the run's c10d store should listen"
    assert all(_loopback(a) for a, _ in seen), f"listening beyond the loopback: {sorted(seen)}"
    assert len(open_store(tmp_path / "st")) == 60


def test_loopback_interface_is_named() -> None:
    from embedstore.extract.parallel import loopback_interface
    assert loopback_interface().startswith("lo")


def test_two_processes_resolve_no_name(tmp_path: Path) -> None:
    """No DNS query and no hosts/resolver file read (traced with strace where it runs)."""
    strace = shutil.which("strace")
    if strace is None or subprocess.run([strace, "-f", "-o", os.devnull, "true"],
                                        capture_output=True).returncode != 0:
        pytest.skip("strace is not available here")
    src = _folder(tmp_path / "tiles", {f"c/{p.name}": p for p in LUNG[:4]})
    trace = tmp_path / "trace.txt"
    r = subprocess.run([strace, "-f", "-e", "trace=connect,sendto,openat", "-o", str(trace), sys.executable,
                        "-m", "embedstore", "extract", str(src), "--store", str(tmp_path / "st"), "--backbone",
                        ONNX, "--devices", "cpu,cpu", "--files-per-unit", "1", "--workers", "0", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = trace.read_text().splitlines()
    assert not [c for c in calls if "htons(53)" in c], "a DNS query was sent"
    assert not [c for c in calls if '"/etc/resolv.conf"' in c or '"/etc/hosts"' in c]

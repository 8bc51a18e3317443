#!/usr/bin/env python
"""Store writes against a plain ``np.save`` of the same array (fsync included in both).

    .venv/bin/python benchmarks/bench_write.py                       # 1,000,000 x 768 float16 (1.5 GB)
    .venv/bin/python benchmarks/bench_write.py --rows 100000 --repeats 1
    .venv/bin/python benchmarks/bench_write.py --before /tmp/head_src  # + the writer of another tree
    .venv/bin/python benchmarks/bench_write.py --profile              # where a store write's time goes

The same synthetic float16 embeddings (``--rows`` x ``--dim``, slides of ``--slide-rows``
tiles, keys ``slide_0001/x_y``, level-0 x, y on a 224 px grid) are written three ways,
``--repeats`` times each in rotating order after ``--warmup`` untimed rounds, all in one worker process per source tree (the data
made once; every output deleted before each write, so each finds the page cache the last one
freed):

* **np.save + fsync**: the whole (rows, dim) array, fsync of the file and its folder: the
  baseline (what the disk and the page cache allow);
* **store, extract**: ``StoreWriter.add`` in ``--batch`` rows as extraction gives them (keys and
  x, y as Python lists, slide, source, level, tile_size, mpp as scalars), ``end_unit`` per
  slide, through ``close`` (the last shard sealed, fsynced and committed);
* **store, import-h5**: one ``add`` per slide as ``import-h5`` gives it (x, y as int64 arrays).

With ``--before SRC`` a second worker does the same through the ``embedstore`` package under
``SRC`` (e.g. ``mkdir SRC && git archive HEAD embedstore | tar -x -C SRC``), rows "before".
Each row gives the median wall seconds, GB/s of embedding bytes, the ratio to np.save's median
in the same process (target: >= 0.5), best against best, and CPU seconds (user + system, every
thread: on a shared machine they show the work a write costs when the wall clock mostly shows
the neighbours). Also the raw speed of each shard checksum on the same bytes (sha256, crc32,
blake3, xxh3_128, where installed). Data is generated before the clock starts. Scratch goes
under ``--scratch`` (removed at the end); results to ``benchmarks/results/bench_write-*.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
NAME = "bench_write"
TARGET = 0.5


def slide_name(i: int) -> str:
    return f"slide_{i:04d}"


def make_data(rows: int, dim: int, slide_rows: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per slide: name, embeddings (n, dim) float16 (finite random bits), coords (n, 2) int64."""
    out = []
    for i, a in enumerate(range(0, rows, slide_rows)):
        n = min(slide_rows, rows - a)
        bits = np.random.default_rng([seed, i]).integers(0, 1 << 16, size=(n, dim), dtype=np.uint16)
        bits &= 0xBFFF
        j = np.arange(n, dtype=np.int64)
        out.append((slide_name(i), bits.view(np.float16), np.stack([(j % 128) * 224, (j // 128) * 224], 1)))
    return out


def keys_of(name: str, coords: np.ndarray) -> list[str]:
    return [f"{name}/{x}_{y}" for x, y in coords.tolist()]


# -- one write, in a worker process -----------------------------------------------------------
def cpu_s() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def write_npy(path: Path, emb: np.ndarray) -> tuple[float, float]:
    """Seconds (wall, CPU) to save ``emb`` and fsync it (and its folder)."""
    gc.collect()
    t0, c0 = time.perf_counter(), cpu_s()
    np.save(path, emb)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0, cpu_s() - c0


def write_store(path: Path, data: list[tuple[str, np.ndarray, np.ndarray]], how: str, batch: int,
                background: bool = True) -> tuple[float, float, dict[str, Any]]:
    """Seconds (wall, CPU) from opening a ``StoreWriter`` (which creates the store) through ``close``, and
    the writer's stats. ``how``: ``extract`` or ``import-h5`` (see the module docstring)."""
    from embedstore.store import StoreMeta, StoreWriter
    dim = data[0][1].shape[1]
    meta = StoreMeta(dim=dim, dtype="float16", backbone={"name": "synthetic-bench", "kind": "bench"},
                     tile={"tile_size": 224, "mpp": 0.5})
    # what the producer hands over is built before the clock starts, as it is upstream
    if how == "extract":
        calls = [(name, [(emb[a:a + batch], keys[a:a + batch], coords[a:a + batch, 0].tolist(),
                          coords[a:a + batch, 1].tolist()) for a in range(0, len(emb), batch)])
                 for name, emb, coords in data for keys in [keys_of(name, coords)]]
    else:
        calls = [(name, [(emb, keys_of(name, coords), coords[:, 0].copy(), coords[:, 1].copy())])
                 for name, emb, coords in data]
    gc.collect()
    t0, c0 = time.perf_counter(), cpu_s()
    with StoreWriter(path, meta, background=background) as w:
        for name, parts in calls:
            for emb, keys, xs, ys in parts:
                if how == "extract":
                    w.add(emb, keys, unit=name, slide=name, source="/data/slides", x=xs, y=ys, level=0,
                          tile_size=224, mpp=0.5)
                else:
                    w.add(emb, keys, unit=name, slide=name, source="/data/h5", x=xs, y=ys, tile_size=224,
                          mpp=0.5)
            w.end_unit(name)
    return time.perf_counter() - t0, cpu_s() - c0, dict(w.stats)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Every variant of ``spec`` (npy and the store's patterns) ``repeats`` times in rotation,
    in this one process (the data made once), each output deleted just before its next run."""
    if spec.get("src"):
        sys.path.insert(0, spec["src"])
    import embedstore
    data = make_data(spec["rows"], spec["dim"], spec["slide_rows"], spec["seed"])
    whole = np.concatenate([e for _, e, _ in data])
    scratch = Path(spec["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"embedstore": str(Path(embedstore.__file__).parent), "runs": {}}
    hows = spec["hows"]
    for r in range(-spec["warmup"], spec["repeats"]):
        for how in hows[r % len(hows):] + hows[:r % len(hows)]:
            target = scratch / ("emb.npy" if how == "npy" else "store")
            for old in scratch.iterdir():   # every write finds the pages the last one freed
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            stats: dict[str, Any] = {}
            if how == "npy":
                t, cpu = write_npy(target, whole)
            else:
                t, cpu, stats = write_store(target, data, how, spec["batch"])
            disk = sum(f.stat().st_size for f in ([target] if target.is_file() else target.rglob("*")) if f.is_file())
            if r >= 0:
                out["runs"].setdefault(how, []).append({"time": t, "cpu": cpu, "disk_bytes": disk, **stats})
            print(f"  {spec['label']:<7} {how:<10} {'warm-up' if r < 0 else f'run {r + 1}'}: {t:.2f} s, "
                  f"CPU {cpu:.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return out


# -- checksums ----------------------------------------------------------------------------------
def hash_speeds(nbytes: int = 512 << 20) -> list[dict[str, Any]]:
    import hashlib
    import zlib
    buf = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    chunks = [memoryview(buf.data)[a:a + (6 << 20)] for a in range(0, nbytes, 6 << 20)]
    kinds: dict[str, Any] = {"sha256": hashlib.sha256}
    try:
        import blake3
        kinds[f"blake3 {blake3.__version__}"] = blake3.blake3
    except ImportError:
        pass
    try:
        import xxhash
        kinds[f"xxh3_128 (xxhash {xxhash.VERSION})"] = xxhash.xxh3_128
    except ImportError:
        pass
    out = []
    for name, mk in kinds.items():
        best = float("inf")
        for _ in range(3):
            h, t0 = mk(), time.perf_counter()
            for c in chunks:
                h.update(c)
            h.hexdigest()
            best = min(best, time.perf_counter() - t0)
        out.append({"hash": name, "gbps": nbytes / best / 1e9})
    best = float("inf")
    for _ in range(3):
        crc, t0 = 0, time.perf_counter()
        for c in chunks:
            crc = zlib.crc32(c, crc)
        best = min(best, time.perf_counter() - t0)
    out.append({"hash": "crc32 (zlib)", "gbps": nbytes / best / 1e9})
    return out


# -- the orchestrating process ------------------------------------------------------------------
def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                       text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"worker {spec['label']} failed (exit {p.returncode})")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def profile(args: argparse.Namespace) -> None:
    """One store write (extract pattern) in this process, the writer's work in the calling
    thread (``background=False``: cProfile sees one thread), top functions by own time."""
    import cProfile
    import pstats
    if args.before:
        sys.path.insert(0, args.before)
    data = make_data(args.rows, args.dim, args.slide_rows, args.seed)
    target = Path(args.scratch) / "profile-store"
    shutil.rmtree(target, ignore_errors=True)
    pr = cProfile.Profile()
    pr.enable()
    t, _, stats = write_store(target, data, args.how, args.batch, background=False)
    pr.disable()
    print(f"store write {args.rows} x {args.dim}: {t:.2f} s "
          f"({args.rows * args.dim * 2 / t / 1e9:.2f} GB/s under the profiler), {stats}")
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--slide-rows", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=4096, help="rows per add() in the extract pattern")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (this VM is slow to "
                    "hand a process memory it has not touched before)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", default=str(HERE / "scratch" / NAME))
    ap.add_argument("--before", default=None, help="a source tree holding the embedstore to compare with")
    ap.add_argument("--how", default="extract", choices=["extract", "import-h5"], help="for --profile")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile(args)
        return
    sys.path.insert(0, str(HERE))
    import _harness as H
    base = {"rows": args.rows, "dim": args.dim, "slide_rows": args.slide_rows, "seed": args.seed,
            "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
            "hows": ["npy", "extract", "import-h5"]}
    trees = [("after", None)] + ([("before", str(Path(args.before).resolve()))] if args.before else [])
    nbytes = args.rows * args.dim * 2
    rows = []
    try:
        for label, src in trees:
            res = spawn({**base, "label": label, "src": src, "scratch": str(scratch / label)})
            runs = res["runs"]
            npy = {k: H.median(x[k] for x in runs["npy"]) for k in ("time", "cpu")}
            npy_best = min(x["time"] for x in runs["npy"])
            for how in base["hows"]:
                t = H.median(x["time"] for x in runs[how])
                best = min(x["time"] for x in runs[how])
                cpu = H.median(x["cpu"] for x in runs[how])
                store = how != "npy"
                rows.append({"code": label, "write": "np.save + fsync" if not store else f"store, {how}",
                             "seconds": t, "gbps": nbytes / t / 1e9, "ratio": npy["time"] / t,
                             "best_ratio": npy_best / best, "cpu_s": cpu, "cpu_ratio": npy["cpu"] / cpu,
                             "target": f">= {TARGET}" if store else "-",
                             "met": npy["time"] / t >= TARGET if store else None,
                             "disk_mb": runs[how][-1]["disk_bytes"] / 1e6,
                             "shards": runs[how][-1].get("shards"), "embedstore": res["embedstore"],
                             "runs_s": [x["time"] for x in runs[how]], "runs_cpu": [x["cpu"] for x in runs[how]]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    H.print_table(rows, [("code", "code", None), ("write", "write", None), ("seconds", "s", "num"),
                         ("gbps", "GB/s", "num"), ("ratio", "vs npy", "ratio"), ("best_ratio", "best vs best", "ratio"),
                         ("target", "target", None), ("met", "met", None),
                         ("cpu_s", "CPU s", "num"), ("cpu_ratio", "CPU vs npy", "ratio"),
                         ("disk_mb", "disk MB", "num"), ("shards", "shards", None)],
                  title=f"write {args.rows:,} x {args.dim} float16 ({nbytes / 1e9:.2f} GB), fsync included; "
                        f"median of {args.repeats} (ratios against np.save in the same process)")
    hashes = hash_speeds()
    H.print_table(hashes, [("hash", "checksum", None), ("gbps", "GB/s (one core)", "num")],
                  title="shard checksum, raw speed on 512 MiB")
    print(f"load average at the end: {os.getloadavg()} on {os.cpu_count()} cores (wall times need a quiet machine)")
    path = H.write_results(NAME, rows, {"config": base, "hashes": hashes, "repeats": args.repeats})
    print(f"results: {path}")


if __name__ == "__main__":
    main()

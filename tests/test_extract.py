"""Extraction on real tiles and a real slide: sources, keys, labels, views, errors, resume,
several processes, and agreement with the backbone run directly."""
from __future__ import annotations

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
from PIL import Image

from embedstore.errors import BackboneMismatchError
from embedstore.extract.runner import ExtractConfig, extract
from embedstore.store import open_store, verify_store

ONNX = "mobilenetv2-onnx-int8"
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


def cfg(store: Path, **kw) -> ExtractConfig:
    base = dict(store=store, backbone=ONNX, progress=False, num_workers=1, batch_size=32,
                num_threads=1)
    base.update(kw)
    return ExtractConfig(**base)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedstore", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def onnx_bb():
    from embedstore.backbones import create_backbone
    return create_backbone(ONNX, num_threads=1)


@pytest.fixture(scope="module")
def lung_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    st = tmp_path_factory.mktemp("lung") / "st"
    res = extract([SAMPLE / "lung"], cfg(st, files_per_unit=16))
    assert res.exit_code == 0 and res.tiles_written == 60
    return st


def test_folder_source_keys_labels_and_embeddings_match_the_backbone(lung_store: Path, onnx_bb) -> None:
    s = open_store(lung_store)
    keys = s.keys()
    files = sorted(p.relative_to(SAMPLE / "lung").as_posix() for p in (SAMPLE / "lung").rglob("*.jpeg"))
    assert sorted(keys) == files                                  # keys: paths relative to the folder
    assert s.tasks()["lung"]["classes"] == {"lung_aca": 20, "lung_n": 20, "lung_scc": 20}
    assert list(s.labels(keys[:3], task="lung")) == [k.split("/")[0] for k in keys[:3]]
    # the stored embedding is the backbone's, run directly on the decoded file (fp16 on disk)
    pick = [keys[0], keys[31], keys[59]]
    tiles = np.stack([np.asarray(Image.open(SAMPLE / "lung" / k).convert("RGB")) for k in pick])
    direct = onnx_bb.embed(tiles).numpy().astype(np.float16)
    np.testing.assert_array_equal(s.get(pick), direct)
    assert s.meta.backbone["name"] == ONNX and s.meta.weights_sha256 == onnx_bb.weights_sha256
    assert s.meta.tile == {"kind": "files", "tile_size": 224, "mpp": None}
    assert verify_store(lung_store).ok


def test_csv_source_with_split_and_96px_tiles(tmp_path: Path) -> None:
    st = tmp_path / "pcam"
    res = extract([SAMPLE / "pcam" / "labels.csv"], cfg(st, tile_size=96))   # the files' own size
    assert res.tiles_written == 200
    s = open_store(st)
    tab = s.task_table("pcam")
    assert set(tab["split"]) == {"train", "valid"} and set(tab["label"]) == {"normal", "tumor"}
    assert tab["keys"][0].startswith(("train/", "valid/"))       # as written in the CSV
    assert s.meta.tile["tile_size"] == 96 and s.dim == 1280


def test_whole_slide_tiles_keys_overlay_and_identity(tmp_path: Path) -> None:
    st = tmp_path / "slide"
    res = extract([SAMPLE / "wsi"], cfg(st, target_mpp=0.5))
    assert res.exit_code == 0
    s = open_store(st)
    from embedstore.extract.wsi import SlideReader, plan_slide
    with SlideReader(SAMPLE / "wsi" / "CMU-1-Small-Region.svs") as r:
        grid = plan_slide(r, 0.5, 224).grid
    assert len(s) == len(grid) > 20
    assert s.slides() == ["CMU-1-Small-Region.svs"]
    bag = s.slide("CMU-1-Small-Region.svs")
    assert bag.keys[0] == f"CMU-1-Small-Region.svs/{grid.x[0]}_{grid.y[0]}"
    np.testing.assert_array_equal(bag.coords[:, 0], grid.x)
    overlay = st / "masks" / "CMU-1-Small-Region.svs.overlay.png"
    assert overlay.exists() and str(overlay) in res.overlays
    unit = s.units()["slide:CMU-1-Small-Region.svs"]
    assert unit["identity"]["size"] == os.path.getsize(SAMPLE / "wsi" / "CMU-1-Small-Region.svs")
    assert s.meta.tile == {"kind": "slides", "tile_size": 224, "mpp": 0.5}
    # a second run does nothing
    again = extract([SAMPLE / "wsi"], cfg(st, target_mpp=0.5))
    assert again.tiles_written == 0 and again.units_skipped == 1


def test_slide_without_mpp_is_an_error_until_given(tmp_path: Path, shared_data: Path) -> None:
    src = tmp_path / "slides"
    src.mkdir()
    for name in ("TCGA-CR-7395-01A-01-TS1.svs", "CMU-1-Small-Region.svs"):
        shutil.copy(shared_data / "wsi" / name, src / name)
    st = tmp_path / "st"
    r = _cli("extract", str(src), "--store", str(st), "--backbone", ONNX, "--target-mpp", "1.0",
             "--quiet", "--workers", "1")
    assert r.returncode == 1, r.stderr                          # completed with errors
    errs = open_store(st).errors()
    assert "slide:TCGA-CR-7395-01A-01-TS1.svs" in errs
    assert "--slide-mpp" in errs["slide:TCGA-CR-7395-01A-01-TS1.svs"]["reason"]
    n_cmu = len(open_store(st))
    r = _cli("extract", str(src), "--store", str(st), "--backbone", ONNX, "--target-mpp", "1.0",
             "--slide-mpp", "0.5", "--quiet", "--workers", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    s = open_store(st)
    assert s.errors() == {} and len(s) > n_cmu
    assert "TCGA-CR-7395-01A-01-TS1.svs" in s.slides()


def test_bad_files_are_recorded_and_retried(tmp_path: Path) -> None:
    src = tmp_path / "tiles" / "cls"
    src.mkdir(parents=True)
    for p in sorted((SAMPLE / "lung" / "lung_n").glob("*.jpeg"))[:6]:
        shutil.copy(p, src / p.name)
    (src / "broken.jpeg").write_bytes(b"not a jpeg at all")
    st = tmp_path / "st"
    res = extract([tmp_path / "tiles"], cfg(st))
    assert res.exit_code == 1 and res.tiles_written == 6
    assert any("broken.jpeg" in u for u, _ in res.errors)
    assert "cls/broken.jpeg" not in open_store(st).keys()
    # fix the file: the re-run retries the failed unit and embeds only what is missing
    shutil.copy(sorted((SAMPLE / "lung" / "lung_n").glob("*.jpeg"))[7], src / "broken.jpeg")
    again = extract([tmp_path / "tiles"], cfg(st))
    assert again.exit_code == 0 and again.tiles_written == 1 and again.tiles_skipped == 6
    s = open_store(st)
    assert len(s) == 7 and s.errors() == {}


def test_other_backbone_is_refused(lung_store: Path) -> None:
    with pytest.raises(BackboneMismatchError):
        extract([SAMPLE / "lung"], cfg(lung_store, backbone="resnet18", random_init=True))
    r = _cli("extract", str(SAMPLE / "lung"), "--store", str(lung_store), "--backbone", "resnet18",
             "--random-init", "--quiet")
    assert r.returncode == 2 and "another backbone" in r.stderr and r.stderr.count("\n") == 1


def test_views_are_seeded_recorded_and_a_different_recipe_refused(tmp_path: Path) -> None:
    src = tmp_path / "tiles" / "a"
    src.mkdir(parents=True)
    for p in sorted((SAMPLE / "lung" / "lung_aca").glob("*.jpeg"))[:5]:
        shutil.copy(p, src / p.name)
    a, b = tmp_path / "a", tmp_path / "b"
    extract([tmp_path / "tiles"], cfg(a, views=3))
    extract([tmp_path / "tiles"], cfg(b, views=3, num_workers=0))
    sa, sb = open_store(a), open_store(b)
    va, vb = sa.views(), sb.views()
    assert len(va.ids) == 15 and sorted(set(va.view.tolist())) == [1, 2, 3]
    assert sa.meta.views["k"] == 3
    oa = np.lexsort((va.view, va.ids))
    ob = np.lexsort((vb.view, vb.ids))
    np.testing.assert_array_equal(va.gather(oa), vb.gather(ob))        # reproducible views
    base = sa.gather(va.ids[oa])
    cos = (va.gather(oa).astype(np.float32) * base.astype(np.float32)).sum(1) / (
        np.linalg.norm(va.gather(oa).astype(np.float32), axis=1) * np.linalg.norm(base.astype(np.float32), axis=1))
    assert 0.5 < cos.mean() < 0.999                                     # views differ, but not wildly
    with pytest.raises(BackboneMismatchError, match="recipe"):
        extract([tmp_path / "tiles"], cfg(a, views=2))
    # a store embedded without views gets exactly the same views added later
    c = tmp_path / "c"
    extract([tmp_path / "tiles"], cfg(c, files_per_unit=2))
    assert len(open_store(c).views().ids) == 0
    res = extract([tmp_path / "tiles"], cfg(c, views=3, files_per_unit=2))
    assert res.views_added == 5 and res.tiles_written == 0
    sc = open_store(c)
    vc = sc.views()
    oc = np.lexsort((vc.view, vc.ids))
    assert sc.meta.views == sa.meta.views
    np.testing.assert_array_equal(sc.keys_of(vc.ids[oc]), sa.keys_of(va.ids[oa]))
    np.testing.assert_array_equal(vc.gather(oc), va.gather(oa))
    assert extract([tmp_path / "tiles"], cfg(c, files_per_unit=2)).views_added == 0  # nothing left


def test_two_processes_equal_one(tmp_path: Path, lung_store: Path) -> None:
    st = tmp_path / "two"
    r = _cli("extract", str(SAMPLE / "lung"), "--store", str(st), "--backbone", ONNX,
             "--devices", "cpu,cpu", "--files-per-unit", "2", "--batch-size", "1", "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = open_store(lung_store), open_store(st)
    assert sorted(one.keys()) == sorted(two.keys())
    keys = one.keys()
    np.testing.assert_array_equal(one.get(keys), two.get(keys))
    writers = {rec.get("writer") for rec in _shard_records(st)}
    assert len(writers) == 2                                           # both processes committed
    assert verify_store(st).ok


@pytest.mark.parametrize("commit", ["direct", "staged"])
def test_torchrun_two_ranks_equal_one(tmp_path: Path, lung_store: Path, commit: str) -> None:
    """Two ranks under torchrun; "staged" is the multi-node design (rank 1 stages its commits
    as files, rank 0 alone writes the catalog), forced here on one machine."""
    st = tmp_path / "tr"
    env = dict(os.environ, OMP_NUM_THREADS="1", EMBEDSTORE_COMMIT=commit)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "embedstore", "extract", str(SAMPLE / "lung"), "--store", str(st),
                        "--backbone", ONNX, "--files-per-unit", "2", "--batch-size", "1", "--workers", "0",
                        "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("extracted into") == 1                       # rank 0 reports for all
    one, two = open_store(lung_store), open_store(st)
    keys = one.keys()
    assert sorted(keys) == sorted(two.keys())
    np.testing.assert_array_equal(one.get(keys), two.get(keys))
    assert verify_store(st).ok
    assert not list((st / "staged").glob("*.json")) if (st / "staged").exists() else True
    if commit == "staged":
        assert (st / "staged").is_dir()                                # rank 1 did stage
        assert len({rec.get("writer") for rec in _shard_records(st)}) == 2


def _shard_records(st: Path) -> list[dict]:
    s = open_store(st)
    return [rec for _, rec in s.cat.read(s.cat.shards_in_order)]


def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    args = ["--backbone", ONNX, "--files-per-unit", "10", "--workers", "1", "--quiet",
            "--threads", "1", "--rows-per-shard", "20", "--batch-size", "8"]
    src = str(SAMPLE / "pcam" / "labels.csv")
    assert _cli("extract", src, "--store", str(ref), *args).returncode == 0
    rs = open_store(ref)
    ref_keys = rs.keys()
    ref_emb = dict(zip(ref_keys, rs.get(ref_keys)))
    rng = random.Random(7)
    partial = 0
    for trial in range(3):
        st = tmp_path / f"st{trial}"
        for _ in range(2):
            p = subprocess.Popen([sys.executable, "-m", "embedstore", "extract", src, "--store", str(st), *args],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 120   # kill mid-run: once the first shards are committed
            while time.time() < deadline and p.poll() is None and not (
                    (st / "shards").is_dir() and any((st / "shards").iterdir())):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
            p.send_signal(signal.SIGKILL)
            p.wait()
            if (st / "STORE.json").exists():
                assert verify_store(st).ok
                partial += 0 < len(open_store(st)) < len(ref_keys)
        assert _cli("extract", src, "--store", str(st), *args).returncode == 0
        s = open_store(st)
        keys = s.keys()
        assert sorted(keys) == sorted(ref_keys) and len(set(keys)) == len(keys)
        got = s.get(keys)
        assert all(np.array_equal(got[j], ref_emb[k]) for j, k in enumerate(keys))   # bit-identical
        m1 = s.metadata(s.ids(keys), ("key", "label", "source"))
        m0 = rs.metadata(rs.ids(keys), ("key", "label", "source"))
        assert all((m1[c] == m0[c]).all() for c in m1)
    assert partial >= 1


def test_resume_under_bf16_autocast_agrees_with_uninterrupted(tmp_path: Path) -> None:
    """bf16 kernels may vary with batch composition, which a resume changes: every key once,
    the same metadata, and per key cosine >= 0.9999 with the uninterrupted run."""
    args = ["--backbone", "resnet18", "--random-init", "--precision", "bf16", "--dtype", "float32",
            "--files-per-unit", "6", "--rows-per-shard", "6", "--batch-size", "4", "--workers", "0",
            "--threads", "1", "--quiet"]
    src = str(SAMPLE / "lung")
    ref, st = tmp_path / "ref", tmp_path / "st"
    assert _cli("extract", src, "--store", str(ref), *args).returncode == 0
    p = subprocess.Popen([sys.executable, "-m", "embedstore", "extract", src, "--store", str(st), *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120

    def committed() -> int:       # a shard renamed into shards/ is committed a moment later
        try:
            return len(open_store(st)) if (st / "STORE.json").exists() else 0
        except Exception:          # the store is being created
            return 0

    while time.time() < deadline and p.poll() is None and committed() == 0:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert verify_store(st).ok and 0 < len(open_store(st)) < 60       # killed mid-run
    assert _cli("extract", src, "--store", str(st), *args).returncode == 0
    a, b = open_store(ref), open_store(st)
    keys = a.keys()
    assert sorted(b.keys()) == sorted(keys) and len(set(b.keys())) == len(keys) == 60
    x, y = a.get(keys).astype(np.float64), b.get(keys).astype(np.float64)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cos.min() >= 0.9999, cos.min()
    cols = ("key", "label", "source")
    m0, m1 = a.metadata(a.ids(keys), cols), b.metadata(b.ids(keys), cols)
    assert all((m0[c] == m1[c]).all() for c in m0)
    assert a.meta.backbone == b.meta.backbone


def test_bf16_autocast_agrees_with_fp32(tmp_path: Path) -> None:
    import torch
    from embedstore.backbones import create_backbone
    tiles = np.stack([np.asarray(Image.open(p).convert("RGB"))
                      for p in sorted((SAMPLE / "lung").rglob("*.jpeg"))[:8]])
    torch.manual_seed(0)
    fp32 = create_backbone("resnet18", random_init=True).embed(tiles).numpy()
    bf16 = create_backbone("resnet18", random_init=True, precision="bf16").embed(tiles).numpy()
    cos = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cos.min() > 0.99


def test_threaded_batch_decoding_equals_serial(tmp_path: Path) -> None:
    """workers=0 decodes a batch across threads: the same tiles, specs and errors, in order,
    even when the batch spans more slides than stay open (readers evicted mid-batch)."""
    from embedstore.extract.dataset import TileDataset, TileSpec
    from embedstore.extract.wsi import SlideReader, plan_slide
    cmu = SAMPLE / "wsi" / "CMU-1-Small-Region.svs"
    with SlideReader(cmu) as r:
        g = plan_slide(r, 0.5, 224).grid
    specs = []
    for i in range(5):
        copy = tmp_path / f"s{i}.svs"
        shutil.copy(cmu, copy)
        specs += [TileSpec(0, f"s{i}/{j}", str(copy), int(g.x[j]), int(g.y[j]), g.level, g.read_size,
                           g.read_size, 224) for j in range(0, len(g), 4)]
    files = sorted((SAMPLE / "lung").rglob("*.jpeg"))[:12]
    specs += [TileSpec(1, f.name, str(f), tile_size=224) for f in files]
    specs.insert(7, TileSpec(1, "gone.jpeg", str(tmp_path / "gone.jpeg"), tile_size=224))
    serial, threaded = TileDataset(max_open_slides=2), TileDataset(max_open_slides=2, decode_threads=4)
    a, b = serial.__getitems__(specs), threaded.__getitems__(specs)
    assert threaded._pool is not None and serial._pool is None
    assert [x[1] for x in b] == specs and [x[2] is None for x in b] == [x[2] is None for x in a]
    assert sum(x[2] is not None for x in b) == 1 and "gone.jpeg" in b[7][2]
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b) if x[0] is not None)
    assert len(threaded._slides) == 2 and not threaded._retired        # evicted ones closed
    serial.close()
    threaded.close()
    assert threaded._pool is None and not threaded._slides


def test_decode_threads_each_take_a_contiguous_run_and_decode_a_chunk_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neighbouring tiles share the slide's JPEG chunks: the threads of a batch each decode a
    contiguous run, so a chunk is decoded about once (handed out tile by tile, the threads
    decoded the same chunks side by side), and the tiles are the serial ones, in order."""
    from embedstore.extract.dataset import TileDataset, TileSpec
    from embedstore.extract.wsi import SlideReader, plan_slide
    from embedstore.extract.wsi import tiff as tiff_mod
    cmu = SAMPLE / "wsi" / "CMU-1-Small-Region.svs"
    with SlideReader(cmu) as r:
        assert r.backend == "tifffile"
        g = plan_slide(r, 0.5, 224).grid
    specs = [TileSpec(0, f"t{j}", str(cmu), int(g.x[j]), int(g.y[j]), g.level, g.read_size,
                      g.read_size, 224) for j in range(min(len(g), 64))]
    decoded: list[tuple[int, int]] = []
    orig = tiff_mod.TiffBackend._cached

    def counting(self: object, key: tuple[int, int], make: object) -> np.ndarray:
        def counted() -> np.ndarray:
            decoded.append(key)
            return make()  # type: ignore[operator]
        return orig(self, key, counted)  # type: ignore[arg-type]
    monkeypatch.setattr(tiff_mod.TiffBackend, "_cached", counting)
    one = TileDataset()
    serial = one.__getitems__(specs)
    one.close()
    once = len(decoded)
    assert once == len(set(decoded)) > len(specs) // 2
    worst = 0
    for _ in range(5):
        decoded.clear()
        threaded = TileDataset(decode_threads=4)
        got = threaded.__getitems__(specs)
        threaded.close()
        assert [x[1] for x in got] == specs
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(serial, got))
        worst = max(worst, len(decoded) - once)
    assert worst <= 3 * 4          # at most the chunks two runs share, at each of 3 boundaries


def test_threaded_decoding_under_concurrent_file_activity(tmp_path: Path) -> None:
    """Decode threads sharing one tifffile reader while another thread reads the same files
    (as the planner does). While tifffile built a page's decoder lazily, on first use by
    concurrent threads, about 1 fresh reader in 40 handed a tile wrong bytes (a JPEG error);
    the decoders are now built when the slide opens."""
    import threading
    from embedstore.extract.dataset import TileDataset, TileSpec
    from embedstore.extract.wsi import SlideReader, plan_slide, slide_identity
    cmu = SAMPLE / "wsi" / "CMU-1-Small-Region.svs"
    with SlideReader(cmu) as r:
        g = plan_slide(r, 0.5, 224).grid
    slides = []
    for i in range(6):
        slides.append(tmp_path / f"s{i}.svs")
        shutil.copy(cmu, slides[-1])
    specs = [TileSpec(0, f"{i}/{j}", str(sl), int(g.x[j]), int(g.y[j]), g.level, g.read_size,
                      g.read_size, 224) for i, sl in enumerate(slides) for j in range(len(g))]
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            for sl in slides:
                slide_identity(sl)
    t = threading.Thread(target=busy, daemon=True)
    t.start()
    errors, batches = [], 0
    try:
        for _ in range(40):   # fresh readers: the first decodes of a reader are the racy ones
            ds = TileDataset(decode_threads=4)
            for b in range(0, len(specs), 32):
                errors += [e for _, _, e, _ in ds.__getitems__(specs[b:b + 32]) if e]
                batches += 1
            ds.close()
    finally:
        stop.set()
        t.join()
    assert batches >= 400 and errors == []


def test_units_are_balanced_by_tile_count() -> None:
    from embedstore.extract.parallel import plan_claims
    weights = [100, 90, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    parts = plan_claims(weights, 2)
    loads = [sum(weights[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 10 and sorted(i for p in parts for i in p) == list(range(12))


def test_missing_file_truncated_slide_and_changed_slide(tmp_path: Path) -> None:
    # a CSV naming a file that does not exist: recorded, the rest embedded, exit status 1
    tiles = tmp_path / "t"
    tiles.mkdir()
    for p in sorted((SAMPLE / "lung" / "lung_n").glob("*.jpeg"))[:3]:
        shutil.copy(p, tiles / p.name)
    (tiles / "labels.csv").write_text("path,label\n" + "".join(f"{p.name},n\n" for p in sorted(tiles.glob("*.jpeg")))
                                      + "gone.jpeg,n\n")
    st = tmp_path / "files"
    res = extract([tiles / "labels.csv"], cfg(st))
    assert res.exit_code == 1 and res.tiles_written == 3
    assert any("gone.jpeg" in u and "No such file" in r for u, r in res.errors)
    # a truncated slide next to a good one: the good one is tiled, the bad one is an error
    slides = tmp_path / "slides"
    slides.mkdir()
    good = slides / "good.svs"
    shutil.copy(SAMPLE / "wsi" / "CMU-1-Small-Region.svs", good)
    data = (SAMPLE / "wsi" / "CMU-1-Small-Region.svs").read_bytes()
    (slides / "cut.svs").write_bytes(data[: len(data) // 3])
    st2 = tmp_path / "slide-store"
    res = extract([slides], cfg(st2, target_mpp=1.0))
    assert res.exit_code == 1
    s = open_store(st2)
    assert s.slides() == ["good.svs"] and "slide:good.svs" in s.units()
    assert any(u.startswith("slide:cut.svs") for u in s.errors())
    # the good slide changes on disk after it was embedded: the re-run says so
    with open(good, "r+b") as fh:
        fh.seek(10)
        fh.write(b"\x00\x01\x02")
    res = extract([slides], cfg(st2, target_mpp=1.0))
    assert any(u == "slide:good.svs" and "changed since it was embedded" in r for u, r in res.errors)

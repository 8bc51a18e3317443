#!/usr/bin/env python
"""Extraction at real slide size: ``extract()`` end to end against the model alone, over
several large pyramidal TIFFs built here from real tissue tiles.

    .venv/bin/python benchmarks/bench_bigslide.py                 # 3 slides of 64,000 x 48,000 px
    .venv/bin/python benchmarks/bench_bigslide.py --slides 4 --width 40000 --height 30000
    .venv/bin/python benchmarks/bench_bigslide.py --quick         # 2 slides of 12,000 x 9,000 px
    .venv/bin/python benchmarks/bench_bigslide.py --profile       # + cProfile of the e2e run
    .venv/bin/python benchmarks/bench_bigslide.py --default-only --rounds 3   # the default, 3 times

The slides (built once, kept under ``--work``, default ``/work/bench_data/bigslides``, not in the
repository): OME-TIFFs, level 0 at ``--mpp`` (0.25 um/px, a 40x scan), 256 px JPEG tiles (YCbCr
4:2:0, quality 80, as scanners write them), a 2x pyramid in SubIFDs down to 1/32 (tifffile reads
it; OpenSlide would see level 0 only, so the reader picks tifffile), the mpp in the OME
``PhysicalSizeX`` and in the resolution tags. Content: tissue regions (a smoothed random field,
thresholded: a few irregular blobs, about 40 % of the slide) filled with mosaics of real
LC25000 lung tiles (224 px, one bank of 9 x 9 tiles per region) on a light, noisy background
(glass), so tissue detection has real work and the JPEG tiles compress like tissue. Every
pyramid level is rendered from the same banks, downsampled (box filter), so levels agree.

Measured in one process, side by side (the model-only pass runs before, between and after the
end-to-end runs, since the machine is shared):

* **model alone**: ``bb.embed`` (the shipped int8 ONNX MobileNetV2, ``/work/shared/models``),
  batch 64, 224 px, on ``--sample`` tiles read from the slides beforehand (on the run's grid) and
  cycled to the end-to-end tile count, torch's default thread count (what extract uses);
* **end to end**: ``extract()`` with the CLI's defaults (target 0.5 um/px, 224 px tiles,
  batch 64, workers and threads from the runner) over all the slides into a fresh store: wall
  clock of the whole call (backbone load, store creation, tissue masks, overlays, planning,
  reads, decode, forward, commits); three times: with ``decode_ahead=False`` (each batch
  decoded in the model's thread), then with ``decode_ahead=True`` (0 workers: the next batch
  decoded in a helper thread, at idle priority when the model has every core), the planning
  thread (one slide ahead) once at normal priority and once at idle priority (``SCHED_IDLE``,
  the runner's choice when the model has every core); the runner's default is the last. Each against
  the mean of the model-alone runs either side of it (model alone, run, model alone, ...);
* **CPU per tile**: the process's CPU time per tile of the model alone (the runs either side)
  over that of each end-to-end run: what the rest of the pipeline costs on top of the model,
  less disturbed than wall time by other work on a shared machine;
* **per-slide overhead**, each slide alone: open, thumbnail (pyramid level read for the mask),
  tissue mask, grid planning, mask/overlay/grid files, and open -> first batch of 64 tiles
  decoded; and the ``plan`` stage the run recorded (it runs ahead in a thread).

Results: ``benchmarks/results/bench_bigslide-<host>-<date>.json``; ``--profile`` also writes
the cProfile statistics of the end-to-end run next to it (``.prof`` and the top 40 as text).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

NAME = "bench_bigslide"
ONNX = "mobilenetv2-onnx-int8"
WEIGHTS = Path("/work/shared/models/mobilenetv2-12-int8.onnx")
TILES = Path("/work/shared/data/lc25000_lung")
BATCH = 64
TARGET = 0.9
BANK_TILES = 9            # a bank is 9 x 9 source tiles of 224 px: 2016 px, divisible by 32
LEVELS = 6                # 1, 2, 4, 8, 16, 32
CELL = 64                 # level-0 px per cell of the tissue label map


# -- building the slides ----------------------------------------------------------------------
@dataclass(frozen=True)
class SlideSpec:
    width: int
    height: int
    mpp: float
    tile: int
    quality: int
    seed: int

    @property
    def name(self) -> str:
        return (f"big{self.seed:02d}_{self.width}x{self.height}_mpp{self.mpp:g}_t{self.tile}"
                f"_q{self.quality}.ome.tiff")


def _banks(seed: int, n_banks: int) -> list[np.ndarray]:
    """Per level, (n_banks, B, B, 3) uint8 mosaics of real tiles (level L: 2**L box-filtered)."""
    from PIL import Image
    files = sorted(TILES.rglob("*.jpeg")) + sorted(TILES.rglob("*.jpg"))
    if len(files) < BANK_TILES ** 2:
        raise SystemExit(f"need at least {BANK_TILES ** 2} tiles under {TILES}")
    rng = np.random.default_rng(seed)
    side = 224 * BANK_TILES
    lvl0 = np.empty((n_banks, side, side, 3), np.uint8)
    classes = sorted({f.parent.name for f in files})
    for b in range(n_banks):
        pool = [f for f in files if f.parent.name == classes[b % len(classes)]]
        pick = rng.choice(len(pool), BANK_TILES ** 2, replace=False)
        for j, i in enumerate(pick):
            with Image.open(pool[i]) as im:
                a = np.asarray(im.convert("RGB").resize((224, 224)))
            r, c = divmod(j, BANK_TILES)
            lvl0[b, r * 224:(r + 1) * 224, c * 224:(c + 1) * 224] = a
    out = [lvl0]
    for _ in range(1, LEVELS):
        p = out[-1].astype(np.uint16)
        out.append(((p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2] + 2)
                    // 4).astype(np.uint8))
    return out


def _labels(spec: SlideSpec, n_banks: int) -> np.ndarray:
    """(h, w) int8 map, one cell per CELL level-0 px: -1 glass, else the bank of the region."""
    from PIL import Image
    rng = np.random.default_rng(1000 + spec.seed)
    h, w = -(-spec.height // CELL), -(-spec.width // CELL)
    small = rng.standard_normal((max(4, h // 24), max(4, w // 24))).astype(np.float32)
    field = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:h, 0:w]
    env = np.exp(-(((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2))
    score = field + 2.2 * env
    tissue = score > np.quantile(score, 0.6)          # about 40 % tissue
    region = (np.floor(xx / (w / 3)) + 3 * np.floor(yy / (h / 2))).astype(np.int64) % n_banks
    return np.where(tissue, region, -1).astype(np.int8)


def _tiles(spec: SlideSpec, level: int, banks: np.ndarray, labels: np.ndarray,
           glass: np.ndarray) -> Any:
    """The JPEG tiles of ``level``, row-major, each rendered from the banks."""
    f = 1 << level
    W, H = -(-spec.width // f), -(-spec.height // f)
    T, B = spec.tile, banks.shape[1]
    for ty in range(0, H, T):
        for tx in range(0, W, T):
            ys, xs = np.arange(ty, ty + T), np.arange(tx, tx + T)
            lab = labels[np.minimum(ys * f // CELL, labels.shape[0] - 1)[:, None],
                         np.minimum(xs * f // CELL, labels.shape[1] - 1)[None, :]]
            out = glass[np.ix_(ys % glass.shape[0], xs % glass.shape[1])].copy()
            for b in np.unique(lab):
                if b < 0:
                    continue
                crop = banks[b][np.ix_(ys % B, xs % B)]
                m = lab == b
                out[m] = crop[m]
            yield out


def build_slide(path: Path, spec: SlideSpec, banks: list[np.ndarray]) -> None:
    import tifffile
    labels = _labels(spec, banks[0].shape[0])
    rng = np.random.default_rng(2000 + spec.seed)
    glass0 = np.clip(rng.normal(238, 3, (512, 512, 3)), 0, 255).astype(np.uint8)
    res = (1e4 / spec.mpp, 1e4 / spec.mpp)
    kw: dict[str, Any] = dict(tile=(spec.tile, spec.tile), compression="jpeg",
                              compressionargs={"level": spec.quality}, photometric="rgb",
                              dtype=np.uint8)   # written as YCbCr 4:2:0 JPEG
    tmp = path.with_suffix(".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        for level in range(LEVELS):
            f = 1 << level
            shape = (-(-spec.height // f), -(-spec.width // f), 3)
            meta = ({"axes": "YXS", "PhysicalSizeX": spec.mpp, "PhysicalSizeXUnit": "µm",
                     "PhysicalSizeY": spec.mpp, "PhysicalSizeYUnit": "µm"} if level == 0 else None)
            tif.write(_tiles(spec, level, banks[level], labels, glass0), shape=shape,
                      subifds=LEVELS - 1 if level == 0 else None,
                      subfiletype=1 if level else 0, metadata=meta,
                      resolution=(res[0] / f, res[1] / f), resolutionunit="CENTIMETER", **kw)
    os.replace(tmp, path)


def slides(args: argparse.Namespace) -> list[Path]:
    args.work.mkdir(parents=True, exist_ok=True)
    specs = [SlideSpec(args.width, args.height, args.mpp, args.tiff_tile, args.quality, i)
             for i in range(args.slides)]
    out, banks = [], None
    for s in specs:
        p = args.work / s.name
        if not p.exists():
            banks = banks or _banks(7, 6)
            t0 = time.perf_counter()
            build_slide(p, s, banks)
            print(f"  built {p.name}: {p.stat().st_size / 2**20:.0f} MiB in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        out.append(p)
    return out


# -- measuring ------------------------------------------------------------------------------
def overhead(path: Path, target_mpp: float, tile: int) -> dict[str, Any]:
    """One slide's fixed costs, each step timed alone, as the planner and the loader do them."""
    from embedstore.extract.wsi import SlideReader, plan_grid, tissue_mask
    from embedstore.extract.wsi.grid import read_tile
    from embedstore.extract.wsi.plan import mask_downsample
    t0 = time.perf_counter()
    r = SlideReader(path)
    t_open = time.perf_counter() - t0
    mpp = r.mpp
    assert mpp is not None
    W, Hgt = r.dimensions
    ds = mask_downsample(r, mpp)                       # plan_slide's defaults
    t1 = time.perf_counter()
    thumb = r.overview(ds)
    t2 = time.perf_counter()
    mask_mpp = mpp * W / thumb.shape[1]
    mask = tissue_mask(thumb, close_px=max(1, round(16 / mask_mpp)), open_px=max(1, round(8 / mask_mpp)))
    t3 = time.perf_counter()
    grid = plan_grid((W, Hgt), mpp, target_mpp, tile, mask, level_downsamples=r.level_downsamples)
    t4 = time.perf_counter()
    from embedstore.extract.wsi.plan import SlidePlan
    scratch = H.SCRATCH / NAME / "masks"
    SlidePlan(grid=grid, thumbnail=thumb, mask=mask, mask_mpp=mask_mpp).save(scratch, path.stem)
    t5 = time.perf_counter()
    for i in range(min(BATCH, len(grid))):
        read_tile(r, grid, i)
    t6 = time.perf_counter()
    r.close()
    return {"slide": path.name, "dims": f"{W}x{Hgt}", "levels": len(r.level_downsamples),
            "backend": "tifffile", "tiles": len(grid), "tissue": float(mask.mean()),
            "level_read": grid.level, "open_s": t_open, "thumb_s": t2 - t1, "mask_s": t3 - t2,
            "grid_s": t4 - t3, "save_s": t5 - t4, "first_batch_s": t6 - t5,
            "open_to_first_batch_s": t6 - t0}


def sample_tiles(paths: list[Path], n: int, target_mpp: float, tile: int) -> np.ndarray:
    """``n`` tiles spread over the slides' grids, read as the workers read them."""
    from embedstore.extract.wsi import SlideReader, plan_slide
    from embedstore.extract.wsi.grid import read_tile
    per = -(-n // len(paths))
    out = []
    for p in paths:
        with SlideReader(p) as r:
            g = plan_slide(r, target_mpp, tile).grid
            for i in np.linspace(0, len(g) - 1, min(per, len(g))).round().astype(int):
                out.append(read_tile(r, g, int(i)))
    return np.stack(out[:n])


MODEL_CPU: list[float] = []   # CPU seconds per tile of each model-alone run (this process's)


def model_only(bb: Any, tiles: np.ndarray, n: int) -> float:
    idx = np.arange(n) % len(tiles)
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    for s in range(0, n, BATCH):
        bb.embed(tiles[idx[s:s + BATCH]])
    MODEL_CPU.append((time.process_time() - c0) / n)
    return n / (time.perf_counter() - t0)


def end_to_end(paths: list[Path], store: Path, profile: Path | None,
               decode_ahead: bool = True) -> tuple[float, Any]:
    from embedstore.extract.runner import ExtractConfig, extract
    shutil.rmtree(store, ignore_errors=True)
    cfg = ExtractConfig(store=store, backbone=ONNX, weights=str(WEIGHTS), progress=False,
                        decode_ahead=decode_ahead)
    gc.collect()
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    res = extract([str(p) for p in paths], cfg)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    if prof and profile:
        prof.dump_stats(str(profile))
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        profile.with_suffix(".txt").write_text(s.getvalue())
    if res.errors:
        raise SystemExit(f"extract recorded errors: {res.errors[:3]}")
    return wall, res


def main(argv: list[str] | None = None) -> int:  # long: flags, then the measurements in order
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--width", type=int, default=64000, help="level-0 px (real 40x scans: 50-100k)")
    ap.add_argument("--height", type=int, default=48000)
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 um/px of the built slides")
    ap.add_argument("--tiff-tile", type=int, default=256)
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--sample", type=int, default=512, help="tiles pre-decoded for the model alone")
    ap.add_argument("--work", type=Path, default=Path("/work/bench_data/bigslides"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--default-only", action="store_true", help="only the runner's default configuration")
    ap.add_argument("--rounds", type=int, default=1, help="times each configuration runs (one row each)")
    ap.add_argument("--quick", action="store_true", help="2 slides of 12,000 x 9,000 px")
    args = ap.parse_args(argv)
    if args.quick:
        args.slides, args.width, args.height = 2, 12000, 9000
    from embedstore.backbones import create_backbone
    paths = slides(args)
    target_mpp, tile = 0.5, 224        # extract's defaults for this backbone (no native mpp)
    per_slide = [overhead(p, target_mpp, tile) for p in paths]
    H.print_table(per_slide, [("slide", "slide", None), ("dims", "level 0", None),
                              ("tiles", "tiles", "d"), ("tissue", "tissue", ".2f"),
                              ("level_read", "level", "d"), ("open_s", "open s", ".3f"),
                              ("thumb_s", "thumb s", ".2f"), ("mask_s", "mask s", ".2f"),
                              ("grid_s", "grid s", ".3f"), ("save_s", "save s", ".2f"),
                              ("first_batch_s", "64 tiles s", ".2f"),
                              ("open_to_first_batch_s", "open->batch s", ".2f")],
                  title="per-slide overhead (each step alone)")
    n = sum(r["tiles"] for r in per_slide)
    tiles = sample_tiles(paths, args.sample, target_mpp, tile)
    bb = create_backbone(ONNX, weights=str(WEIGHTS))
    bb.embed(tiles[:BATCH])                            # warm-up, not timed
    bases = [model_only(bb, tiles, n)]
    print(f"  model alone: {bases[-1]:.1f} tiles/s", flush=True)
    store = args.work / "stores" / "e2e"
    tag = f"{NAME}-{H.machine_tag()}-{time.strftime('%Y%m%d')}"
    runs: list[dict[str, Any]] = []
    import embedstore.extract.pipeline as pipeline_mod
    lowered = pipeline_mod.lower_thread_priority
    # decode in the model's thread; decode ahead with planning at normal priority (stop 21);
    # decode ahead with planning at idle priority too (the runner's now, when the model has every core)
    configs = ([(True, True)] if args.default_only else [(False, True), (True, False), (True, True)])
    for ahead, plan_low in configs * args.rounds:
        prof = (H.RESULTS / f"{tag}-ahead{int(ahead)}-plan{int(plan_low)}.prof") if args.profile else None
        pipeline_mod.lower_thread_priority = lowered if plan_low else (lambda: None)  # type: ignore[assignment]
        c0 = time.process_time()
        try:
            wall, res = end_to_end(paths, store, prof, decode_ahead=ahead)
        finally:
            pipeline_mod.lower_thread_priority = lowered  # type: ignore[assignment]
        if res.tiles_written != n:
            raise SystemExit(f"extract wrote {res.tiles_written} tiles, the grids hold {n}")
        e2e = res.tiles_written / wall
        cpu = (time.process_time() - c0) / res.tiles_written
        print(f"  end to end, decode_ahead={ahead}: {e2e:.1f} tiles/s (wall {wall:.1f} s; "
              + ", ".join(f"{k} {v:.1f}" for k, v in res.stages.items()) + ")", flush=True)
        bases.append(model_only(bb, tiles, n))
        print(f"  model alone: {bases[-1]:.1f} tiles/s", flush=True)
        shutil.rmtree(store, ignore_errors=True)
        near = (bases[-2] + bases[-1]) / 2           # the model-alone runs either side of it
        runs.append({"ahead": ahead, "plan_low": plan_low, "wall_s": wall, "tps": e2e, "base": near,
                     "cpu_per_tile": cpu, "model_cpu_per_tile": (MODEL_CPU[-2] + MODEL_CPU[-1]) / 2,
                     "stages": dict(res.stages), "plan_s_per_slide": res.stages.get("plan", 0) / len(paths)})
    base = sum(bases) / len(bases)
    rows: list[dict[str, Any]] = [
        {"what": f"model alone (pre-decoded, batch 64), mean of {len(bases)}", "tiles": n, "tps": base, "ratio": 1.0}]
    for r in runs:
        st = r["stages"]
        rows.append({"what": "extract end to end, decode ahead " + ("on" if r["ahead"] else "off")
                     + (", planning at idle priority" if r["plan_low"] else ", planning at normal priority")
                     + (" (the default here)" if r["ahead"] and r["plan_low"] else ""),
                     "tiles": n, "tps": r["tps"], "ratio": r["tps"] / r["base"],
                     "cpu_ratio": r["model_cpu_per_tile"] / r["cpu_per_tile"],
                     "wait": st.get("wait", 0.0), "forward": st.get("forward", 0.0), "wall": r["wall_s"],
                     "target": TARGET, "met": r["tps"] / r["base"] >= TARGET})
    H.print_table(rows, [("what", "", None), ("tiles", "tiles", "d"), ("tps", "tiles/s", ".1f"),
                         ("ratio", "vs model alone (runs either side)", "ratio"),
                         ("cpu_ratio", "CPU/tile: model alone / e2e", "ratio"),
                         ("wall", "wall s", ".1f"), ("forward", "forward s", ".1f"),
                         ("wait", "wait s", ".1f"), ("target", "target", ".2f"), ("met", "met", None)],
                  title=f"{len(paths)} slides of {args.width}x{args.height} px at {args.mpp} um/px")
    on = runs[-1]
    extra = {"slides": [str(p) for p in paths], "args": {k: str(v) for k, v in vars(args).items()},
             "per_slide": per_slide, "runs": runs, "stages": on["stages"], "wall_s": on["wall_s"],
             "model_alone_runs": bases, "plan_s_per_slide": on["plan_s_per_slide"],
             "decode_ahead_default": True}
    print("results:", H.write_results(NAME, rows, extra,
                                      tag=H.machine_tag() + ("-quick" if args.quick else "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the main job on the data shipped in the repository, offline.

Extracts a real tile folder (LC25000 lung, class sub-folders) and a real slide (CMU-1 small
region, Aperio SVS) with the shipped ImageNet MobileNetV2 (ONNX) into two stores — one per
tile geometry — then indexes and searches them, trains a head and predicts the slide with it,
and ranks two backbones on the tiles, printing what a person would look at.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"
SAMPLE = ROOT / "sample_data"
BACKBONE = "mobilenetv2-onnx-int8"


def run(*args: str, ok: tuple[int, ...] = (0,)) -> str:
    cmd = [sys.executable, "-m", "embedstore", *args]
    print(f"\n$ embedstore {' '.join(args)}", flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    print(r.stdout.rstrip(), flush=True)
    if r.returncode not in ok:
        sys.exit(f"demo step failed (exit {r.returncode}): embedstore {' '.join(args)}")
    return r.stdout


def step_extract(tiles: Path, slides: Path) -> None:
    print("== 1. extract: a folder of labelled tiles and a whole slide, one store per geometry")
    run("extract", str(SAMPLE / "lung"), "--store", str(tiles), "--backbone", BACKBONE,
        "--views", "4", "--quiet")
    run("extract", str(SAMPLE / "wsi" / "CMU-1-Small-Region.svs"), "--store", str(slides),
        "--backbone", BACKBONE, "--target-mpp", "0.5", "--quiet")
    run("info", str(tiles))
    run("info", str(slides))
    run("verify", str(slides))
    overlay = slides / "masks" / "CMU-1-Small-Region.svs.overlay.png"
    print(f"\ntissue mask and tile grid of the slide: {overlay}")


def step_index(tiles: Path, slides: Path) -> None:
    print("\n== 2. index and search: look-alike tiles, by key and by image")
    run("index", str(tiles))
    run("index", str(slides))
    from embedstore.store import open_store
    key = open_store(slides).keys()[len(open_store(slides)) // 2]
    run("search", str(slides), "--key", key, "-k", "6", "--gallery", str(OUT / "gallery.png"),
        "--slide-heatmap", "CMU-1-Small-Region.svs", "--heatmap-out", str(OUT / "similarity.png"))
    image = sorted((SAMPLE / "lung" / "lung_scc").glob("*.jpeg"))[0]
    run("search", str(tiles), "--image", str(image), "-k", "5")


def step_heads(tiles: Path, slides: Path) -> None:
    print("\n== 3. heads: a linear head with view sampling on the labelled tiles (seconds)")
    head = OUT / "lung-head"
    run("train-head", str(tiles), "--task", "lung", "--split", "kfold:3", "--augment", "views",
        "--seeds", "3", "--out", str(head))
    run("predict", str(slides), "--head", str(head), "--out", str(OUT / "slide-preds.arrow"),
        "--heatmap", "CMU-1-Small-Region.svs", "--heatmap-class", "lung_scc")
    print(f"class probability heatmap over the slide: {OUT / 'slide-preds-heatmap.png'}"
          " (a lung head on skin: a demonstration of the mechanics, not a diagnosis)")


def step_select() -> None:
    print("\n== 4. backbone selection: which backbone fits these tiles? (kNN proxy task)")
    out = OUT / "selection"
    run("select", "--proxy", str(SAMPLE / "lung"), "--backbone", BACKBONE, "--backbone", "resnet18",
        "--random-init", "--k", "10", "--folds", "5", "--out", str(out), "--quiet")
    print(f"selection chart: {out / 'selection.png'}")


def main() -> None:
    t0 = time.time()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    tiles, slides = OUT / "lung.store", OUT / "slide.store"
    step_extract(tiles, slides)
    step_index(tiles, slides)
    step_heads(tiles, slides)
    step_select()
    print(f"\ndemo finished in {time.time() - t0:.0f} s; everything is under {OUT}")
    print("\nbrowse and search both stores in a web page, the lung head's predictions laid over the "
          "slide (Ctrl-C stops it):\n"
          f"  {Path(sys.executable).parent / 'embedstore'} serve {tiles} {slides} --head {OUT / 'lung-head'}\n"
          "then open the address it prints (http://127.0.0.1:8765 by default)")


if __name__ == "__main__":
    main()

"""Does the kNN proxy task pick the pretrained backbone, and does its ranking predict the
downstream ranking? What does a selection over three candidates cost on this machine?

Candidates: the shipped ONNX MobileNetV2 (ImageNet weights, int8), and random-init timm
ResNet-18 and ViT-S/16 (``vit_small_patch16_224``). Proxies, each on its own:

* **Kather 2016** colorectal tissue, 8 classes: ``kather2016_mini`` (100 tiles, 224 px, upscaled)
  and ``kather2016_orig24`` (24 originals, 150 px, resized to 224 by extraction) pooled into one
  CSV under ``benchmarks/scratch/select/``; the orig24 file names carry their source image
  (``<id>_<image>.tif_Row_<r>_Col_<c>.tif``), which becomes the group (slide column). Mini tiles
  have no known source: each is a group of its own.
* **LC25000 lung**, 3 classes x 500 (its rotated/flipped near-duplicates inflate every score).

Downstream (``--validate``): PCam, a linear head trained on ``split=train``, F1 on ``split=valid``.
The first run per proxy starts from empty stores (the selection time includes embedding); a
second run with ``--validate`` reuses them (tiles_written must be 0) and adds the downstream
heads. A plain kNN (uniform vote) is scored on the same folds for comparison with the reference
figures (MobileNetV2 0.88 / 0.74, random ResNet-18 0.85 / 0.66 balanced accuracy on LC25000 /
Kather). Writes ``benchmarks/results/select-<machine>-<date>.json``.

The downstream F1 is the mean of ``--head-seeds`` linear heads (30 here, 10 in `select`): with
3, random ResNet-18 and random ViT-S (about 0.01 F1 apart) swapped places in about one draw in
six; a note says when two candidates' downstream means are within two standard errors of seed
noise. The PCam stores
(5000 tiles x 3 backbones, the slowest part) are kept between runs unless ``--fresh-downstream``.

    python benchmarks/bench_select.py [--k 20] [--folds 5] [--head-seeds 30] [--reuse] [--fresh-downstream]

``--memory`` runs only the kNN past memory (issue 14): a synthetic proxy store of ``--rows`` x
``--dim`` float16 rows (8 class blobs, proxy order shuffled against id order) is scored by the
cross-validated kNN in RAM (``fold_scores`` over the gathered rows) and streamed from the store
(``select.stream``: the exact index filled block by block at ``--index-budget``, the blocked
search at ``--blocked-budget``), each in a fresh process: time, peak RSS growth (``VmHWM`` over
the RSS after opening the store) and the fold scores, which must agree. Writes
``benchmarks/results/select-memory-<machine>-<date>.json``.

    python benchmarks/bench_select.py --memory [--rows 40000] [--dim 768] [--index-budget 256M] [--blocked-budget 64M]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import SCRATCH, machine, print_table, write_results  # noqa: E402

from embedstore.select.knn import KnnConfig, fold_scores  # noqa: E402
from embedstore.select.proxy import SelectConfig, plan_folds, read_proxy, select_backbones  # noqa: E402
from embedstore.store import open_store  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CANDIDATES = ("mobilenetv2-onnx-int8", "resnet18", "vit_small_patch16_224")
REFERENCE = {("lc25000_lung", "mobilenetv2-onnx-int8"): 0.88, ("kather2016", "mobilenetv2-onnx-int8"): 0.74,
             ("lc25000_lung", "resnet18"): 0.85, ("kather2016", "resnet18"): 0.66}
ORIG_NAME = re.compile(r"^[0-9A-Fa-f]+_(?P<image>.+?\.tif)_Row_\d+_Col_\d+\.tif$")
UNIFORM_T = 1e6   # exp(sim / 1e6) ~ 1: a plain majority vote (ties go to the closer neighbours)


def kather_csv(out: Path) -> Path:
    """Pool the two Kather folders into one CSV (path,label,slide); the labels must agree."""
    def rows(folder: str) -> list[dict[str, str]]:
        with open(DATA / folder / "labels.csv", newline="") as fh:
            return list(csv.DictReader(fh))
    mini, orig = rows("kather2016_mini"), rows("kather2016_orig24")
    for folder, rs in (("kather2016_mini", mini), ("kather2016_orig24", orig)):
        for r in rs:    # the label is the class folder in both
            assert r["path"].split("/")[0] == r["label"], f"{folder}: {r}"
    if sorted({r["label"] for r in mini}) != sorted({r["label"] for r in orig}):
        raise SystemExit(f"class names differ: {sorted({r['label'] for r in mini})} vs "
                         f"{sorted({r['label'] for r in orig})}")
    table = [{"path": str(DATA / "kather2016_mini" / r["path"]), "label": r["label"], "slide": ""}
             for r in mini]
    for r in orig:
        m = ORIG_NAME.match(Path(r["path"]).name)
        if m is None:
            raise SystemExit(f"orig24 file name without a source image: {r['path']}")
        table.append({"path": str(DATA / "kather2016_orig24" / r["path"]), "label": r["label"],
                      "slide": m["image"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "slide"])
        w.writeheader()
        w.writerows(table)
    return out


def variants(proxy: Path, stores: dict[str, str], k: int, folds: int) -> dict[str, dict[str, float]]:
    """Balanced accuracy (mean over folds) of two other kNN rules on the selection's folds, per
    candidate: ``plain`` (uniform vote) and ``centred`` (--centre, exp(sim/0.07) vote)."""
    p = read_proxy(proxy)
    fold = plan_folds(p.y, p.groups, folds, k, 0, p.classes, p.group_by)
    out = {}
    for name, path in stores.items():
        s = open_store(path)
        x = np.asarray(s.gather(s.ids(p.keys.tolist())), dtype=np.float32)
        rules = {"plain": KnnConfig(k, UNIFORM_T), "centred": KnnConfig(k, centre=True)}
        out[name] = {r: float(fold_scores(x, p.y, fold, cfg, n_classes=len(p.classes))[0].mean())
                     for r, cfg in rules.items()}
    return out


MEMORY_WORKER = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import _harness as H
from embedstore.heads.stream import LazyRows
from embedstore.select.knn import KnnConfig, fold_scores
from embedstore.select.stream import streamed_fold_scores
from embedstore.store import open_store
store, mode, budget, k, folds = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
lab = np.load(store + ".labels.npz")
s = open_store(store)
ids, y = lab["ids"], lab["y"]
fold = np.arange(y.size) % folds
cfg = KnnConfig(k, centre=True)
import faiss  # noqa: F401  (imported before the baseline)
base = H.rss()["VmRSS"]
t0 = time.perf_counter()
if mode == "ram":
    emb = np.asarray(s.gather(ids), dtype=np.float32)
    scores, _ = fold_scores(emb, y, fold, cfg, n_classes=8)
else:
    rows = LazyRows.of_store(s, ids)
    scores, _ = streamed_fold_scores(rows, y, fold, cfg, n_classes=8, budget=budget)
sec = time.perf_counter() - t0
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"s": sec, "peak_growth": hwm - base, "scores": scores.tolist()}))
"""


def write_proxy_store(path: Path, rows: int, dim: int) -> None:
    """``rows`` x ``dim`` float16: 8 class blobs around a shared offset; the labels and the
    proxy order (a permutation of the ids) beside it in ``<path>.labels.npz``."""
    from embedstore.store import StoreMeta, StoreWriter
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, rows)
    centres = rng.standard_normal((8, dim)).astype(np.float32)
    meta = StoreMeta(dim=dim, dtype="float16", backbone={"name": "synthetic", "kind": "bench"},
                     weights_sha256="0" * 64, transform={"size": 224}, tile={"tile_size": 224, "mpp": 0.5})
    unit = 5000
    with StoreWriter(path, meta, rows_per_shard=65536, spill_rows=65536) as w:
        for u, a in enumerate(range(0, rows, unit)):
            m = min(unit, rows - a)
            emb = 0.12 * centres[y[a:a + m]] + rng.standard_normal((m, dim), dtype=np.float32) + 0.5
            w.add(emb.astype(np.float16), [f"s{u:05d}/{i}" for i in range(m)], unit=f"u{u}",
                  slide=f"s{u:05d}", x=np.arange(m), y=np.zeros(m, np.int64))
            w.end_unit(f"u{u}")
    ids = open_store(path).all_ids()
    order = rng.permutation(rows)
    np.savez(str(path) + ".labels.npz", ids=ids[order], y=y[order])


def memory_main(args: argparse.Namespace) -> None:
    """In-RAM vs streamed kNN fold scoring on a synthetic store, each in a fresh process."""
    import subprocess
    from embedstore.sizes import format_bytes, parse_size
    from embedstore.select.stream import knn_ram_bytes
    root = SCRATCH / "select-memory"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    path = root / "proxy"
    t0 = time.perf_counter()
    write_proxy_store(path, args.rows, args.dim)
    print(f"wrote {args.rows:,} x {args.dim} float16 in {time.perf_counter() - t0:.1f} s", flush=True)
    cases = [("in RAM", "ram", 0), (f"streamed, index ({args.index_budget})", "stream", parse_size(args.index_budget)),
             (f"streamed, blocked ({args.blocked_budget})", "stream", parse_size(args.blocked_budget))]
    rows: list[dict[str, Any]] = []
    here = str(Path(__file__).resolve().parent)
    for name, mode, budget in cases:
        proc = subprocess.run([sys.executable, "-c", MEMORY_WORKER, here, str(path), mode, str(budget),
                               str(args.k), str(args.folds)], capture_output=True, text=True, check=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"path": name, "budget": budget or None, "s": got["s"], "peak_mb": got["peak_growth"] / 1e6,
                     "score": float(np.mean(got["scores"])), "scores": got["scores"]})
        print(f"{name}: {got['s']:.1f} s, peak RSS +{got['peak_growth'] / 1e6:.0f} MB", flush=True)
    ram = rows[0]
    for r in rows:
        r["time_x"], r["peak_x"] = r["s"] / ram["s"], r["peak_mb"] / ram["peak_mb"]
        r["same_scores"] = bool(np.allclose(r["scores"], ram["scores"], atol=1e-12))
    print_table(rows, [("path", "path", None), ("s", "seconds", ".2f"), ("time_x", "÷ in RAM", "ratio"),
                       ("peak_mb", "peak +RSS MB", "num"), ("peak_x", "÷ in RAM", "ratio"),
                       ("score", "bal.acc", ".4f"), ("same_scores", "same scores", None)],
                title=f"kNN proxy folds ({args.folds}-fold, k={args.k}, centred) over {args.rows:,} x {args.dim} "
                      f"float16; in RAM holds ~{format_bytes(knn_ram_bytes(args.rows, args.dim, 2))}")
    out = write_results("select-memory", rows, extra={"args": vars(args)})
    print(f"wrote {out}")
    if not all(r["same_scores"] for r in rows):
        raise SystemExit("the streamed fold scores differ from the in-RAM ones")
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--head-seeds", type=int, default=30)
    ap.add_argument("--reuse", action="store_true", help="keep cached proxy stores from an earlier run")
    ap.add_argument("--fresh-downstream", action="store_true", help="re-embed the PCam stores too")
    ap.add_argument("--memory", action="store_true", help="only in-RAM vs streamed kNN on a synthetic store")
    ap.add_argument("--rows", type=int, default=40_000, help="--memory: proxy rows")
    ap.add_argument("--dim", type=int, default=768, help="--memory: embedding width")
    ap.add_argument("--index-budget", default="256M", help="--memory: budget of the index case")
    ap.add_argument("--blocked-budget", default="64M", help="--memory: budget of the blocked case")
    args = ap.parse_args()
    if args.memory:
        return memory_main(args)
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing: this benchmark needs ../shared/data")
    root = SCRATCH / "select"
    for old in (root.glob("*") if root.exists() else ()):
        if not args.reuse and (old.name != "pcam-stores" or args.fresh_downstream):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    proxies = {"kather2016": kather_csv(root / "kather2016.csv"), "lc25000_lung": DATA / "lc25000_lung"}
    task = DATA / "pcam" / "labels.csv"
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    t_all, at_start = time.perf_counter(), machine()
    for pname, proxy in proxies.items():
        base = dict(proxy=proxy, backbones=CANDIDATES, k=args.k, folds=args.folds, random_init=True,
                    cache=root / pname / "stores", head_seeds=args.head_seeds, progress=False)
        print(f"== {pname}: selection over {len(CANDIDATES)} candidates", flush=True)
        first = select_backbones(SelectConfig(out=root / pname / "select", **base))
        print(first.table(), flush=True)
        print(f"== {pname}: again with --validate {task} (proxy stores cached)", flush=True)
        second = select_backbones(SelectConfig(out=root / pname / "validate", validate=task,
                                               validate_cache=root / "pcam-stores", **base))
        print(second.table(), flush=True)
        other = variants(proxy, {c.backbone: c.store for c in first.candidates}, args.k, args.folds)
        by_name = {c.backbone: c for c in second.candidates}
        for c in first.candidates:
            d = by_name[c.backbone].downstream or {}
            rows.append({
                "proxy": pname, "rank": c.rank, "backbone": c.backbone, "weights": c.weights,
                "score": c.mean, "score_std": c.std, "plain_knn": other[c.backbone]["plain"],
                "centred": other[c.backbone]["centred"],
                "reference": REFERENCE.get((pname, c.backbone)), "extract_s": c.extract_s,
                "tiles_per_s": c.tiles_written / c.extract_s if c.extract_s else None,
                "knn_s": c.knn_s, "cached_tiles_written": by_name[c.backbone].tiles_written,
                "pcam_f1": d.get("f1", (None,))[0], "pcam_f1_std": d.get("f1", (None, None))[1],
                "pcam_auroc": d.get("auroc", (None,))[0], "pcam_f1_runs": d.get("f1_runs"),
                "pcam_extract_s": d.get("extract_s"), "fold_scores": c.fold_scores,
            })
        summary[pname] = {
            "tiles": first.proxy["tiles"], "classes": first.proxy["classes"],
            "group_by": first.proxy["group_by"], "groups": first.proxy["groups"],
            "fold_sizes": first.proxy["fold_sizes"],
            "pretrained_first": first.candidates[0].weights == "pretrained",
            "ranking": [c.backbone for c in first.candidates],
            "downstream_ranking": [c.backbone for c in sorted(second.candidates,
                                                              key=lambda c: -c.downstream["f1"][0])],  # type: ignore[index]
            "spearman": second.spearman, "selection_s": first.elapsed,
            "cached_selection_with_validate_s": second.elapsed,
            "plots": [first.files["plot"], second.files["plot"]], "notes": second.notes,
        }
    cols = [("proxy", "proxy", None), ("rank", "rank", "d"), ("backbone", "backbone", None),
            ("weights", "weights", None), ("score", "bal.acc", ".3f"), ("score_std", "±", ".3f"),
            ("plain_knn", "plain", ".3f"), ("centred", "centred", ".3f"), ("reference", "ref.", ".2f"),
            ("extract_s", "extract s", ".1f"), ("tiles_per_s", "tiles/s", ".1f"),
            ("knn_s", "kNN s", ".2f"), ("cached_tiles_written", "re-run tiles", "d"),
            ("pcam_f1", "PCam F1", ".3f"), ("pcam_f1_std", "±", ".3f"), ("pcam_auroc", "AUROC", ".3f")]
    print()
    print_table(rows, cols, title=f"backbone selection, k={args.k}, {args.folds}-fold CV "
                                  f"(bal.acc: cosine, exp(sim/0.07) vote; plain: uniform vote; centred: --centre)")
    for pname, s in summary.items():
        print(f"{pname}: pretrained first: {'yes' if s['pretrained_first'] else 'NO'}; ranking "
              f"{' > '.join(s['ranking'])}; downstream {' > '.join(s['downstream_ranking'])}; "
              f"Spearman {s['spearman'] if s['spearman'] is None else round(s['spearman'], 3)}; "
              f"selection {s['selection_s']:.1f} s ({s['tiles']} tiles x {len(CANDIDATES)} candidates)")
        for n in s["notes"]:
            print(f"  note: {n}")
    path = write_results("select", rows, extra={"summary": summary, "k": args.k, "folds": args.folds,
                                                "head_seeds": args.head_seeds,
                                                "candidates": CANDIDATES, "reference": {f"{a}/{b}": v for (a, b), v in REFERENCE.items()},
                                                "total_s": time.perf_counter() - t_all,
                                                "machine_at_start": at_start})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Search quality on real tiles: the pcam valid tiles embedded with the ONNX MobileNetV2."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from embedstore.extract.runner import ExtractConfig, extract
from embedstore.index import build_index, search
from embedstore.store import open_store


def test_precision_at_10_of_same_class_neighbours_on_pcam_valid(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "pcam"
    with open(src / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "valid"]
    manifest = tmp_path / "valid.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in rows:
            w.writerow([str(src / r["path"]), r["label"]])
    st = tmp_path / "st"
    extract([manifest], ExtractConfig(store=st, backbone="mobilenetv2-onnx-int8", progress=False,
                                      num_workers=1, num_threads=1, task="pcam"))
    s = open_store(st)
    assert len(s) == len(rows) == 1000
    info = build_index(s)
    assert info.recall_at_10 >= 0.95
    keys = s.keys()
    labels = dict(zip(keys, s.labels(keys, task="pcam")))
    hits = search(s, keys=keys, k=10, exclude_self=True)
    prec = np.mean([np.mean([labels[k] == labels[q] for k in h.keys]) for q, h in zip(keys, hits)])
    assert all(q not in h.keys for q, h in zip(keys, hits))
    print(f"precision@10 {prec:.3f}")
    assert prec >= 0.75, prec   # measured 0.79 with plain cosine

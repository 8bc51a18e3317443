"""Tiny seeded stores with real structure: units (slides) of tiles whose embeddings are a
pure function of (unit, row), so any run can be compared with an uninterrupted one."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

DIM = 16


def unit_rows(u: int) -> int:
    return 5 + (u * 7) % 11


def unit_data(u: int, dim: int = DIM) -> dict:
    n = unit_rows(u)
    rng = np.random.default_rng(1000 + u)
    slide = f"slide{u:03d}.svs"
    return {
        "emb": rng.normal(size=(n, dim)).astype(np.float32),
        "views": rng.normal(size=(n, 2, dim)).astype(np.float32),
        "keys": [f"{slide}/{224 * i}_{448 * (i % 3)}" for i in range(n)],
        "slide": slide, "x": 224 * np.arange(n), "y": 448 * (np.arange(n) % 3),
        "label": ["tumor" if (u + i) % 3 == 0 else "normal" for i in range(n)],
    }


def meta(dim: int = DIM, dtype: str = "float16"):
    from embedstore.store import StoreMeta
    return StoreMeta(dim=dim, dtype=dtype, backbone={"name": "synthetic", "kind": "test"},
                     weights_sha256="0" * 64, transform={"size": 224}, tile={"tile_size": 224, "mpp": 0.5})


def write_units(store: Path, units: list[int], *, rows_per_shard: int = 20, sleep: float = 0.0,
                views: bool = True) -> None:
    from embedstore.store import StoreWriter
    with StoreWriter(store, meta(), rows_per_shard=rows_per_shard, spill_rows=8) as w:
        done = w.units_done()
        for u in units:
            name = f"u{u}"
            if name in done:
                continue
            d = unit_data(u)
            half = len(d["keys"]) // 2
            for a, b in ((0, half), (half, len(d["keys"]))):  # two adds per unit
                w.add(d["emb"][a:b], d["keys"][a:b], unit=name, slide=d["slide"], x=d["x"][a:b],
                      y=d["y"][a:b], level=0, tile_size=224, mpp=0.5, label=d["label"][a:b],
                      views=d["views"][a:b] if views else None)
            w.end_unit(name)
            if sleep:
                time.sleep(sleep)


def expected(units: list[int]) -> dict[str, tuple[np.ndarray, str, int, int, str]]:
    out = {}
    for u in units:
        d = unit_data(u)
        for i, k in enumerate(d["keys"]):
            out[k] = (d["emb"][i].astype(np.float16), d["slide"], int(d["x"][i]), int(d["y"][i]),
                      d["label"][i])
    return out


if __name__ == "__main__":  # python synthetic.py STORE N_UNITS SLEEP
    write_units(Path(sys.argv[1]), list(range(int(sys.argv[2]))), sleep=float(sys.argv[3]))

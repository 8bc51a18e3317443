"""Prediction over a whole store in constant memory, and a probability heatmap for one slide.

``predict_store`` streams ``store.scan`` batches through the head and appends each batch to an
Arrow IPC file (``key``, ``pred``, ``prob_<label>`` per class, and ``slide``, ``x``, ``y`` when the
store knows them). The file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..plots import render_heatmap
from ..store.geometry import level0_sides
from ..store.schema import metadata_array
from ..store.atomic import atomic_open
from ..errors import ConfigError, HeadError
from .persist import check_fingerprint
from .train import TrainedHead

__all__ = ["HeatmapSpec", "predict_store"]

META_COLUMNS = ("key", "slide", "x", "y")


@dataclass(frozen=True)
class HeatmapSpec:
    slide: str                     # slide name as stored in the tile metadata
    out: str | os.PathLike[str]    # PNG to write
    thumbnail: np.ndarray          # (h, w, 3) uint8 thumbnail of the slide
    downsample: float              # level-0 pixels per thumbnail pixel
    cls: str | None = None         # class whose probability is drawn; None = positive or last class
    tile_size: int | None = None   # level-0 tile side; None = the smallest spacing of the tile grid
    alpha: float = 0.5             # opacity of the tile squares

    def check(self, head: TrainedHead) -> int:
        """Validate against ``head``; returns the class index drawn."""
        thumb = np.asarray(self.thumbnail)
        if thumb.ndim != 3 or thumb.shape[2] not in (3, 4) or thumb.dtype != np.uint8:
            raise HeadError(f"heatmap thumbnail must be (h, w, 3) uint8, got {thumb.dtype} {thumb.shape}")
        if not self.downsample > 0:
            raise HeadError(f"heatmap downsample must be > 0, got {self.downsample}")
        if self.cls is None:
            return head.positive if head.positive is not None else len(head.classes) - 1
        if self.cls not in head.classes:
            raise HeadError(f"heatmap class {self.cls!r} is not one of the head's classes {head.classes}")
        return head.classes.index(self.cls)


def _objects(values: Any) -> np.ndarray:
    """Strings (numpy or Arrow) as an object array, None for null."""
    import pyarrow as pa
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
    return np.asarray(values, dtype=object)


def _ints(values: Any) -> np.ndarray:
    """Integers (numpy with -1, or Arrow with nulls) as int64, -1 for null."""
    import pyarrow as pa
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return np.asarray(values.fill_null(-1).to_numpy(), dtype=np.int64)
    return np.asarray(values, dtype=np.int64)


def _record_batch(classes: list[str], pred: np.ndarray, prob: np.ndarray, meta: dict[str, Any]) -> Any:
    """One Arrow record batch: key, pred (the labels of the (b,) class indices ``pred``),
    prob_<class> per class ((b, c) prob), and slide, x, y and tile_size_level0 (the tile side in
    level-0 px, null where unknown) when ``meta`` has them."""
    import pyarrow as pa
    cols: dict[str, Any] = {"key": metadata_array("key", meta["key"]),
                            "pred": pa.array(classes, pa.string()).take(pa.array(pred))}
    for i, c in enumerate(classes):
        cols[f"prob_{c}"] = pa.array(prob[:, i])
    for name in META_COLUMNS[1:]:
        if meta.get(name) is not None:
            cols[name] = metadata_array(name, meta[name])
    side = meta.get("tile_size_level0")
    if side is not None:
        cols["tile_size_level0"] = pa.array(side, mask=np.isnan(side), type=pa.float64())
    return pa.RecordBatch.from_pydict(cols)


def predict_store(store: Any, head: TrainedHead, out_path: str | os.PathLike[str], batch_size: int = 65536,
                  heatmap: HeatmapSpec | None = None, check: bool = True) -> dict[str, Any]:
    """Predict every live row of ``store`` and write ``out_path`` (Arrow IPC file).

    Refuses (BackboneMismatchError) a store whose fingerprint differs from the head's, before
    writing anything. Returns ``{"rows", "seconds", "path", "heatmap", "counts"}``.
    (``store``: Any, it reads ``fingerprint()``, which ``StoreLike`` lacks.)
    """
    import pyarrow as pa

    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1 (rows per batch), got {batch_size!r}")
    if check:
        check_fingerprint(head, store.fingerprint(), where=f"store {str(getattr(store, 'path', ''))!r}")
    heat_cls = heatmap.check(head) if heatmap is not None else None
    out = Path(out_path)
    if not out.parent.is_dir():
        raise HeadError(f"output folder {str(out.parent)!r} does not exist; create it first")
    t0 = time.perf_counter()
    labels = np.asarray(head.classes, dtype=object)
    counts = np.zeros(len(labels), dtype=np.int64)
    heat: list[tuple[np.ndarray, np.ndarray]] = []
    writer = None
    rows = 0
    level0 = level0_sides(store)
    # Arrow columns straight from the shards where the store has them: no Python string per row
    arrow_meta = getattr(store, "metadata_arrow", None)
    proba = head.predictor(batch_size)
    with atomic_open(out, "wb") as sink:
        for ids, emb in store.scan(batch_size):
            prob = proba(emb)
            pred = head.decide(prob)
            counts += np.bincount(pred, minlength=len(labels))
            meta = (arrow_meta(ids, META_COLUMNS) if arrow_meta is not None
                    else store.metadata(ids, columns=META_COLUMNS))
            if meta.get("slide") is not None:
                meta["tile_size_level0"] = level0(meta["slide"])
            batch = _record_batch(head.classes, pred, prob, meta)
            if writer is None:
                schema = batch.schema
                writer = pa.ipc.new_file(sink, schema)
            writer.write_batch(batch if batch.schema == schema else batch.cast(schema))
            rows += len(ids)
            if heatmap is not None and meta.get("slide") is not None:
                on = _objects(meta["slide"]) == heatmap.slide
                if on.any():
                    xy = np.stack([_ints(meta["x"])[on], _ints(meta["y"])[on]], axis=1)
                    heat.append((xy, prob[on, heat_cls]))
        if writer is None:
            raise HeadError(f"store {str(getattr(store, 'path', ''))!r} has no rows to predict")
        writer.close()
    heat_path = None
    if heatmap is not None:
        if not heat:
            raise HeadError(f"slide {heatmap.slide!r} has no tiles in the store; predictions were "
                            f"written to {str(out)!r} but no heatmap")
        coords = np.concatenate([h[0] for h in heat])
        values = np.concatenate([h[1] for h in heat])
        assert heat_cls is not None           # set whenever a heatmap is asked for
        title = f"{heatmap.slide}: P({head.classes[heat_cls]})"
        heat_path = render_heatmap(heatmap.thumbnail, heatmap.downsample, coords, values,
                                   heatmap.out, tile_size=heatmap.tile_size, alpha=heatmap.alpha, title=title)
    return {"rows": rows, "seconds": time.perf_counter() - t0, "path": str(out),
            "heatmap": str(heat_path) if heat_path else None,
            "counts": {str(c): int(n) for c, n in zip(labels, counts)}}

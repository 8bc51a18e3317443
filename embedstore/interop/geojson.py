"""One slide's tiles as a QuPath-compatible GeoJSON FeatureCollection.

Each live tile of the slide is a ``Feature`` whose geometry is the level-0 square
``(x, y) - (x + s, y + s)`` (``s``: the level-0 tile side, see :mod:`.geometry`), with
``properties``: ``objectType: "tile"``, ``name`` (the tile key), ``classification``
(``{"name": pred, "color": [r, g, b]}``, when predictions are given) and ``measurements``
(numbers only: ``prob_<class>``, ``similarity`` to a query tile, ``cluster``). Tissue contours
from the mask extraction wrote (``STORE/masks/<slide>.mask.png``) are ``objectType:
"annotation"`` polygons (with holes), classified ``Tissue``. QuPath reads the file with
File → Import objects from file, or by dragging it onto the open image.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import l2_normalise
from ..errors import ConfigError, SlideError, SourceError, UnknownKeyError
from ..store.atomic import atomic_open
from ..store.geometry import SlideGeometry, _mask_file, slide_geometry

__all__ = ["export_geojson", "tile_feature", "tissue_features", "PALETTE"]

# QuPath class colours (r, g, b), assigned to classes in order
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
TISSUE_COLOR = [0, 160, 0]


def _num(v: Any) -> float | int | None:
    """A JSON-safe number, or None for NaN, infinity and what is not a number."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def tile_feature(key: str, x: float, y: float, side: float, cls: str | None = None,
                 color: list[int] | None = None, measurements: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GeoJSON Feature of one tile: the square (x, y) - (x + side, y + side), level-0 px."""
    x0, y0, x1, y1 = (round(float(v), 3) for v in (x, y, x + side, y + side))
    props: dict[str, Any] = {"objectType": "tile", "name": key}
    if cls is not None:
        props["classification"] = {"name": cls, "color": list(color or PALETTE[0])}
    meas = {k: n for k, v in (measurements or {}).items() if (n := _num(v)) is not None}
    if meas:
        props["measurements"] = meas
    return {"type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": props}


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _ring(points: np.ndarray, outer: bool) -> list[list[float]]:
    """A closed ring, exterior counter-clockwise and holes clockwise (RFC 7946)."""
    r = np.asarray(points, np.float64)
    if not np.array_equal(r[0], r[-1]):
        r = np.vstack([r, r[:1]])
    if (_signed_area(r) > 0) != outer:
        r = r[::-1]
    return np.round(r, 2).tolist()


def tissue_features(mask: np.ndarray, dims: tuple[int, int]) -> list[dict[str, Any]]:
    """Tissue contours of a (h, w) bool mask spanning a slide of level-0 ``dims`` (w, h): one
    ``annotation`` Feature per connected piece, its holes as interior rings. Boundaries run
    through the pixel edges' midpoints (marching squares): a convex corner cuts an eighth of a
    pixel and a concave one adds it, so a blob's area is its pixel count to within a pixel;
    pixels touching only at a corner are split apart, which keeps every polygon valid."""
    import contourpy   # a dependency of matplotlib

    mask = np.asarray(mask, bool)
    h, w = mask.shape
    if not mask.any():
        return []
    sx, sy = dims[0] / w, dims[1] / h
    z = np.pad(mask, 1).astype(np.float64)
    xs = (np.arange(w + 2) - 0.5) * sx            # padded column j is pixel j-1, centre (j-0.5)*sx
    ys = (np.arange(h + 2) - 0.5) * sy
    gen = contourpy.contour_generator(xs, ys, z, fill_type="OuterOffset")
    filled: Any = gen.filled(0.5 + 1e-6, 2.0)     # just above 0.5: saddles count as outside
    points, offsets = filled                     # OuterOffset: (points per polygon, ring offsets)
    out = []
    for pts, offs in zip(points, offsets):
        rings = [_ring(pts[offs[i]:offs[i + 1]], outer=i == 0) for i in range(len(offs) - 1)]
        rings = [r for r in rings if len(r) >= 4]
        if rings:
            out.append({"type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": rings},
                        "properties": {"objectType": "annotation", "name": "tissue",
                                       "classification": {"name": "Tissue", "color": TISSUE_COLOR},
                                       "isLocked": False}})
    return out


def _read_mask(store_path: Path, slide: str) -> np.ndarray:
    from PIL import Image
    f = _mask_file(store_path, slide, ".mask.png")
    if f is None:
        raise SourceError(f"slide {slide!r} has no tissue mask under {store_path / 'masks'} "
                          "(stores extracted from slides have one); drop --tissue")
    with Image.open(f) as img:
        return np.asarray(img.convert("L")) > 127


def _read_predictions(path: Path, slide: str, keys: list[str]) -> tuple[list[str | None], dict[str, np.ndarray]]:
    """(pred per tile or None, numeric columns per tile (NaN where missing)) from an Arrow
    file written by ``predict`` (key, pred, prob_<class>..., slide, x, y), joined by key."""
    import pyarrow as pa
    try:
        try:
            t = pa.ipc.open_file(str(path)).read_all()
        except pa.ArrowInvalid:
            t = pa.ipc.open_stream(str(path)).read_all()
    except pa.ArrowInvalid as e:
        raise SourceError(f"{path} is not an Arrow predictions file ({e})") from None
    if "key" not in t.column_names:
        raise SourceError(f"{path} has no 'key' column; write it with `embedstore predict`")
    at = {k: i for i, k in enumerate(t.column("key").to_pylist())}
    rows = np.array([at.get(k, -1) for k in keys], np.int64)
    if not (rows >= 0).any():
        raise SourceError(f"{path} has no predictions for the tiles of slide {slide!r}")
    take = np.where(rows >= 0, rows, 0)
    preds: list[str | None] = [None] * len(keys)
    if "pred" in t.column_names:
        col = t.column("pred").to_pylist()
        preds = [None if r < 0 or col[r] is None else str(col[r]) for r in rows]
    numeric: dict[str, np.ndarray] = {}
    for name in t.column_names:
        kind = t.schema.field(name).type
        if name in ("x", "y") or not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            continue
        v = t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)[take]
        numeric[name] = np.where(rows >= 0, v, np.nan)
    return preds, numeric


def _head_predictions(store: Any, head_dir: Path, emb: np.ndarray) -> tuple[list[str | None], dict[str, np.ndarray],
                                                                          list[str]]:
    from ..heads import check_fingerprint, load_head
    head = load_head(head_dir)
    check_fingerprint(head, store.fingerprint(), where=f"store {str(store.path)!r}")
    prob = head.predict_proba(np.asarray(emb, np.float32))
    pred = head.decide(prob)
    classes = list(head.classes)
    return ([classes[i] for i in pred], {f"prob_{c}": prob[:, i] for i, c in enumerate(classes)}, classes)


def _clusters(emb: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    import faiss
    x = l2_normalise(emb)
    if k > len(x):
        raise ConfigError(f"--clusters {k} is more than the slide's {len(x)} tiles")
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(x)
    return np.asarray(km.index.search(x, 1)[1][:, 0], np.int64)


def _features(keys: list[str], coords: np.ndarray, side: float, preds: list[str | None],
              meas: dict[str, np.ndarray], classes: list[str]) -> Iterator[dict[str, Any]]:
    colors = {c: list(PALETTE[i % len(PALETTE)]) for i, c in enumerate(classes)}
    for i, key in enumerate(keys):
        p = preds[i]
        yield tile_feature(key, coords[i, 0], coords[i, 1], side, p, colors.get(p or ""),
                           {name: v[i] for name, v in meas.items()})


def export_geojson(store: Any, slide: str, out: str | os.PathLike[str], *, predictions: str | os.PathLike[str] |
                   None = None, head: str | os.PathLike[str] | None = None, query: str | None = None,
                   tissue: bool = False, clusters: int | None = None) -> dict[str, Any]:
    """Write ``out`` (GeoJSON) for ``slide`` of ``store`` (an open Store); returns a summary:
    path, slide, tiles, annotations, tile_l0, geometry (where tile_l0 came from), classes,
    measurements. ``predictions`` (an Arrow file from ``predict``) and ``head`` (a head
    directory, run on the slide's embeddings) are exclusive."""
    if predictions is not None and head is not None:
        raise ConfigError("give --predictions or --head, not both")
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {str(out.parent)!r} does not exist; create it first")
    bag = store.slide(slide)
    meta = store.metadata(bag.ids, ("tile_size", "mpp"))
    sizes, mpps = np.asarray(meta["tile_size"]), np.asarray(meta["mpp"], np.float64)
    geo: SlideGeometry = slide_geometry(store, slide, bag.coords[:, 0], bag.coords[:, 1],
                                        tile_size=float(sizes[sizes > 0][0]) if (sizes > 0).any() else None,
                                        mpp=float(mpps[np.isfinite(mpps)][0]) if np.isfinite(mpps).any() else None)
    if geo.tile_l0 is None or (bag.coords < 0).any():
        raise SlideError(f"slide {slide!r} has no level-0 tile geometry in {store.path} (tiles without "
                         "x, y); export-geojson needs tiles cut from a slide")
    preds: list[str | None] = [None] * len(bag.keys)
    meas: dict[str, np.ndarray] = {}
    classes: list[str] = []
    if predictions is not None:
        preds, meas = _read_predictions(Path(predictions), slide, bag.keys)
        classes = [n[5:] for n in meas if n.startswith("prob_")]
    elif head is not None:
        preds, meas, classes = _head_predictions(store, Path(head), bag.emb)
    classes += sorted({p for p in preds if p is not None} - set(classes))
    if query is not None:
        try:
            q = store.gather(store.ids([query]))
        except UnknownKeyError:
            raise UnknownKeyError(f"query tile {query!r} is not in {store.path}") from None
        meas["similarity"] = l2_normalise(bag.emb) @ l2_normalise(q)[0]
    if clusters is not None:
        meas["cluster"] = _clusters(bag.emb, clusters)
    annotations: list[dict[str, Any]] = []
    if tissue:
        if geo.dims is None:
            raise SourceError(f"slide {slide!r} has no level-0 size recorded (masks/*.grid.json); drop --tissue")
        annotations = tissue_features(_read_mask(Path(store.path), slide), geo.dims)
    n = 0
    with atomic_open(out, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for feat in itertools.chain(annotations, _features(bag.keys, bag.coords, geo.tile_l0, preds, meas, classes)):
            f.write((",\n" if n else "") + json.dumps(feat, separators=(",", ":")))
            n += 1
        f.write("\n]}\n")
    return {"path": str(out), "slide": slide, "tiles": len(bag.keys), "annotations": len(annotations),
            "tile_l0": geo.tile_l0, "geometry": geo.source, "classes": classes, "measurements": sorted(meas)}

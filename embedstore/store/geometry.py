"""Where a tile lies on its slide, in level-0 pixels: the level-0 side of a tile.

A slide tile of ``tile_size`` px at ``mpp`` µm/px covers ``tile_size * mpp / slide_mpp`` level-0
pixels per side (``tile_l0``). The store records it in several places, read in this order:

1. ``STORE/masks/<slide>.grid.json`` (written by ``extract``): ``tile_l0`` and the slide's
   level-0 ``dims`` exactly as tiled;
2. the slide's work unit (``Store.units()["slide:<slide>"]``): ``slide_mpp``, with the rows'
   ``tile_size`` and ``mpp`` (or STORE.json's ``tile``);
3. STORE.json ``tile.patch_size_level0`` (stores imported from TRIDENT h5 files);
4. the smallest step between distinct x (or y) of the slide's tiles (approximate: the grid
   rounds each corner to whole pixels).
"""
from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["SlideGeometry", "slide_geometry", "mask_stem", "level0_sides", "grid_step"]

_SIDES: "weakref.WeakKeyDictionary[Any, dict[str, float]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SlideGeometry:
    slide: str
    tile_l0: float | None          # level-0 px per tile side (None: the slide has no geometry)
    dims: tuple[int, int] | None   # level-0 (width, height) when known
    slide_mpp: float | None        # µm/px of level 0 when known
    source: str                    # where tile_l0 came from: grid.json | unit | store.json | grid-step | none


def mask_stem(slide: str) -> str:
    """The file stem extraction gives a slide's mask, overlay and grid (``/`` -> ``__``)."""
    return slide.replace("/", "__")


def _mask_file(store_path: Path, slide: str, suffix: str) -> Path | None:
    """``STORE/masks/<stem><suffix>`` when it exists and stays inside ``STORE/masks``."""
    masks = (store_path / "masks").resolve()
    f = (masks / f"{mask_stem(slide)}{suffix}").resolve()
    return f if f.parent == masks and f.is_file() else None


def read_grid(store_path: Path, slide: str) -> dict[str, Any] | None:
    """The slide's ``grid.json`` written at extraction, or None."""
    f = _mask_file(Path(store_path), slide, ".grid.json")
    if f is None:
        return None
    try:
        d = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def positive(v: Any) -> float | None:
    """``v`` as a positive finite float, or None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def grid_step(x: np.ndarray, y: np.ndarray) -> float | None:
    """The smallest positive step between distinct level-0 x (or y) corners (None: one tile)."""
    steps = []
    for v in (x, y):
        u = np.unique(np.asarray(v, np.int64)[np.asarray(v) >= 0])
        d = np.diff(u)
        if d.size:
            steps.append(float(d.min()))
    return min(steps) if steps else None


def slide_geometry(store: Any, slide: str, x: np.ndarray | None = None, y: np.ndarray | None = None,
                   tile_size: float | None = None, mpp: float | None = None,
                   units: Mapping[str, Any] | None = None) -> SlideGeometry:
    """The level-0 tile side of ``slide`` in ``store`` (see the module docstring for the order).
    ``x, y``: the slide's level-0 corners (for the last resort); ``tile_size, mpp``: of its
    tiles (default: STORE.json ``tile``). ``store``: a Store (reads path, meta, units);
    ``units``: ``store.units()`` already read, for callers looking up many slides."""
    path = Path(store.path)
    tile = dict(getattr(store.meta, "tile", None) or {})
    grid = read_grid(path, slide)
    dims: tuple[int, int] | None = None
    if grid is not None and isinstance(grid.get("dims"), list) and len(grid["dims"]) == 2:
        dims = (int(grid["dims"][0]), int(grid["dims"][1]))
    slide_mpp = positive(grid.get("slide_mpp")) if grid else None
    if grid is not None and positive(grid.get("tile_l0")):
        return SlideGeometry(slide, float(grid["tile_l0"]), dims, slide_mpp, "grid.json")
    unit = (units if units is not None else store.units()).get(f"slide:{slide}") or {}
    slide_mpp = slide_mpp or positive(unit.get("slide_mpp"))
    size = positive(tile_size) or positive(tile.get("tile_size")) or positive(tile.get("patch_size"))
    tmpp = positive(mpp) or positive(tile.get("mpp"))
    if slide_mpp and size and tmpp:
        return SlideGeometry(slide, size * tmpp / slide_mpp, dims, slide_mpp, "unit")
    if positive(tile.get("patch_size_level0")):
        return SlideGeometry(slide, float(tile["patch_size_level0"]), dims, slide_mpp, "store.json")
    if x is not None and y is not None:
        step = grid_step(x, y)
        if step:
            return SlideGeometry(slide, step, dims, slide_mpp, "grid-step")
    return SlideGeometry(slide, None, dims, slide_mpp, "none")


def _coords(store: Any, slide: str) -> np.ndarray:
    """(n, 2) level-0 x, y of a slide's tiles: from the ids and two metadata columns where the
    store has ``slide_ids`` (``slide()`` also reads every tile's embedding: ~4 ms a slide,
    8 s of a 10M-row predict over 2,000 slides)."""
    ids_of = getattr(store, "slide_ids", None)
    if ids_of is None:
        return np.asarray(store.slide(slide).coords)
    ids = ids_of(slide)
    if not len(ids):
        raise KeyError(slide)
    meta = store.metadata(ids, ("x", "y"))
    return np.stack([np.asarray(meta["x"]), np.asarray(meta["y"])], axis=1).astype(np.int64)


def _side(store: Any, slide: str, units: Mapping[str, Any]) -> float:
    """One slide's level-0 tile side (NaN: unknown); the last resort reads the slide's corners."""
    side = slide_geometry(store, slide, units=units).tile_l0
    if side is None and hasattr(store, "slide"):
        try:
            xy = _coords(store, slide)
        except KeyError:                       # a slide the store does not hold
            return float("nan")
        side = slide_geometry(store, slide, xy[:, 0], xy[:, 1], units=units).tile_l0
    return side or float("nan")


def level0_sides(store: Any) -> Callable[[Any], np.ndarray | None]:
    """(b,) slides (an object array, or an Arrow string column) -> (b,) float64 level-0 tile
    side per row (NaN where unknown), each distinct slide looked up once and spread to its rows
    by Arrow's dictionary encoding (no Python work per row); None for a store that records no
    slide geometry (tile files, or a fake without ``units``/``meta``)."""
    if not (hasattr(store, "units") and hasattr(store, "meta")):
        return lambda slides: None
    try:                       # a slide's side never changes: remembered per store object
        known = _SIDES.setdefault(store, {})
    except TypeError:          # not weak-referenceable
        known = {}
    units: list[Mapping[str, Any]] = []      # the catalog's units, read at most once per lookup

    def sides(slides: Any) -> np.ndarray | None:
        import pyarrow as pa
        col = slides if isinstance(slides, (pa.Array, pa.ChunkedArray)) else \
            pa.array(np.asarray(slides, dtype=object), type=pa.string())
        enc = col.dictionary_encode()
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        per_name = np.empty(len(enc.dictionary) + 1)
        per_name[-1] = np.nan                                   # null slides: index -1
        for i, name in enumerate(enc.dictionary.to_pylist()):
            if name not in known:
                if not units:
                    units.append(store.units())
                known[name] = _side(store, name, units[0])
            per_name[i] = known[name]
        return per_name[enc.indices.fill_null(-1).to_numpy()]
    return sides

"""Interop with per-slide HDF5 feature files in the layout TRIDENT and CLAM write.

One file per slide: dataset ``features`` (N, D), dataset ``coords`` (N, 2) level-0 x, y, with
attributes (TRIDENT puts patch_size, patch_size_level0, level0_magnification,
target_magnification, name on ``coords``). The encoder is read from an ``encoder`` attribute
(root, ``features`` or ``coords``) or given by the caller. Import is resumable: each file is a
unit, so a re-run skips the files already imported.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DimensionMismatchError, SourceError
from .atomic import atomic_path, atomic_write_text
from .meta import StoreMeta
from .protocol import StoreLike
from .writer import StoreWriter

__all__ = ["import_h5", "export_h5", "slide_file_name"]


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _encoder_of(f: Any) -> str | None:
    for obj in (f, f.get("features"), f.get("coords")):
        if obj is not None and "encoder" in obj.attrs:
            return str(_attr(obj.attrs["encoder"]))
    return None


def import_h5(src: Path | str, store: Path | str, *, backbone_name: str | None = None,
              dtype: str = "float16", progress: bool = True) -> dict[str, Any]:
    """Import every ``*.h5`` under ``src`` (recursively) into ``store``. Returns counts."""
    import h5py
    from tqdm import tqdm
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"{src} is not a directory of .h5 feature files")
    files = sorted(src.rglob("*.h5"))
    if not files:
        raise SourceError(f"no .h5 files under {src}")
    with h5py.File(files[0], "r") as f:
        if "features" not in f or "coords" not in f:
            raise SourceError(f"{files[0]} lacks the 'features' and 'coords' datasets "
                              "(TRIDENT/CLAM layout)")
        dim = int(f["features"].shape[-1])
        encoder = _encoder_of(f)
        coord_attrs = {k: _attr(v) for k, v in f["coords"].attrs.items()}
    name = backbone_name or encoder
    if not name:
        raise SourceError(f"{files[0]} has no 'encoder' attribute; pass --backbone-name NAME "
                          "to record which backbone made these features")
    tile = {k: coord_attrs[k] for k in ("patch_size", "patch_size_level0", "level0_magnification",
                                       "target_magnification") if k in coord_attrs}
    meta = StoreMeta(dim=dim, dtype=dtype, backbone={"name": name, "kind": "imported"},
                     tile=tile)
    done_files = 0
    rows = 0
    with StoreWriter(store, meta) as w:
        done = w.units_done()
        for path in tqdm(files, desc="import-h5", unit="slide", disable=not progress):
            rel = path.relative_to(src).as_posix()
            unit = "h5:" + rel
            if unit in done:
                continue
            with h5py.File(path, "r") as f:
                if "features" not in f or "coords" not in f:
                    raise SourceError(f"{path} lacks 'features' or 'coords'")
                feats = np.asarray(f["features"][()])
                coords = np.asarray(f["coords"][()])
                slide = str(_attr(f.attrs.get("slide_id", rel[:-3])))
                enc = _encoder_of(f)
            if feats.ndim == 3:  # CLAM sometimes writes (1, N, D)
                feats = feats.reshape(-1, feats.shape[-1])
            if feats.shape[1] != dim:
                raise DimensionMismatchError(f"{path}: features are {feats.shape[1]}-d, "
                                             f"the first file's are {dim}-d")
            if enc and backbone_name is None and enc != name:
                raise SourceError(f"{path}: encoder {enc!r} differs from {name!r} of the first file")
            if coords.shape != (feats.shape[0], 2):
                raise SourceError(f"{path}: coords {coords.shape} do not match features {feats.shape}")
            x, y = coords[:, 0].astype(np.int64), coords[:, 1].astype(np.int64)
            keys = [f"{slide}/{a}_{b}" for a, b in zip(x.tolist(), y.tolist())]
            if feats.shape[0]:
                w.add(feats, keys, unit=unit, slide=slide, source=str(src), x=x, y=y,
                      tile_size=tile.get("patch_size"))
            w.end_unit(unit)
            done_files += 1
            rows += feats.shape[0]
    return {"files": done_files, "rows": rows, "skipped": len(files) - done_files}


SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs")
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
MAPPING = "slides.csv"


def _natural_stem(slide: str) -> str:
    """The slide id without its slide-file suffix (what the file is named when the id is safe)."""
    return slide.rsplit(".", 1)[0] if slide.lower().endswith(SLIDE_SUFFIXES) else slide


def slide_file_name(slide: str) -> str:
    """The ``.h5`` file (relative to ``--out``) for a slide id: its ``/``-separated parts kept as
    subfolders when every one is a safe name (letters, digits, ``._+-``, not starting with a dot),
    else the whole id flattened into one safe name with a hash of the id (never ``..``, absolute,
    control characters, empty parts)."""
    stem = _natural_stem(slide)
    parts = stem.split("/")
    if stem and all(_SAFE.fullmatch(p) for p in parts):
        return "/".join(parts) + ".h5"
    flat = re.sub(r"[^A-Za-z0-9._+-]+", "_", stem).strip("._") or "slide"
    digest = hashlib.sha256(slide.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{flat[:150]}-{digest}.h5"


def _inside(out: Path, rel: str) -> Path:
    path = (out / rel).resolve()
    if not path.is_relative_to(out.resolve()):  # a symlinked subfolder, say
        raise SourceError(f"export-h5: {rel} would be written outside {out}; refused")
    return path


def export_h5(store: StoreLike, out: Path | str, *, progress: bool = True) -> dict[str, Any]:
    """Write one TRIDENT-layout ``.h5`` per slide of ``store`` under ``out`` (never outside it:
    slide ids become safe file names, see :func:`slide_file_name`), and ``out/slides.csv``
    mapping each slide id to its file."""
    import h5py
    from tqdm import tqdm
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = (store.meta.backbone or {}).get("name") or "unknown"
    tile = store.meta.tile or {}
    slides = store.slides()
    if not slides:
        raise SourceError(f"{store.path} has no slides to export (tiles without a slide)")
    files: dict[str, str] = {}
    used: set[str] = set()
    for s in slides:
        rel = slide_file_name(s)
        if rel.lower() in used:   # two ids naming one file (or differing only in case)
            rel = rel[:-3] + "-" + hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()[:10] + ".h5"
        used.add(rel.lower())
        files[s] = rel
    rows = 0
    for s in tqdm(slides, desc="export-h5", unit="slide", disable=not progress):
        bag = store.slide(s)
        path = _inside(out, files[s])
        stem = path.name[:-3]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["encoder"] = encoder
            f.attrs["slide_id"] = s
            d = f.create_dataset("features", data=bag.emb.astype(np.float32))
            d.attrs["encoder"] = encoder
            d.attrs["name"] = stem
            c = f.create_dataset("coords", data=bag.coords.astype(np.int64))
            c.attrs["name"] = stem
            for k, v in tile.items():
                if isinstance(v, (int, float, str)):
                    c.attrs[k] = v
            if "patch_size" not in c.attrs and tile.get("tile_size"):
                c.attrs["patch_size"] = int(tile["tile_size"])
        rows += len(bag.ids)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide", "file"])
    w.writerows([s, files[s]] for s in slides)
    atomic_write_text(out / MAPPING, buf.getvalue())
    renamed = sum(1 for s in slides if files[s][:-3] != _natural_stem(s))
    return {"files": len(slides), "rows": rows, "mapping": str(out / MAPPING), "renamed": renamed}

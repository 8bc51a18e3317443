"""Interop with per-slide HDF5 feature files in the layouts TRIDENT and CLAM write and read.

TRIDENT (trident/IO.py ``save_h5``, ``coords_to_h5``; trident/wsi_objects/WSI.py) writes a job
folder ``<mag>x_<px>px_<overlap>px_overlap/`` holding ``patches/<slide>_patches.h5`` (coords only)
and ``features_<encoder>/<slide>.h5``: dataset ``features`` (N, D) float32 with attrs ``name``,
``savetodir``, ``encoder``; dataset ``coords`` (N, 2) int64 level-0 x, y with attrs
``patch_size`` (px at the target magnification), ``patch_size_level0``, ``level0_magnification``,
``target_magnification``, ``overlap``, ``name``, ``savetodir``, ``level0_width``,
``level0_height``; both chunked along N with ``maxshape=(None, ...)``. CLAM
(extract_features_fp.py, dataset_modules/dataset_generic.py) reads ``h5_files/<slide_id>.h5``
(``features``, ``coords``) and ``pt_files/<slide_id>.pt`` (a torch (N, D) tensor).

Magnification and µm/px are converted as ``mag = 10 / mpp`` (0.5 µm/px = 20x), rounded to a
whole magnification on export. Import is resumable: each slide is a unit (``slide:<id>``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DimensionMismatchError, SourceError
from .atomic import atomic_path, atomic_write_text
from .geometry import positive, read_grid
from .meta import StoreMeta
from .protocol import StoreLike
from .writer import StoreWriter

__all__ = ["import_h5", "export_h5", "slide_file_name", "GEOMETRY_KEYS", "SLIDE_KEYS"]

GEOMETRY_KEYS = ("patch_size", "target_magnification", "overlap")  # equal in every file of a store
SLIDE_KEYS = ("patch_size_level0", "level0_magnification", "level0_width", "level0_height")
SPEC_ATTR, SHA_ATTR = "embedstore_backbone", "embedstore_weights_sha256"


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _encoder_of(f: Any) -> str | None:
    """The ``encoder`` attribute (root, ``features`` or ``coords``); TRIDENT's ``'None'`` is none."""
    for obj in (f, f.get("features"), f.get("coords")):
        if obj is not None and "encoder" in obj.attrs:
            enc = str(_attr(obj.attrs["encoder"])).strip()
            return enc if enc and enc != "None" else None
    return None


def _mag_mpp(mag: Any) -> float | None:
    """µm/px of a magnification (10 / mag), or None."""
    m = positive(mag)
    return 10.0 / m if m else None


@dataclass
class _File:
    """One ``.h5`` file as scanned before anything is written."""
    path: Path
    rel: str
    slide: str = ""
    n: int = 0
    dim: int = 0
    encoder: str | None = None
    geometry: dict[str, Any] = field(default_factory=dict)
    per_slide: dict[str, Any] = field(default_factory=dict)
    spec: str | None = None
    sha: str | None = None
    skip: str | None = None         # why it holds no tiles to import


def _folder_encoder(rel: Path) -> str | None:
    for part in reversed(rel.parts[:-1]):
        if part.startswith("features_"):
            return part[len("features_"):] or None
    return None


def _candidates(src: Path) -> tuple[list[_File], list[str]]:
    """The files to scan and a note on the ones left out: in a TRIDENT job folder only
    ``features_*/**.h5`` (``patches/*_patches.h5`` hold coords, ``slide_features_*`` one vector
    per slide); elsewhere every ``*.h5`` but ``*_patches.h5``. ``slide`` is preset to the path
    below the features folder (the fallback when a file names no slide)."""
    rels = [(p, p.relative_to(src)) for p in sorted(src.rglob("*.h5"))]
    feats = [(p, r) for p, r in rels if _folder_encoder(r) is not None]
    picked = feats or [(p, r) for p, r in rels if not p.name.endswith("_patches.h5")]
    files = []
    for p, r in picked:
        below = Path(*r.parts[max(i for i, q in enumerate(r.parts[:-1]) if q.startswith("features_")) + 1:]) \
            if feats else r   # features_<enc>/<slide>.h5 -> <slide>
        enc = _folder_encoder(r) or (src.name[len("features_"):] if src.name.startswith("features_") else None)
        files.append(_File(p, r.as_posix(), slide=below.as_posix()[:-3], encoder=enc or None))
    left = len(rels) - len(picked)
    notes = [f"ignored {left} .h5 file(s) outside features_* folders or named *_patches.h5 "
             "(TRIDENT's patches/ hold coords only, slide_features_* one vector per slide)"] if left else []
    return files, notes


def _scan(f: Any, file: _File) -> None:
    """Fill ``file`` from the open h5 file ``f`` (shapes and attributes only, no data read)."""
    if "features" not in f or "coords" not in f:
        file.skip = "no 'features' and 'coords' datasets (a coords-only patches file?)"
        return
    shape = tuple(f["features"].shape)
    if len(shape) == 3 and shape[0] == 1:          # CLAM sometimes writes (1, N, D)
        shape = shape[1:]
    if len(shape) == 1:
        file.skip = ("empty features (0 tiles)" if shape[0] == 0
                     else f"slide-level features {shape} (one vector per slide, not tiles)")
        return
    if len(shape) != 2:
        file.skip = f"features of shape {shape}, not (N, D)"
        return
    file.n, file.dim = int(shape[0]), int(shape[1])
    if file.n == 0:
        file.skip = "empty features (0 tiles)"
        return
    if tuple(f["coords"].shape) != (file.n, 2):
        raise SourceError(f"{file.path}: coords {tuple(f['coords'].shape)} do not match features "
                          f"{shape}; the file is not in the TRIDENT/CLAM layout")
    cattrs = {k: _attr(v) for k, v in f["coords"].attrs.items()}
    fattrs = {k: _attr(v) for k, v in f["features"].attrs.items()}
    for name in (_attr(f.attrs.get("slide_id")), fattrs.get("name"), cattrs.get("name")):
        if isinstance(name, str) and name.strip() and name != "None":
            file.slide = name
            break
    file.encoder = _encoder_of(f) or file.encoder
    file.geometry = {k: cattrs[k] for k in GEOMETRY_KEYS if k in cattrs}
    file.per_slide = {k: cattrs[k] for k in SLIDE_KEYS if k in cattrs and cattrs[k] != "None"}
    file.spec = _attr(f.attrs[SPEC_ATTR]) if SPEC_ATTR in f.attrs else None
    file.sha = _attr(f.attrs[SHA_ATTR]) if SHA_ATTR in f.attrs else None


def _agree(files: list[_File], what: str, get: Callable[[_File], Any], fix: str) -> None:
    """One line naming the first file whose ``what`` differs from the first file's."""
    first = files[0]
    for x in files[1:]:
        if get(x) != get(first):
            raise SourceError(f"{x.path}: {what} {get(x)!r} differs from {get(first)!r} of {first.path}; {fix}")


Resolver = Callable[[str], dict[str, Any] | None]


def _backbone(files: list[_File], name: str, dim: int, resolve: Resolver | None,
              notes: list[str]) -> tuple[dict[str, Any], str]:
    """The spec recorded for ``name``: the one an embedstore export carried, else the registry's
    (``resolve``: name or alias -> ``BackboneSpec.to_dict()``), else ``{name, kind: imported}``."""
    first = files[0]
    if first.spec and all(x.spec == first.spec and x.sha == first.sha for x in files):
        spec = json.loads(first.spec)
        if isinstance(spec, dict) and spec.get("name") == name:
            return spec, first.sha or ""
    found = resolve(name) if resolve is not None else None
    if found is not None and int(found.get("dim", 0)) == dim:
        if found.get("name") != name:
            notes.append(f"encoder {name!r} recorded as the registry's {found.get('name')!r}")
        return found, ""
    if found is not None:
        notes.append(f"encoder {name!r} matches the registry's {found.get('name')!r} by name, but "
                     f"its vectors are {found.get('dim')}-d, these {dim}-d: backbone unknown")
    elif resolve is not None:
        notes.append(f"encoder {name!r} is not in the registry (`embedstore backbones`): "
                     "backbone unknown, the store cannot be searched by image")
    return {"name": name, "kind": "imported"}, ""


def _tile_meta(geometry: dict[str, Any]) -> dict[str, Any]:
    tile: dict[str, Any] = {"kind": "slides"} if geometry else {}
    if "patch_size" in geometry:
        tile["tile_size"] = int(geometry["patch_size"])
    mpp = _mag_mpp(geometry.get("target_magnification"))
    if mpp:
        tile["mpp"] = round(mpp, 6)
    return {**tile, **geometry}


def import_h5(src: Path | str, store: Path | str, *, backbone_name: str | None = None,
              dtype: str = "float16", resolve: Resolver | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Import the per-slide feature files under ``src`` (a TRIDENT job folder as it is, a
    ``features_<encoder>`` folder, CLAM's ``h5_files`` or an ``export-h5`` output) into ``store``.
    Every file is checked (encoder, dim, geometry, slide ids) before anything is written; empty
    and slide-level files are skipped with a note. Returns counts and ``notes``."""
    import h5py
    from tqdm import tqdm
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"{src} is not a directory of .h5 feature files")
    files, notes = _candidates(src)
    for x in files:
        with h5py.File(x.path, "r") as f:
            _scan(f, x)
    skipped = [x for x in files if x.skip]
    notes += [f"skipped {x.rel}: {x.skip}" for x in skipped]
    files = [x for x in files if not x.skip]
    if not files:
        raise SourceError(f"no tile feature files under {src} (features (N, D) with coords (N, 2))"
                          + (f"; {len(skipped)} skipped, e.g. {skipped[0].rel}: {skipped[0].skip}" if skipped else ""))
    if backbone_name is None:
        _agree(files, "encoder", lambda x: x.encoder, "import one features_<encoder> folder per store")
    name = backbone_name or files[0].encoder
    if not name:
        raise SourceError(f"{files[0].path} has no 'encoder' attribute; pass --backbone-name NAME "
                          "to record which backbone made these features")
    _agree(files, "feature dim", lambda x: x.dim, "one store holds one embedding space")
    _agree(files, "geometry", lambda x: x.geometry,
           "mixed geometry: import each magnification / patch size into its own store")
    seen: dict[str, str] = {}
    for x in files:
        if x.slide in seen:
            raise SourceError(f"{x.path} and {seen[x.slide]} both hold slide {x.slide!r}; "
                              "import them into separate stores")
        seen[x.slide] = x.rel
    spec, sha = _backbone(files, name, files[0].dim, resolve, notes)
    tile = _tile_meta(files[0].geometry)
    meta = StoreMeta(dim=files[0].dim, dtype=dtype, backbone=spec, weights_sha256=sha, tile=tile)
    imported, rows = 0, 0
    with StoreWriter(store, meta) as w:
        done = w.units_done()
        for x in tqdm(files, desc="import-h5", unit="slide", disable=not progress):
            unit = f"slide:{x.slide}"
            if unit in done or f"h5:{x.rel}" in done:   # h5:<file>: units of earlier versions
                continue
            with h5py.File(x.path, "r") as f:
                feats = np.asarray(f["features"][()]).reshape(x.n, x.dim)
                coords = np.asarray(f["coords"][()])
            xs, ys = coords[:, 0].astype(np.int64), coords[:, 1].astype(np.int64)
            keys = [f"{x.slide}/{a}_{b}" for a, b in zip(xs.tolist(), ys.tolist())]
            w.add(feats, keys, unit=unit, slide=x.slide, source=str(x.path.parent), x=xs, y=ys,
                  **{k: v for k, v in (("tile_size", tile.get("tile_size")), ("mpp", tile.get("mpp")))
                     if v is not None})
            w.end_unit(unit, info=_unit_info(x))
            imported += 1
            rows += x.n
    return {"files": imported, "rows": rows, "skipped": len(files) - imported,
            "ignored": len(skipped), "backbone": spec.get("name"),
            "backbone_known": spec.get("kind") != "imported", "notes": notes}


def _unit_info(x: _File) -> dict[str, Any]:
    """What a slide's unit records: its file, TRIDENT's per-slide attributes, and the level-0
    µm/px (``slide_mpp``) and tile side (``tile_l0``) that readers of slide geometry look for."""
    info: dict[str, Any] = {"h5": x.rel, "trident": x.per_slide}
    slide_mpp = _mag_mpp(x.per_slide.get("level0_magnification"))
    if slide_mpp:
        info["slide_mpp"] = round(slide_mpp, 6)
    if x.per_slide.get("patch_size_level0") is not None:
        info["tile_l0"] = float(x.per_slide["patch_size_level0"])
    if x.per_slide.get("level0_width") is not None and x.per_slide.get("level0_height") is not None:
        info["dims"] = [int(x.per_slide["level0_width"]), int(x.per_slide["level0_height"])]
    return info


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


def _mag(mpp: float | None) -> int | None:
    """The whole magnification of ``mpp`` µm/px (10 / mpp: 0.5 -> 20x, 0.25 -> 40x)."""
    return max(1, int(round(10.0 / mpp))) if mpp else None


def trident_coords_attrs(store: StoreLike, slide: str, units: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """TRIDENT's ``coords`` attributes for ``slide`` from what the store recorded: the tile size
    and target µm/px (STORE.json ``tile``), the slide's level-0 µm/px, tile side and size
    (``masks/<slide>.grid.json``, else the slide's unit, else STORE.json). Unknown ones are left out."""
    tile = store.meta.tile or {}
    grid = read_grid(Path(store.path), slide) or {}
    unit = units.get(f"slide:{slide}") or {}
    size = positive(tile.get("tile_size")) or positive(tile.get("patch_size"))
    mpp = positive(tile.get("mpp")) or _mag_mpp(tile.get("target_magnification"))
    slide_mpp = positive(grid.get("slide_mpp")) or positive(unit.get("slide_mpp"))
    tile_l0 = (positive(grid.get("tile_l0")) or positive(unit.get("tile_l0"))
               or (size * mpp / slide_mpp if size and mpp and slide_mpp else None)
               or positive(tile.get("patch_size_level0")))
    dims = grid.get("dims") or unit.get("dims")
    attrs: dict[str, Any] = {
        "patch_size": int(size) if size else None,
        "patch_size_level0": int(round(tile_l0)) if tile_l0 else None,
        "level0_magnification": _mag(slide_mpp) or tile.get("level0_magnification"),
        "target_magnification": _mag(mpp),
        "overlap": int(tile.get("overlap", 0) or 0),
        "mpp": mpp, "level0_mpp": slide_mpp, "tile_l0": tile_l0,   # embedstore's exact values
    }
    if isinstance(dims, (list, tuple)) and len(dims) == 2:
        attrs["level0_width"], attrs["level0_height"] = int(dims[0]), int(dims[1])
    return {k: v for k, v in attrs.items() if v is not None}


def _dataset(f: Any, name: str, data: np.ndarray) -> Any:
    """A dataset chunked along N and resizable (``maxshape=(None, ...)``), as TRIDENT writes them."""
    return f.create_dataset(name, data=data, chunks=(min(max(len(data), 1), 32),) + data.shape[1:],
                            maxshape=(None,) + data.shape[1:])


def _write_h5(path: Path, bag_emb: np.ndarray, coords: np.ndarray, *, name: str, slide: str,
              encoder: str, spec: str, sha: str, cattrs: dict[str, Any], extra: dict[str, np.ndarray]) -> None:
    import h5py
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"encoder": encoder, "slide_id": slide, SPEC_ATTR: spec, SHA_ATTR: sha})
        d = _dataset(f, "features", bag_emb.astype(np.float32))
        d.attrs.update({"name": name, "savetodir": str(path.parent), "encoder": encoder})
        c = _dataset(f, "coords", coords.astype(np.int64))
        c.attrs.update({**cattrs, "name": name, "savetodir": str(path.parent)})
        for k, v in extra.items():
            f.create_dataset(k, data=v)


def _file_names(names: list[str]) -> dict[str, str]:
    files: dict[str, str] = {}
    used: set[str] = set()
    for s in names:
        rel = slide_file_name(s)
        if rel.lower() in used:   # two ids naming one file (or differing only in case)
            rel = rel[:-3] + "-" + hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()[:10] + ".h5"
        used.add(rel.lower())
        files[s] = rel
    return files


def _groups(store: StoreLike) -> tuple[str, list[str], Callable[[str], tuple[np.ndarray, np.ndarray, list[str]]]]:
    """What one file holds: a slide (``slides``), else a tile-folder store's source folder or
    CSV (``sources``, the rows' ``source`` column). Returns the kind, the names and a reader."""
    slides = store.slides()
    if slides:
        def bag(s: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
            b = store.slide(s)
            return b.emb, b.coords, b.keys
        return "slide", slides, bag
    ids = store.all_ids()
    if not len(ids):
        raise SourceError(f"{store.path} has no rows to export")
    md = store.metadata(ids, ("source", "x", "y"))
    src = np.array([str(v) if v is not None else "tiles" for v in md["source"]], dtype=object)

    def rows(s: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        j = np.flatnonzero(src == s)
        return store.gather(ids[j]), np.stack([md["x"][j], md["y"][j]], 1), store.keys_of(ids[j])
    return "source", sorted(set(src.tolist())), rows


def export_h5(store: StoreLike, out: Path | str, *, layout: str = "trident",
              progress: bool = True) -> dict[str, Any]:
    """Write one ``.h5`` per slide of ``store`` under ``out`` with TRIDENT's datasets and coords
    attributes (``layout="clam"``: ``out/h5_files/`` and ``out/pt_files/<slide>.pt``, a float32
    torch tensor (N, D)), never outside ``out`` (see :func:`slide_file_name`), and
    ``out/slides.csv`` mapping each slide id to its file. A store of tile folders (no slides)
    gets one file per source folder or CSV, with a ``keys`` dataset of tile keys, coords -1, and
    ``sources.csv``."""
    from tqdm import tqdm
    if layout not in ("trident", "clam"):
        raise SourceError(f"export-h5 layout {layout!r} is not one of trident, clam")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = (store.meta.backbone or {}).get("name") or "unknown"
    spec = json.dumps(store.meta.backbone or {}, sort_keys=True)
    kind, names, read = _groups(store)
    files = _file_names(names)
    units = store.units()
    h5_dir = out / "h5_files" if layout == "clam" else out
    rows, incomplete = 0, 0
    for s in tqdm(names, desc="export-h5", unit=kind, disable=not progress):
        emb, coords, keys = read(s)
        path = _inside(out, (h5_dir / files[s]).relative_to(out).as_posix())
        path.parent.mkdir(parents=True, exist_ok=True)
        cattrs = trident_coords_attrs(store, s, units) if kind == "slide" else {"source": s}
        incomplete += kind == "slide" and not set(SLIDE_KEYS) | {"patch_size"} <= set(cattrs)
        extra = {} if kind == "slide" else {"keys": np.array(keys, dtype=object).astype("S")}
        _write_h5(path, emb, coords, name=path.name[:-3], slide=s, encoder=encoder, spec=spec,
                  sha=store.meta.weights_sha256, cattrs=cattrs, extra=extra)
        if layout == "clam":
            _write_pt(_inside(out, "pt_files/" + files[s][:-3] + ".pt"), emb)
        rows += len(keys)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([kind, "file"])
    w.writerows([s, (h5_dir / files[s]).relative_to(out).as_posix()] for s in names)
    mapping = out / (MAPPING if kind == "slide" else "sources.csv")
    atomic_write_text(mapping, buf.getvalue())
    renamed = sum(1 for s in names if files[s][:-3] != _natural_stem(s))
    return {"files": len(names), "rows": rows, "mapping": str(mapping), "renamed": renamed,
            "layout": layout, "per": kind, "incomplete_geometry": incomplete}


def _write_pt(path: Path, emb: np.ndarray) -> None:
    """CLAM's ``pt_files/<slide>.pt``: ``torch.save`` of the (N, D) float32 tensor."""
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)), tmp)

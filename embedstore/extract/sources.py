"""Tile sources -> work units.

A SOURCE given to ``extract`` is a folder of tiles (class sub-folders become labels), a CSV
manifest (``path,label[,split,slide]``, paths relative to the CSV's folder or absolute), a slide
file, or a folder of slides. Units are slides, or chunks of files; their ids and the tile keys
are stable, so re-runs and resumes address the same tiles:

* files: the key is the path relative to the folder given, or as written in the CSV;
* slides: the slide id is its path relative to the source root, extension included, and a
  tile's key is ``slide_id/x_y`` (level-0 pixels).

A key is one line of printable text: CSV paths are normalised (``./tiles/x`` and ``tiles/x``
are one key, and two rows naming one file are refused), and a CSV whose path, label, split or
slide holds a control character (newline, tab, ...) is refused with one line; a file or slide
whose *name* holds one is kept out of the store and recorded as an error for that input (its
key shown escaped), so the run goes on.
"""
from __future__ import annotations

import csv
import hashlib
import os
import posixpath
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import SourceError

__all__ = ["FileTile", "Unit", "Discovery", "discover", "first_image_side", "control_char",
           "escape_controls", "IMAGE_EXTS", "SLIDE_EXTS"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SLIDE_EXTS = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".czi"}
TIFF_EXTS = {".tif", ".tiff"}
CHUNK = 256  # files per unit
_CONTROL = ("Cc", "Zl", "Zp")   # control characters, line and paragraph separators


def control_char(text: str) -> str | None:
    """The first control character of ``text`` (newline, tab, NUL, U+2028...), None if none."""
    return next((c for c in text if unicodedata.category(c) in _CONTROL), None)


def escape_controls(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\t``, ``\\x1b``): one safe line."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _CONTROL
                   else c for c in text)


def _bad_name(name: str) -> str | None:
    """Why a file's name cannot give a key (a control character), None when it can."""
    c = control_char(name)
    if c is None:
        return None
    return (f"the name {escape_controls(name)!r} holds the control character {c!r}; keys are one "
            "line of text: rename the file")


@dataclass(frozen=True)
class FileTile:
    path: str                 # absolute path of the image
    key: str                  # stable key (relative path as given)
    label: str | None = None  # class folder or CSV label
    split: str | None = None  # CSV split column
    slide: str | None = None  # CSV slide column
    problem: str | None = None  # why it cannot be embedded (a control character in its name)


@dataclass
class Unit:
    id: str                               # stable unit id (catalog key)
    kind: str                             # "files" | "slide"
    source: str                           # the root keys are relative to
    weight: int                           # estimated tiles, for balancing work
    files: list[FileTile] = field(default_factory=list)
    slide_path: str = ""                  # slides: the file
    slide_id: str = ""                    # slides: its path relative to the source root
    problem: str | None = None            # slides: why it cannot be tiled (its name)


@dataclass
class Discovery:
    kind: str                  # "files" or "slides" (one store holds one tile geometry)
    units: list[Unit]
    task: str | None           # name for the labels task (files with labels)

    @property
    def n_files(self) -> int:
        return sum(len(u.files) for u in self.units)


def first_image_side(paths: Iterable[str | os.PathLike[str]]) -> int | None:
    """Width of the first readable image among ``paths`` (header only), None if none is."""
    from PIL import Image
    for p in paths:
        try:
            with Image.open(p) as im:
                return int(im.size[0])
        except Exception:  # unreadable: the run records it; look at the next
            continue
    return None


def _is_slide_tiff(path: Path) -> bool:
    """A TIFF is a slide when it is tiled or large; small strip TIFFs are tiles (Kather)."""
    try:
        import tifffile
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            return bool(getattr(page, "is_tiled", False)) or max(page.shape[:2]) > 4096 or len(tf.series[0].levels) > 1
    except Exception:
        return False


def _kind_of_file(path: Path) -> str | None:
    suf = path.suffix.lower()
    if suf in IMAGE_EXTS:
        return "image"
    if suf in SLIDE_EXTS:
        return "slide"
    if suf in TIFF_EXTS:
        return "slide" if _is_slide_tiff(path) else "image"
    return None


def _chunks(src_tag: str, root: str, tiles: list[FileTile], chunk: int = CHUNK) -> list[Unit]:
    units = []
    for i in range(0, len(tiles), chunk):
        part = tiles[i:i + chunk]
        h = hashlib.sha1("\n".join(t.key for t in part).encode()).hexdigest()[:10]
        units.append(Unit(id=f"files:{src_tag}:{i // chunk:05d}:{h}", kind="files", source=root,
                          weight=len(part), files=part))
    return units


def _folder_files(root: Path, files: list[Path]) -> list[FileTile]:
    tiles = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        parts = rel.split("/")
        problem = _bad_name(rel)
        tiles.append(FileTile(str(f.resolve()), escape_controls(rel) if problem else rel,
                              label=parts[0] if len(parts) > 1 and not problem else None,
                              problem=problem))
    return tiles


def _csv_key(csv_path: Path, line: int, p: str) -> str:
    """The key of a CSV path: normalised (``./a//b`` -> ``a/b``), one line."""
    c = control_char(p)
    if c is not None:
        raise SourceError(f"{csv_path} line {line}: path {escape_controls(p)!r} holds the control "
                          f"character {c!r}; keys are one line of text")
    return posixpath.normpath(p)


def _csv_files(csv_path: Path) -> list[FileTile]:
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{csv_path} is not a readable CSV ({e})") from None
    if "path" not in cols:
        raise SourceError(f"{csv_path} needs a 'path' column (and optionally label, split, slide); "
                          f"found {cols or 'no header'}")
    base = csv_path.parent
    tiles: list[FileTile] = []
    seen: dict[str, tuple[int, str]] = {}      # resolved file -> (line, path as written)
    for i, r in enumerate(rows, start=2):
        r = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k}
        p = r.get("path")
        if not p:
            raise SourceError(f"{csv_path} line {i}: empty path")
        key = _csv_key(csv_path, i, p)
        for col in ("label", "split", "slide"):
            c = control_char(r.get(col) or "")
            if c is not None:
                raise SourceError(f"{csv_path} line {i}: {col} {escape_controls(r[col])!r} holds the "
                                  f"control character {c!r}")
        full = (Path(key) if os.path.isabs(key) else base / key).resolve()
        if str(full) in seen:
            line, first = seen[str(full)]
            raise SourceError(f"{csv_path} line {i}: path {p!r} listed twice (line {line}: {first!r} "
                              "names the same file); list each file once")
        seen[str(full)] = (i, p)
        tiles.append(FileTile(str(full), key, label=r.get("label") or None,
                              split=r.get("split") or None, slide=r.get("slide") or None))
    if not tiles:
        raise SourceError(f"{csv_path} lists no files")
    return tiles


def _slide_unit(path: Path, root: Path) -> Unit:
    from .wsi import slide_id
    sid = slide_id(path, root)
    problem = _bad_name(sid)
    if problem:
        sid = escape_controls(sid)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return Unit(id=f"slide:{sid}", kind="slide", source=str(root.resolve()),
                weight=max(1, size // 100_000), slide_path=str(path.resolve()), slide_id=sid,
                problem=problem)


def discover(sources: list[str | Path], task: str | None = None, files_per_unit: int = CHUNK) -> Discovery:
    """Turn the SOURCE arguments into work units (pure listing: nothing is decoded)."""
    units: list[Unit] = []
    kinds: set[str] = set()
    labelled_names: list[str] = []
    keys_seen: dict[str, str] = {}
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise SourceError(f"source {src} does not exist")
        if p.is_file():
            if p.suffix.lower() == ".csv":
                tiles = _csv_files(p)
                units += _chunks(escape_controls(p.stem), str(p.parent.resolve()), tiles, files_per_unit)
                kinds.add("files")
                if any(t.label for t in tiles):
                    labelled_names.append(escape_controls(p.parent.resolve().name if p.stem == "labels" else p.stem))
                new_keys = [t.key for t in tiles]
            elif _kind_of_file(p) == "slide":
                units.append(_slide_unit(p, p.parent))
                kinds.add("slides")
                new_keys = [units[-1].id]
            else:
                raise SourceError(f"{src}: not a CSV, slide or folder (image files go in a folder)")
        else:
            images, slides = [], []
            for f in sorted(p.rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                k = _kind_of_file(f)
                if k == "image":
                    images.append(f)
                elif k == "slide":
                    slides.append(f)
            if images and slides:
                raise SourceError(f"{src} holds both tile images ({len(images)}) and slides "
                                  f"({len(slides)}); they differ in geometry: extract them into two stores")
            if not images and not slides:
                raise SourceError(f"{src} holds no images or slides")
            if images:
                tiles = _folder_files(p, images)
                units += _chunks(escape_controls(p.resolve().name), str(p.resolve()), tiles, files_per_unit)
                kinds.add("files")
                if any(t.label for t in tiles):
                    labelled_names.append(escape_controls(p.resolve().name))
                new_keys = [t.key for t in tiles]
            else:
                units += [_slide_unit(f, p) for f in slides]
                kinds.add("slides")
                new_keys = [u.id for u in units[-len(slides):]]
        for k in new_keys:
            if k in keys_seen:
                raise SourceError(f"key {k!r} comes from both {keys_seen[k]} and {src}: keys are "
                                  "relative paths, so extract these sources into separate stores")
            keys_seen[k] = str(src)
    if len(kinds) > 1:
        raise SourceError("tile files and whole slides differ in tile geometry; "
                          "extract them into two stores")
    kind = kinds.pop()
    name = task or ("_".join(labelled_names) if labelled_names else None)
    return Discovery(kind=kind, units=units, task=name if labelled_names or task else None)

"""DeepZoom tiles of ``embedstore serve`` (``serve.deepzoom``) against openslide's own
``DeepZoomGenerator`` as the reference: the same pyramid, the same region read for every tile of
every level, and the same pixels, on the shipped slide and the shared pyramidal slides (TIFF,
OME-TIFF read by tifffile, a 2-level JPEG 2000 SVS)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedstore.errors import UnknownKeyError
from embedstore.extract.wsi import SlideReader
from embedstore.serve.deepzoom import DeepZoom, read_dz_tile
from embedstore.serve.slides import SlideReaders

openslide = pytest.importorskip("openslide")
from openslide.deepzoom import DeepZoomGenerator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "sample_data" / "wsi" / "CMU-1-Small-Region.svs"
SHARED_WSI = ROOT.parent / "shared" / "data" / "wsi"
PYRAMID = SHARED_WSI / "CMU-1-Small-Region.pyramid.tiff"


def _slides() -> list[Path]:
    shared = [SHARED_WSI / n for n in ("CMU-1-Small-Region.pyramid.tiff", "TCGA-CR-7395-01A-01-TS1.svs")]
    return [SHIPPED] + [p for p in shared if p.exists()]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not present (plain clone)")
    return path


def test_pure_geometry_of_a_small_pyramid() -> None:
    dz = DeepZoom(1000, 300, ((1000, 300), (250, 75)), (1.0, 4.0))
    assert dz.level_count == 11 and dz.max_level == 10                # ceil(log2(1000)) = 10
    assert dz.dimensions[0] == (1, 1) and dz.dimensions[-1] == (1000, 300)
    assert dz.dimensions[-2] == (500, 150) and dz.dimensions[3] == (8, 3)
    assert dz.tiles(10) == (4, 2) and dz.tiles(0) == (1, 1)
    assert [dz.slide_level(L) for L in (10, 9, 8, 7)] == [0, 0, 1, 1]   # never upscaled
    r = dz.region(10, 1, 0)
    assert (r.x0, r.y0, r.out_width, r.out_height) == (253, 0, 256, 255)
    r = dz.region(7, 0, 0)                                            # /8: from level 1 (/4), halved
    assert (r.slide_level, r.width, r.height, r.out_width, r.out_height) == (1, 250, 75, 125, 38)
    for bad in ((11, 0, 0), (-1, 0, 0), (10, 4, 0), (10, 0, 2), (0, 1, 0)):
        with pytest.raises(UnknownKeyError):
            dz.region(*bad)
    assert 'Width="1000" Height="300"' in dz.dzi_xml() and 'Overlap="1" TileSize="254"' in dz.dzi_xml()


@pytest.mark.parametrize("path", _slides(), ids=lambda p: p.name)
def test_every_tile_region_matches_openslide(path: Path) -> None:
    osr = openslide.OpenSlide(str(path))
    try:
        ref = DeepZoomGenerator(osr, tile_size=254, overlap=1)
        dz = DeepZoom(*osr.dimensions, tuple(osr.level_dimensions), tuple(osr.level_downsamples))
        assert dz.level_count == ref.level_count and dz.dimensions == tuple(ref.level_dimensions)
        for level in range(dz.level_count):
            assert dz.tiles(level) == ref.level_tiles[level]
            cols, rows = dz.tiles(level)
            for col in range(cols):
                for row in range(rows):
                    r = dz.region(level, col, row)
                    (x0, y0), sl, size = ref.get_tile_coordinates(level, (col, row))
                    assert ((r.x0, r.y0), r.slide_level, (r.width, r.height)) == ((x0, y0), sl, size)
                    assert (r.out_width, r.out_height) == ref.get_tile_dimensions(level, (col, row))
    finally:
        osr.close()


def test_tile_pixels_match_openslide_through_the_project_reader() -> None:
    path = _need(PYRAMID)
    osr = openslide.OpenSlide(str(path))
    ref = DeepZoomGenerator(osr, tile_size=254, overlap=1)
    try:
        with SlideReader(path) as reader:
            dz = DeepZoom.of(reader)
            assert dz.level_dimensions == tuple(osr.level_dimensions)
            for level, col, row in ((12, 3, 5), (11, 1, 2), (10, 0, 0), (9, 1, 1), (8, 0, 0)):
                ours = read_dz_tile(reader, dz, level, col, row).astype(np.float32)
                theirs = np.asarray(ref.get_tile(level, (col, row)).convert("RGB"), np.float32)
                assert ours.shape == theirs.shape
                assert np.abs(ours - theirs).mean() < 3.0, (level, col, row)
            # tiny levels: openslide keeps the aspect when it shrinks (a 4 px wide tile where its
            # descriptor says 5); ours is always the declared size
            small = read_dz_tile(reader, dz, 3, 0, 0)
            assert small.shape[1::-1] == ref.get_tile_dimensions(3, (0, 0)) == (5, 6)
    finally:
        osr.close()


def test_an_ome_tiff_pyramid_read_by_tifffile_gives_the_same_tiles() -> None:
    """OpenSlide sees level 0 only of the OME-TIFF; SlideReader (tifffile) reads its 4 levels, and
    its DeepZoom tiles from them equal the pyramidal TIFF's (the same slide)."""
    ome, pyr = _need(SHARED_WSI / "CMU-1-Small-Region.ome.tiff"), _need(PYRAMID)
    with SlideReader(ome) as a, SlideReader(pyr) as b:
        assert a.backend == "tifffile" and len(a.level_dimensions) == 4
        da, db = DeepZoom.of(a), DeepZoom.of(b)
        assert da.dimensions == db.dimensions and (da.slide_level(9), da.slide_level(8)) == (2, 3)
        for level, col, row in ((12, 2, 2), (10, 1, 1), (9, 0, 0), (8, 0, 0)):
            ta, tb = read_dz_tile(a, da, level, col, row), read_dz_tile(b, db, level, col, row)
            assert ta.shape == tb.shape
            assert np.abs(ta.astype(np.float32) - tb.astype(np.float32)).mean() < 3.0


def test_slide_readers_are_bounded_and_reopen_evicted_slides() -> None:
    slides = {"a": SHIPPED, "b": SHIPPED, "c": SHIPPED}
    asked: list[str] = []

    def locate(name: str) -> Path:
        asked.append(name)
        return slides[name]
    readers = SlideReaders(locate, size=2)
    try:
        first = readers.get("a")
        assert readers.get("a") is first and asked == ["a"]            # opened once
        one = readers.dz_jpeg("a", 12, 0, 0)
        readers.get("b")
        readers.get("c")                                              # evicts "a", closing it
        assert first.closed and first.dz_tile(12, 0, 0) is None
        assert readers.dz_jpeg("a", 12, 0, 0) == one and asked == ["a", "b", "c", "a"]
        with pytest.raises(UnknownKeyError):
            readers.dz_jpeg("a", 12, 99, 0)
    finally:
        readers.close()

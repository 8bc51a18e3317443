"""Whole-slide tiling: pure planning on synthetic masks, then real slides.

The shipped CMU-1 small region is always there; the other slides live in ../shared/data/wsi and
their tests skip without it.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedstore.errors import SlideError, SourceError
from embedstore.extract import wsi
from embedstore.extract.wsi import reader as wsi_reader
from embedstore.extract.wsi import tissue as wsi_tissue
from embedstore.extract.wsi import (SlideReader, TileGrid, best_level, otsu_threshold,
                                    parse_tile_key, plan_grid, plan_slide, read_tile,
                                    slide_id, slide_identity, tile_key, tissue_mask)

REPO = Path(__file__).resolve().parents[1]
CMU = REPO / "sample_data" / "wsi" / "CMU-1-Small-Region.svs"
SHARED_WSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi"
needs_shared = pytest.mark.skipif(not SHARED_WSI.is_dir(), reason="../shared/data/wsi absent")


def _keys(grid: TileGrid) -> set[tuple[int, int]]:
    return set(zip(grid.x.tolist(), grid.y.tolist()))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --------------------------------------------------------------------------- pure planning

def test_plan_grid_without_mask_is_full_row_major_lattice():
    g = plan_grid((1000, 700), slide_mpp=0.5, target_mpp=0.5, tile_size=100)
    assert len(g) == 10 * 7                      # partial tiles at the right/bottom are dropped
    assert g.x.dtype == np.int64 and g.y.dtype == np.int64
    assert g.x[:10].tolist() == list(range(0, 1000, 100)) and set(g.y[:10].tolist()) == {0}
    order = np.lexsort((g.x, g.y))                 # row-major: by y, then x
    assert np.array_equal(order, np.arange(len(g)))
    assert (g.level, g.read_size, g.tile_size, g.tile_l0) == (0, 100, 100, 100.0)
    assert np.all(g.tissue == 1.0)


def test_plan_grid_mpp_math_and_level_choice():
    # 40x slide, tiles at 0.5 um/px: each tile spans 448 level-0 px
    g = plan_grid((5000, 5000), 0.25, 0.5, 224, level_downsamples=(1.0, 4.0, 16.0))
    assert g.tile_l0 == pytest.approx(448.0)
    assert (g.level, g.read_size) == (0, 448)     # downsample 4 is coarser than the 2 needed
    g = plan_grid((5000, 5000), 0.25, 0.5, 224, level_downsamples=(1.0, 2.0, 8.0))
    assert (g.level, g.downsample, g.read_size) == (1, 2.0, 224)
    assert g.x[1] == 448 and len(g) == 11 * 11
    # a level a hair coarser than needed (rounded pyramid sizes) is accepted, 2 % is not
    g = plan_grid((5000, 5000), 0.25, 1.0, 224, level_downsamples=(1.0, 4.003, 16.0))
    assert (g.level, g.read_size) == (1, 224)
    g = plan_grid((5000, 5000), 0.25, 1.0, 224, level_downsamples=(1.0, 4.08, 16.0))
    assert (g.level, g.read_size) == (0, 896)
    # 0.499 um/px slide at 0.5 um/px: tiles of 224.45 level-0 px, read as 224, no drift
    g = plan_grid((2220, 2967), 0.499, 0.5, 224)
    assert g.tile_l0 == pytest.approx(224 * 0.5 / 0.499)
    assert g.read_size == 224
    assert g.x[:9].tolist() == [int(np.floor(i * g.tile_l0 + 0.5)) for i in range(9)]
    assert len(g) == 9 * 13
    # upsampling: a 0.5 um/px slide tiled at 0.25 um/px reads half-size regions
    g = plan_grid((1000, 1000), 0.5, 0.25, 224)
    assert (g.level, g.read_size, g.tile_l0) == (0, 112, 112.0)


def test_best_level():
    ds = [1.0, 4.0, 16.0, 32.0]
    assert best_level(ds, 1.0) == 0
    assert best_level(ds, 3.9) == 0
    assert best_level(ds, 4.0) == 1
    assert best_level(ds, 15.0) == 1
    assert best_level(ds, 15.9) == 2          # 16 is within 1 % of 15.9
    assert best_level(ds, 100.0) == 3
    assert best_level(ds, 0.5) == 0           # finer than level 0: level 0 (then upsampled)
    assert best_level([1.0, 2.0005], 2.0) == 1


def test_plan_grid_keeps_tiles_by_tissue_fraction():
    dims = (800, 600)
    mask = np.zeros((75, 100), bool)          # 1/8 scale
    mask[:, :50] = True                       # tissue in level-0 x < 400
    mask[:, 50:56] = True                     # and x < 448: the tile at x=400 is 48 % tissue
    g = plan_grid(dims, 1.0, 1.0, 100, mask, min_tissue=0.25)
    assert sorted(set(g.x.tolist())) == [0, 100, 200, 300, 400]
    assert len(g) == 5 * 6
    np.testing.assert_allclose(g.tissue[g.x == 400], 0.48, atol=1e-6)
    np.testing.assert_allclose(g.tissue[g.x < 400], 1.0)
    g = plan_grid(dims, 1.0, 1.0, 100, mask, min_tissue=0.5)
    assert sorted(set(g.x.tolist())) == [0, 100, 200, 300]
    assert len(plan_grid(dims, 1.0, 1.0, 100, np.zeros((3, 4), bool))) == 0


def test_tissue_fraction_is_exact_for_coarse_masks():
    mask = np.zeros((3, 3), bool)
    mask[1, 1] = True                         # level-0 square [100, 200)^2 on a 300 px slide
    g = plan_grid((300, 300), 1.0, 1.0, 150, mask, min_tissue=0.0)
    # each 150 px tile overlaps the tissue square by 50x50 px
    np.testing.assert_allclose(g.tissue, [50 * 50 / 150 ** 2] * 4, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(slide_mpp=0.0), dict(target_mpp=-1.0),
                                    dict(tile_size=0), dict(min_tissue=1.5)])
def test_plan_grid_rejects_bad_values(kwargs):
    args = dict(dims=(100, 100), slide_mpp=0.5, target_mpp=0.5, tile_size=10) | kwargs
    with pytest.raises(SlideError):
        plan_grid(**args)


def test_grid_json_round_trip(tmp_path):
    mask = np.random.default_rng(0).random((30, 40)) > 0.5
    g = plan_grid((4000, 3000), 0.25, 0.5, 224, mask, level_downsamples=(1.0, 4.0))
    g.save_json(tmp_path / "g.json")
    h = TileGrid.load_json(tmp_path / "g.json")
    assert np.array_equal(g.x, h.x) and np.array_equal(g.y, h.y)
    np.testing.assert_allclose(g.tissue, h.tissue, atol=1e-4)
    assert (h.dims, h.level, h.read_size, h.tile_l0, h.slide_mpp) == \
        (g.dims, g.level, g.read_size, g.tile_l0, g.slide_mpp)


# --------------------------------------------------------------------------- tissue mask

def test_otsu_splits_two_modes():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(20, 4, 5000), rng.normal(180, 10, 3000)])
    t = otsu_threshold(np.clip(v, 0, 255).astype(np.uint8))
    assert 30 < t < 150
    assert (v[:5000] <= t).mean() > 0.99 and (v[5000:] > t).mean() > 0.99


def _reference_morph(mask, r, grow):
    padded = np.pad(mask, r, constant_values=not grow)
    h, w = mask.shape
    stack = [padded[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)]
    return np.any(stack, axis=0) if grow else np.all(stack, axis=0)


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_morphology_matches_brute_force(r):
    mask = np.random.default_rng(r).random((37, 53)) > 0.7
    for grow in (True, False):
        assert np.array_equal(wsi_tissue._morph(mask, r, grow), _reference_morph(mask, r, grow))


def test_median3_equals_pil_median_filter():
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(0)
    for shape in [(50, 70), (1, 9), (3, 3), (200, 1)]:
        a = rng.integers(0, 256, shape).astype(np.uint8)
        ref = np.asarray(Image.fromarray(a).filter(ImageFilter.MedianFilter(3)))
        assert np.array_equal(wsi.median3(a), ref), shape


def test_tissue_mask_finds_stain_and_drops_dust():
    img = np.full((200, 300, 3), 240, np.uint8)
    yy, xx = np.mgrid[:200, :300]
    disc = (yy - 100) ** 2 + (xx - 120) ** 2 < 60 ** 2
    img[disc] = (200, 120, 170)                     # eosin-pink tissue
    img[20:22, 260:262] = (90, 40, 120)             # a 2x2 dust speck
    mask = tissue_mask(img, close_px=2, open_px=2)
    assert mask[100, 120] and not mask[5, 5] and not mask[21, 261]
    assert abs(mask.sum() / disc.sum() - 1) < 0.05


# --------------------------------------------------------------------------- keys and identity

def test_slide_ids_and_tile_keys(tmp_path):
    assert slide_id(tmp_path / "a" / "x.svs", tmp_path) == "a/x.svs"
    assert slide_id(tmp_path / "b" / "x.svs", tmp_path) == "b/x.svs"
    assert slide_id(tmp_path / "x.ome.tiff", tmp_path) == "x.ome.tiff"
    with pytest.raises(SourceError):
        slide_id(tmp_path.parent / "elsewhere.svs", tmp_path)
    key = tile_key("a/x.svs", np.int64(448), 896)
    assert key == "a/x.svs/448_896"
    assert parse_tile_key(key) == ("a/x.svs", 448, 896)


def test_slide_identity_notices_changed_bytes(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 3 << 20, np.uint8).tobytes())
    base = slide_identity(big)
    assert base["size"] == 3 << 20 and slide_identity(big) == base
    for pos in (10, (3 << 20) - 10):                # in the first and in the last MiB
        data = bytearray(big.read_bytes())
        data[pos] ^= 0xFF
        changed = tmp_path / f"changed{pos}.bin"
        changed.write_bytes(bytes(data))
        assert slide_identity(changed)["sha256_head_tail"] != base["sha256_head_tail"]
    copy = tmp_path / "CMU.svs"
    shutil.copyfile(CMU, copy)
    ident = slide_identity(copy)
    with open(copy, "r+b") as f:                   # a small slide is hashed whole
        f.seek(1_000_000)
        b = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([b[0] ^ 1]))
    assert slide_identity(copy) != ident and slide_identity(copy)["size"] == ident["size"]


# --------------------------------------------------------------------------- the shipped slide

@pytest.fixture(scope="module")
def cmu():
    with SlideReader(CMU) as r:
        yield r


@pytest.fixture(scope="module")
def cmu_plan(cmu):
    return plan_slide(cmu, 0.5, 224)


def test_cmu_metadata_and_regions(cmu):
    assert cmu.backend == "tifffile"                 # auto: Aperio SVS goes to tifffile
    with SlideReader(CMU, backend="openslide") as osr:
        assert osr.backend == "openslide" and osr.dimensions == (2220, 2967)
    assert cmu.dimensions == (2220, 2967)
    assert cmu.level_dimensions == [(2220, 2967)] and cmu.level_downsamples == [1.0]
    assert cmu.mpp == pytest.approx(0.499)
    region = cmu.read_region(1000, 1500, 0, 300, 200)
    assert region.shape == (200, 300, 3) and region.dtype == np.uint8
    assert np.all(cmu.read_region(-500, -500, 0, 100, 100) == 255)   # outside: white
    edge = cmu.read_region(2200, 0, 0, 50, 10)
    assert np.all(edge[:, 20:] == 255)
    thumb = cmu.thumbnail(512)
    assert thumb.shape == (512, round(2220 * 512 / 2967), 3) and thumb.dtype == np.uint8


def test_cmu_plan_at_half_micron(cmu, cmu_plan, tmp_path):
    plan = cmu_plan
    frac = plan.mask.mean()
    assert 0.25 < frac < 0.55, frac        # a tissue strip with glass on both sides
    assert plan.mask_mpp == pytest.approx(4.0, rel=0.01)
    g = plan.grid
    assert g.tile_l0 == pytest.approx(224.45, abs=0.01) and g.read_size == 224
    assert g.level == 0 and g.slide_mpp == pytest.approx(0.499)
    assert 40 <= len(g) < 9 * 13           # only tissue tiles of the 117-tile lattice
    tiles = np.stack([read_tile(cmu, g, i) for i in range(len(g))])
    assert tiles.shape == (len(g), 224, 224, 3) and tiles.dtype == np.uint8
    assert np.all(tiles.reshape(len(g), -1).mean(1) < 235)   # no blank tile kept
    # dropped lattice tiles are mostly glass
    full = plan_grid(g.dims, g.slide_mpp, 0.5, 224)
    dropped = sorted(_keys(full) - _keys(g))
    white = [cmu.read_region(x, y, 0, 224, 224).mean() for x, y in dropped[:20]]
    assert np.mean(white) > np.mean(tiles.mean((1, 2, 3)))
    paths = plan.save(tmp_path, "cmu")
    from PIL import Image
    with Image.open(paths["overlay"]) as im:
        assert im.size == (plan.thumbnail.shape[1], plan.thumbnail.shape[0])
    with Image.open(paths["mask"]) as im:
        assert (np.asarray(im) > 0).mean() == pytest.approx(frac)
    assert np.array_equal(TileGrid.load_json(paths["grid"]).x, g.x)


def test_cmu_one_micron_tiles(cmu, cmu_plan):
    g = plan_grid(cmu.dimensions, cmu.mpp, 1.0, 224, cmu_plan.mask,
                  level_downsamples=cmu.level_downsamples)
    assert (g.level, g.read_size) == (0, 449)        # single level: read 449 px, downsample
    t = read_tile(cmu, g, len(g) // 2)
    assert t.shape == (224, 224, 3) and t.dtype == np.uint8 and t.std() > 10


def test_tifffile_reader_matches_openslide(cmu, cmu_plan):
    g = cmu_plan.grid
    with SlideReader(CMU, backend="openslide") as osr:
        assert cmu.mpp == pytest.approx(0.499) and cmu.level_dimensions == osr.level_dimensions
        for i in range(0, len(g), 7):
            assert _mad(read_tile(cmu, g, i), read_tile(osr, g, i)) < 0.5
        assert _mad(cmu.read_region(-30, 2900, 0, 100, 100),
                    osr.read_region(-30, 2900, 0, 100, 100)) < 0.5
        with pytest.MonkeyPatch.context() as m:   # the plan OpenSlide's reader makes: the same grid
            m.setattr(SlideReader, "overview", SlideReader.render)
            assert _keys(plan_slide(osr, 0.5, 224).grid) == _keys(g)


def test_tiff_chunk_reads_equal_whole_level_reads(tmp_path):
    """A tiled level is read chunk by chunk whatever the cache; a level in strips is decoded
    whole when it fits half the cache, else strip by strip: the pixels never differ."""
    import tifffile
    with SlideReader(CMU, backend="tifffile") as tiled:
        level = tiled.read_region(0, 0, 0, 2220, 2967)
    stripped = tmp_path / "strips.tif"
    tifffile.imwrite(stripped, level, rowsperstrip=64, compression="zlib")
    regions = [(0, 0, 300, 200), (100, 1000, 481, 999), (-50, -60, 200, 200),
               (2100, 2900, 300, 300), (239, 239, 2, 2)]
    with SlideReader(stripped, backend="tifffile") as whole, \
            SlideReader(stripped, backend="tifffile", cache_mb=2) as chunked, \
            SlideReader(CMU, backend="tifffile", cache_mb=2) as tiled:
        assert not whole._b()._keys[0].is_tiled
        for x, y, w, h in regions:
            ref = tiled.read_region(x, y, 0, w, h)
            assert np.array_equal(whole.read_region(x, y, 0, w, h), ref)
            assert np.array_equal(chunked.read_region(x, y, 0, w, h), ref)
        assert (0, -1) in whole._b()._cache and (0, -1) not in chunked._b()._cache


def test_render_in_blocks_matches_one_block(cmu, monkeypatch):
    one = cmu.render(4.0)
    monkeypatch.setattr(wsi_reader, "_RENDER_BLOCK", 300)
    blocks = cmu.render(4.0)
    assert blocks.shape == one.shape == (round(2967 / 4), round(2220 / 4), 3)
    assert _mad(blocks, one) < 2.0


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_overview_uses_the_scanner_thumbnail_only_where_it_fits(backend, cmu_plan, monkeypatch):
    """The mask is planned on the SVS's own 574x768 thumbnail (not a 6.6 Mpx level-0 render):
    the same picture within JPEG noise, and the same grid as a render-based plan."""
    r = SlideReader(CMU, backend=backend)
    rendered = r.render(4.0)
    with monkeypatch.context() as m:
        m.setattr(SlideReader, "overview", SlideReader.render)
        by_render = plan_slide(r, 0.5, 224)
    assert _keys(by_render.grid) == _keys(cmu_plan.grid) == _keys(plan_slide(r, 0.5, 224).grid)
    calls: list[float] = []
    monkeypatch.setattr(SlideReader, "render",
                        lambda self, ds: calls.append(ds) or np.zeros((1, 1, 3), np.uint8))
    over = r.overview(4.0)
    assert calls == [] and over.shape == rendered.shape == (round(2967 / 4), round(2220 / 4), 3)
    assert _mad(over, rendered) < 6.0
    r.overview(3.0)                    # finer than the thumbnail (downsample 3.87): render
    r.overview(1000.0)                 # far coarser: the thumbnail still beats level 0
    assert calls == [3.0]
    monkeypatch.setattr(type(r._b()), "associated_size", lambda self, name: None)
    r.overview(4.0)                    # a slide without a thumbnail: render
    assert calls == [3.0, 4.0]
    r.close()


def _read_in_child(reader, grid, queue):
    queue.put(read_tile(reader, grid, 3))


def test_reader_pickles_as_path_and_survives_fork(cmu_plan):
    g = cmu_plan.grid
    with SlideReader(CMU, backend="tifffile") as r:
        expected = read_tile(r, g, 3)
        state = pickle.dumps(r)
        assert len(state) < 500                     # the path, not the decoded cache
        with pickle.loads(state) as r2:
            assert np.array_equal(read_tile(r2, g, 3), expected)
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_read_in_child, args=(r, g, q))
        p.start()
        got = q.get(timeout=30)
        p.join(30)
        assert p.exitcode == 0 and np.array_equal(got, expected)
        assert np.array_equal(read_tile(r, g, 3), expected)   # the parent's handle still works


def test_unreadable_slides_raise_slide_error(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        SlideReader(tmp_path / "missing.svs")
    junk = tmp_path / "junk.svs"
    junk.write_text("not a slide")
    with pytest.raises(SlideError, match="junk.svs"):
        SlideReader(junk)


# --------------------------------------------------------------------------- ../shared slides

@needs_shared
@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_tcga_without_mpp_needs_a_user_mpp(backend):
    path = SHARED_WSI / "TCGA-CR-7395-01A-01-TS1.svs"
    with SlideReader(path, backend=backend) as r:
        assert r.mpp is None and len(r.level_dimensions) == 2
        with pytest.raises(SlideError, match="--slide-mpp") as err:
            plan_slide(r, 0.5, 224)
        assert "TCGA-CR-7395-01A-01-TS1.svs" in str(err.value) and "\n" not in str(err.value)
        plan = plan_slide(r, 1.0, 224, slide_mpp=0.5)   # JPEG 2000 tiles decode
        g = plan.grid
        assert (g.level, g.read_size) == (1, 224) and len(g) > 20
        tiles = [read_tile(r, g, i) for i in range(0, len(g), max(1, len(g) // 8))]
        assert all(t.shape == (224, 224, 3) and t.mean() < 230 for t in tiles)


@needs_shared
def test_tcga_jpeg2000_same_pixels_in_both_readers():
    path = SHARED_WSI / "TCGA-CR-7395-01A-01-TS1.svs"
    with SlideReader(path, backend="openslide") as a, \
            SlideReader(path, backend="tifffile", cache_mb=8) as b:
        assert _mad(a.read_region(1000, 1000, 0, 500, 400),
                    b.read_region(1000, 1000, 0, 500, 400)) < 0.5


@needs_shared
def test_derived_tiffs_match_the_svs(cmu, cmu_plan):
    svs_grid = cmu_plan.grid
    for name, backend in [("CMU-1-Small-Region.pyramid.tiff", "openslide"),
                          ("CMU-1-Small-Region.ome.tiff", "tifffile")]:
        with SlideReader(SHARED_WSI / name) as r:
            assert r.backend == backend and len(r.level_dimensions) == 4
            assert r.dimensions == cmu.dimensions and r.mpp == pytest.approx(0.499)
            g = plan_slide(r, 0.5, 224).grid
            assert (g.level, g.read_size, g.tile_l0) == \
                (svs_grid.level, svs_grid.read_size, svs_grid.tile_l0)
            # masks come from recompressed thumbnails: a tile at the threshold may flip
            common = _keys(g) & _keys(svs_grid)
            assert len(_keys(g) ^ _keys(svs_grid)) <= 2 and len(common) >= 0.95 * len(g)
            tx = {k: i for i, k in enumerate(zip(g.x.tolist(), g.y.tolist()))}
            sx = {k: i for i, k in enumerate(zip(svs_grid.x.tolist(), svs_grid.y.tolist()))}
            diffs = [_mad(read_tile(r, g, tx[k]), read_tile(cmu, svs_grid, sx[k]))
                     for k in sorted(common)]
            # measured ~5.5 mean, ~7.7 max: 4:2:0 JPEG recompression of busy tissue, no shift
            assert np.mean(diffs) < 7 and max(diffs) < 10
            g1 = plan_grid(r.dimensions, r.mpp, 1.0, 224, level_downsamples=r.level_downsamples)
            assert (g1.level, g1.read_size) == (1, 224)     # read from the 2x level
            s1 = plan_grid(cmu.dimensions, cmu.mpp, 1.0, 224)
            assert np.array_equal(g1.x, s1.x) and np.array_equal(g1.y, s1.y)
            d1 = [_mad(read_tile(r, g1, i), read_tile(cmu, s1, i)) for i in range(len(g1))]
            assert np.mean(d1) < 9        # ~6: level 1 was resampled, then recompressed


@needs_shared
def test_ome_tiff_mpp_when_opened_with_openslide():
    with SlideReader(SHARED_WSI / "CMU-1-Small-Region.ome.tiff", backend="openslide") as r:
        assert len(r.level_dimensions) == 1          # OpenSlide misses the SubIFD pyramid
        assert r.mpp == pytest.approx(0.499)          # taken from the OME XML


# --------------------------------------------------------------------------- the fast JPEG path

def _all_tiles(path: Path, monkeypatch: pytest.MonkeyPatch, decoder: object = "real",
               target_mpp: float = 0.5) -> tuple[np.ndarray, list[bool | None]]:
    """Every tissue tile of ``path`` at ``target_mpp`` and the per-level fast-path state, with
    ``decoder`` as the fast decoder (``"real"``: simplejpeg, None: tifffile only)."""
    from embedstore.extract.wsi import tiff
    if decoder != "real":
        monkeypatch.setattr(tiff, "fast_jpeg_decoder", lambda: decoder)
    try:
        with SlideReader(path, backend="tifffile") as r:
            g = plan_slide(r, target_mpp, 224).grid
            tiles = np.stack([read_tile(r, g, i) for i in range(len(g))])
            return tiles, list(r._b()._fast)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("name, rgb", [("CMU-1-Small-Region.svs", True),
                                       ("CMU-1-Small-Region.ome.tiff", False)])
def test_fast_jpeg_path_reads_tifffiles_pixels(name, rgb, monkeypatch):
    """Aperio's untransformed RGB tiles with shared JPEGTables, and a YCbCr OME pyramid: the
    simplejpeg path is taken and gives exactly tifffile's bytes, at every level read."""
    path = CMU if name.endswith(".svs") else SHARED_WSI / name
    if not path.exists():
        pytest.skip(f"{path} absent")
    from embedstore.extract.wsi import tiff
    assert tiff.fast_jpeg_decoder() is not None          # simplejpeg is in the wsi extra
    for mpp in (0.5, 1.0, 2.0):
        fast, state = _all_tiles(path, monkeypatch, target_mpp=mpp)
        slow, off = _all_tiles(path, monkeypatch, decoder=None, target_mpp=mpp)
        assert np.array_equal(fast, slow) and fast.std() > 10
        assert True in state and set(off) == {False}
    with SlideReader(path, backend="tifffile") as r:
        key = r._b()._keys[0]
        assert (int(key.photometric) == 2) is rgb and bool(key.jpegtables) is rgb


def test_fast_jpeg_path_falls_back_where_it_differs_or_refuses(monkeypatch):
    """A decoder whose pixels differ on the level's first chunk is dropped for the level; one
    that refuses a chunk is skipped for that chunk: the tiles stay tifffile's."""
    from embedstore.extract.wsi import tiff
    slow, _ = _all_tiles(CMU, monkeypatch, decoder=None)
    real = tiff.fast_jpeg_decoder()
    assert real is not None
    calls = []

    def off_by_one(stream: bytes) -> np.ndarray:
        calls.append(1)
        return real(stream) ^ 1

    tiles, state = _all_tiles(CMU, monkeypatch, decoder=off_by_one)
    assert np.array_equal(tiles, slow) and state == [False] and len(calls) == 1

    def refuses(stream: bytes) -> np.ndarray:
        calls.append(1)
        raise ValueError("tjDecompressHeader3(): not a JPEG stream TurboJPEG reads")

    calls.clear()
    tiles, state = _all_tiles(CMU, monkeypatch, decoder=refuses)
    assert np.array_equal(tiles, slow) and state == [None] and len(calls) > 1
    monkeypatch.setenv("EMBEDSTORE_FAST_JPEG", "0")
    assert tiff.fast_jpeg_decoder() is None


def test_one_jpeg_stream_splices_tables_and_marks_rgb():
    from embedstore.extract.wsi.tiff import _ADOBE_RGB, _stream_head
    from embedstore.extract.wsi.tiff import _one_stream as one_stream

    def _one_stream(tables, data, rgb):        # the level's head, then the tile
        return one_stream(_stream_head(tables, rgb), data, rgb)
    tables, tile = b"\xff\xd8TABLES\xff\xd9", b"\xff\xd8SOF-SOS-DATA\xff\xd9"
    assert _one_stream(None, tile, rgb=False) == tile
    assert _one_stream(tables, tile, rgb=False) == b"\xff\xd8TABLESSOF-SOS-DATA\xff\xd9"
    assert _one_stream(tables, tile, rgb=True) == b"\xff\xd8" + _ADOBE_RGB + b"TABLESSOF-SOS-DATA\xff\xd9"
    assert _one_stream(tables, b"garbage", rgb=False) is None
    assert _one_stream(b"\xff\xd8TABLES", tile, rgb=False) is None
    jfif = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xdbDQT"
    assert _one_stream(None, jfif, rgb=True) is None and _one_stream(None, jfif, rgb=False) == jfif
    adobe_tables = b"\xff\xd8" + _ADOBE_RGB[:2] + b"\x00\x0eAdobe" + b"\x00" * 7 + b"\xff\xd9"
    assert _one_stream(adobe_tables, tile, rgb=True) is None
    sof_first = b"\xff\xd8\xff\xc0\x00\x11JFIF-looking bytes in the frame header"
    assert _one_stream(None, sof_first, rgb=True) is not None   # markers after SOF do not count


def test_mask_downsample_takes_a_level_just_coarser_than_asked():
    """64k x 48k at 0.25 um/px: 2048 px a side asks 31.25, the 32x level is read as it is; a
    level finer than asked, or over 10 % coarser, is not taken (the 16x level is resized)."""
    from types import SimpleNamespace

    from embedstore.extract.wsi.plan import mask_downsample
    big = SimpleNamespace(dimensions=(64000, 48000), level_downsamples=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    assert mask_downsample(big, 0.25) == 32.0
    assert mask_downsample(big, 0.25, mask_max_side=2250) == pytest.approx(64000 / 2250)  # 28.4: 32 is 12 % off
    assert mask_downsample(SimpleNamespace(dimensions=(64000, 48000), level_downsamples=[1.0, 4.0, 16.0]),
                           0.25) == 31.25
    assert mask_downsample(big, 0.5) == 32.0                       # 8 um/px from the size cap
    assert mask_downsample(big, 0.25, mask_min_mpp=9.0) == 36.0    # 9 um/px: finer levels only


def _marked_tiff(path: Path, jfif: list[bool], flat: bool = False) -> np.ndarray:
    """A 2 x 2 tile photometric-RGB JPEG TIFF whose tiles keep (True) or lose their JFIF APP0
    marker, as PIL writes them (YCbCr samples); returns the pixels written."""
    import io

    import tifffile
    from PIL import Image
    rng = np.random.default_rng(3)
    tiles = [np.full((256, 256, 3), 236, np.uint8) if flat else
             np.clip(rng.normal(150, 40, (256, 256, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    segments = []
    for tile, keep in zip(tiles, jfif):
        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        assert data[2:4] == b"\xff\xe0" and data[6:10] == b"JFIF"
        segments.append(data if keep else data[:2] + data[4 + int.from_bytes(data[4:6], "big"):])
    with tifffile.TiffWriter(path) as tif:
        tif.write(iter(segments), shape=(512, 512, 3), dtype=np.uint8, tile=(256, 256),
                  compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path, mode="r+b") as tf:    # tifffile tags JPEG as YCbCr: say RGB
        tf.pages[0].tags["PhotometricInterpretation"].overwrite(2)
    return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)])


@pytest.mark.parametrize("jfif", [[False, True, False, True], [True, False, True, False]])
def test_fast_jpeg_path_follows_tifffile_on_tiles_with_their_own_markers(jfif, tmp_path, monkeypatch):
    """tifffile reads a photometric-RGB level as RGB or not from its first chunk's JFIF
    marker; libjpeg follows each tile's own. Tiles whose marker disagrees with that choice go
    to tifffile, so the level reads the same bytes both ways (it differed by 144 levels)."""
    path = tmp_path / "marked.tif"
    _marked_tiff(path, jfif)

    def read(fast: str) -> tuple[np.ndarray, list[bool | None]]:
        monkeypatch.setenv("EMBEDSTORE_FAST_JPEG", fast)
        with SlideReader(path, backend="tifffile") as r:
            return r.read_region(0, 0, 0, 512, 512), list(r._b()._fast)

    (fast, state), (slow, off) = read("1"), read("0")
    assert np.array_equal(fast, slow) and state == [True] and off == [False]


def test_flat_chunks_do_not_settle_the_fast_path(tmp_path, monkeypatch):
    """Glass cannot show a decoder's rounding: equal flat chunks leave the level unchecked
    (every chunk decoded both ways) until `_CHECKS` of them agree."""
    from embedstore.extract.wsi import tiff
    path = tmp_path / "flat.tif"
    _marked_tiff(path, [False] * 4, flat=True)
    monkeypatch.setattr(tiff, "_CHECKS", 3)
    with SlideReader(path, backend="tifffile", cache_mb=0.1) as r:
        b = r._b()
        for x, y in ((0, 0), (256, 0), (0, 256)):
            assert b._fast == [None]
            r.read_region(x, y, 0, 256, 256)
        assert b._fast == [True] and b._checked == [3]

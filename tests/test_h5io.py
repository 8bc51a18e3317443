"""export-h5 / import-h5 against the files TRIDENT and CLAM write and read.

The layout checked is TRIDENT's own (trident/IO.py ``save_h5`` and ``coords_to_h5``,
trident/wsi_objects/WSI.py ``extract_patch_features``) and CLAM's (extract_features_fp.py,
dataset_modules/dataset_generic.py): read back here with h5py attribute by attribute, and the
``.pt`` files with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstore.backbones._registry import get_spec
from embedstore.backbones.spec import BackboneSpec
from embedstore.store import StoreMeta, StoreWriter, open_store
from clirun import run as _run

h5py = pytest.importorskip("h5py")

ROOT = Path(__file__).resolve().parents[1]
SLIDE = "CMU-1-Small-Region.svs"
ONNX = "mobilenetv2-onnx-int8"
DIM = 1024                       # UNI's width: uni_v1 maps to the registry's "uni"


def _save_h5(path: Path, assets: dict[str, np.ndarray], attributes: dict[str, dict[str, Any]]) -> None:
    """TRIDENT's trident/IO.py save_h5: chunks (1, ...), maxshape (None, ...), None -> 'None'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            d = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                 chunks=(1,) + val.shape[1:], dtype=val.dtype)
            d[:] = val
            for k, v in attributes.get(key, {}).items():
                d.attrs[k] = "None" if v is None else v


def _coords_attrs(name: str, patch_size: int = 256, save: str = "x") -> dict[str, Any]:
    """What TRIDENT's coords_to_h5 records (a 40x slide tiled at 20x)."""
    return {"patch_size": patch_size, "patch_size_level0": patch_size * 40 // 20,
            "level0_magnification": 40, "target_magnification": 20, "overlap": 0, "name": name,
            "savetodir": save, "level0_width": 4000, "level0_height": 3000}


def _trident_slide(job: Path, folder: str, file: str, name: str, n: int, *, encoder: str | None = "uni_v1",
                   dim: int = DIM, patch_size: int = 256, shape: tuple[int, ...] | None = None) -> np.ndarray:
    rng = np.random.default_rng(n)
    coords = np.stack([np.arange(n) * 512, np.full(n, 1024)], 1).astype(np.int64)
    feats = rng.standard_normal(shape or (n, dim)).astype(np.float32)
    ca = _coords_attrs(name, patch_size)
    _save_h5(job / "patches" / f"{name}_patches.h5", {"coords": coords}, {"coords": ca})
    _save_h5(job / folder / f"{file}.h5", {"features": feats, "coords": coords},
             {"features": {"name": name, "savetodir": str(job / folder), "encoder": encoder}, "coords": ca})
    return feats


@pytest.fixture()
def job(tmp_path: Path) -> Path:
    """A TRIDENT job folder: patches/, features_uni_v1/ with two slides (file names other than
    the slide names), an empty slide, a slide-level (D,) file, and a slide_features_* folder."""
    root = tmp_path / "job"
    job = root / "20x_256px_0px_overlap"
    _trident_slide(job, "features_uni_v1", "a", "slide_a", 5)
    _trident_slide(job, "features_uni_v1", "b", "slide_b", 3)
    _trident_slide(job, "features_uni_v1", "c", "slide_c", 0, shape=(0,))
    _trident_slide(job, "features_uni_v1", "d", "slide_d", 4, shape=(DIM,))
    _trident_slide(job, "slide_features_titan", "a", "slide_a", 1, shape=(768,), encoder=None)
    return root


def test_import_trident_job_folder(job: Path, tmp_path: Path) -> None:
    st = tmp_path / "imported"
    code, out, err = _run("import-h5", job, "--store", st, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["files"], r["rows"], r["backbone"], r["backbone_known"]) == (2, 8, "uni", True)
    notes = " | ".join(r["notes"])
    assert "patches" in notes and "empty features" in notes and "slide-level" in notes
    s = open_store(st)
    assert s.slides() == ["slide_a", "slide_b"]          # from attrs['name'], not the file names
    assert BackboneSpec.from_dict(s.meta.backbone) == get_spec("uni")    # the full registry spec
    assert s.meta.tile == {"kind": "slides", "tile_size": 256, "mpp": 0.5, "patch_size": 256,
                           "target_magnification": 20, "overlap": 0}
    unit = s.units()["slide:slide_a"]
    assert (unit["slide_mpp"], unit["tile_l0"], unit["dims"]) == (0.25, 512.0, [4000, 3000])
    with h5py.File(job / "20x_256px_0px_overlap/features_uni_v1/a.h5") as f:
        np.testing.assert_allclose(s.slide("slide_a").emb, f["features"][()], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(s.slide("slide_a").coords, f["coords"][()])
    code, out, _ = _run("import-h5", job, "--store", st, "--json")
    assert code == 0 and json.loads(out)["skipped"] == 2                 # resumable


def test_mixed_geometry_is_refused_before_writing(job: Path, tmp_path: Path) -> None:
    _trident_slide(job / "20x_256px_0px_overlap", "features_uni_v1", "e", "slide_e", 2, patch_size=512)
    code, out, err = _run("import-h5", job, "--store", tmp_path / "s")
    assert code == 2 and "mixed geometry" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not (tmp_path / "s").exists()


def test_two_encoders_are_refused(job: Path, tmp_path: Path) -> None:
    _trident_slide(job / "20x_256px_0px_overlap", "features_conch_v15", "a", "slide_a", 2, encoder="conch_v15")
    code, _, err = _run("import-h5", job, "--store", tmp_path / "s")
    assert code == 2 and "encoder" in err and "features_<encoder>" in err and len(err.strip().splitlines()) == 1


def test_encoder_none_and_unknown_encoder(tmp_path: Path) -> None:
    job = tmp_path / "job"
    _trident_slide(job, "features_mymodel", "a", "slide_a", 3, encoder=None, dim=16)   # 'None' attribute
    st = tmp_path / "s"
    code, out, err = _run("import-h5", job, "--store", st, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["backbone"] == "mymodel" and not r["backbone_known"]        # from the folder, not 'None'
    assert any("backbone unknown" in n for n in r["notes"])
    assert open_store(st).meta.backbone == {"name": "mymodel", "kind": "imported"}
    png = tmp_path / "q.png"
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    code, _, err = _run("search", st, "--image", png)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "backbone unknown" in err and "mymodel" in err and "--key" in err


def test_imported_registry_backbone_without_a_weights_sha_is_rebuilt() -> None:
    """Features imported from TRIDENT name a registry backbone but carry no weights sha256: search
    by image builds that backbone (here the shipped ONNX one) instead of refusing a mismatch."""
    from embedstore.backbones import get_spec
    from embedstore.backbones.images import recorded_backbone
    spec = get_spec(ONNX).to_dict()
    bb = recorded_backbone(spec, "", origin="an imported store")
    assert bb.dim == 1280 and bb.weights_sha256


def test_uni_v1_with_another_dim_is_not_recorded_as_uni(tmp_path: Path) -> None:
    job = tmp_path / "job"
    _trident_slide(job, "features_uni_v1", "a", "slide_a", 3, dim=8)
    code, out, err = _run("import-h5", job, "--store", tmp_path / "s", "--json")
    assert code == 0, err
    assert json.loads(out)["backbone_known"] is False


@pytest.fixture(scope="module")
def slide_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedstore.extract.runner import ExtractConfig, extract
    path = tmp_path_factory.mktemp("h5slide") / "slide"
    extract([ROOT / "sample_data" / "wsi"], ExtractConfig(store=path, target_mpp=0.5, backbone=ONNX,
                                                         progress=False, num_workers=0, num_threads=1))
    return path


def test_export_writes_tridents_coords_attributes(slide_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "trident"
    code, stdout, err = _run("export-h5", slide_store, "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["incomplete_geometry"] == 0
    grid = json.loads((slide_store / "masks" / f"{SLIDE}.grid.json").read_text())
    s = open_store(slide_store)
    bag = s.slide(SLIDE)
    with h5py.File(out / "CMU-1-Small-Region.h5") as f:
        c, d = f["coords"], f["features"]
        assert c.attrs["patch_size"] == 224 == grid["tile_size"]
        assert c.attrs["patch_size_level0"] == round(grid["tile_l0"]) == 224
        assert c.attrs["level0_magnification"] == 20          # 10 / 0.499 µm/px, rounded
        assert c.attrs["target_magnification"] == 20          # 10 / 0.5
        assert c.attrs["overlap"] == 0
        assert (c.attrs["level0_width"], c.attrs["level0_height"]) == tuple(grid["dims"])
        assert c.attrs["name"] == d.attrs["name"] == "CMU-1-Small-Region"
        assert c.attrs["savetodir"] == d.attrs["savetodir"] == str(out)
        assert d.attrs["encoder"] == ONNX
        for ds in (c, d):
            assert ds.chunks is not None and ds.maxshape[0] is None and ds.maxshape[1:] == ds.shape[1:]
        assert d.shape == (len(bag.ids), 1280) and d.dtype == np.float32 and c.dtype == np.int64
        np.testing.assert_array_equal(d[()], bag.emb.astype(np.float32))
        np.testing.assert_array_equal(c[()], bag.coords)
    rows = list(csv.reader((out / "slides.csv").read_text().splitlines()))
    assert rows == [["slide", "file"], [SLIDE, "CMU-1-Small-Region.h5"]]
    with h5py.File(out / "CMU-1-Small-Region.h5", "r+") as f:   # appendable, as TRIDENT's save_h5 does
        f["features"].resize(len(bag.ids) + 1, axis=0)
        f["coords"].resize(len(bag.ids) + 1, axis=0)


def test_export_clam_layout(slide_store: Path, tmp_path: Path) -> None:
    import torch
    out = tmp_path / "clam"
    code, _, err = _run("export-h5", slide_store, "--out", out, "--layout", "clam")
    assert code == 0, err
    n = len(open_store(slide_store).slide(SLIDE).ids)
    feats = torch.load(out / "pt_files" / "CMU-1-Small-Region.pt", weights_only=True)
    assert isinstance(feats, torch.Tensor) and tuple(feats.shape) == (n, 1280) and feats.dtype == torch.float32
    with h5py.File(out / "h5_files" / "CMU-1-Small-Region.h5") as f:
        assert f["features"].shape == (n, 1280) and f["coords"].shape == (n, 2)
        np.testing.assert_array_equal(f["features"][()], feats.numpy())


def test_round_trip_export_import(slide_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "trident"
    assert _run("export-h5", slide_store, "--out", out)[0] == 0
    back = tmp_path / "back"
    code, stdout, err = _run("import-h5", out, "--store", back, "--json")
    assert code == 0, err
    a, b = open_store(slide_store), open_store(back)
    assert b.meta.backbone == a.meta.backbone and b.meta.weights_sha256 == a.meta.weights_sha256
    np.testing.assert_array_equal(a.slide(SLIDE).emb, b.slide(SLIDE).emb)
    np.testing.assert_array_equal(a.slide(SLIDE).coords, b.slide(SLIDE).coords)
    unit = b.units()[f"slide:{SLIDE}"]
    assert unit["tile_l0"] == 224.0 and unit["dims"] == json.loads(
        (slide_store / "masks" / f"{SLIDE}.grid.json").read_text())["dims"]
    again = tmp_path / "again"                                 # the re-export keeps the attributes
    assert _run("export-h5", back, "--out", again)[0] == 0
    with h5py.File(out / "CMU-1-Small-Region.h5") as f, h5py.File(again / "CMU-1-Small-Region.h5") as g:
        for k in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                  "overlap", "level0_width", "level0_height", "name"):
            assert f["coords"].attrs[k] == g["coords"].attrs[k], k


def test_tile_folder_store_exports_one_file_per_source(tmp_path: Path) -> None:
    st = tmp_path / "tiles"
    meta = StoreMeta(dim=4, backbone={"name": "t", "kind": "test"}, tile={"tile_size": 96})
    with StoreWriter(st, meta) as w:
        for src, n in (("/data/folder_a", 3), ("/data/b.csv", 2)):
            w.add(np.ones((n, 4), np.float32), [f"{src}/{i}.png" for i in range(n)], unit=src, source=src)
            w.end_unit(src)
    out = tmp_path / "out"
    code, stdout, err = _run("export-h5", st, "--out", out, "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert (r["files"], r["rows"], r["per"]) == (2, 5, "source")
    rows = dict(list(csv.reader((out / "sources.csv").read_text().splitlines()))[1:])
    with h5py.File(out / rows["/data/folder_a"]) as f:
        assert f["features"].shape == (3, 4) and f["coords"].shape == (3, 2)
        assert [k.decode() for k in f["keys"][()]] == [f"/data/folder_a/{i}.png" for i in range(3)]
        assert f["coords"].attrs["source"] == "/data/folder_a"

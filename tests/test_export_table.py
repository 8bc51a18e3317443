"""export-table read back by the consumers themselves: polars, duckdb, pandas and
pyarrow.dataset; live rows only, labels and splits joined, embeddings those of the store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from embedstore.extract.runner import ExtractConfig, extract
from embedstore.store import delete, import_labels, open_store

from synthetic import write_units
from clirun import run as _run

pl = pytest.importorskip("polars")
duckdb = pytest.importorskip("duckdb")
pd = pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]
SLIDE = "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, str]], list[str]]:
    """The shipped slide's store, a task with labels and splits on most tiles, five tiles deleted."""
    path = tmp_path_factory.mktemp("table") / "slide"
    extract([ROOT / "sample_data" / "wsi"], ExtractConfig(store=path, target_mpp=0.5, backbone="mobilenetv2-onnx-int8",
                                                         progress=False, num_workers=1, num_threads=1))
    keys = open_store(path).keys()
    truth = {k: ("tumour" if i % 3 else "normal", "train" if i % 4 else "test")
             for i, k in enumerate(keys) if i % 7}             # every 7th tile unlabelled
    import_labels(path, None, "region", rows=[{"key": k, "label": lab, "split": sp, "group": None}
                                             for k, (lab, sp) in truth.items()])
    gone = keys[2:7]
    assert delete(path, gone) == 5
    return path, truth, gone


@pytest.fixture(scope="module")
def exported(store: tuple[Path, dict, list], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "table"
    code, stdout, err = _run("export-table", store[0], "--out", out, "--rows-per-file", 20, "--json")
    assert code == 0, err
    return out, json.loads(stdout)


def test_polars_reads_live_rows_with_labels_joined(store: tuple[Path, dict, list], exported: tuple[Path, dict]) -> None:
    path, truth, gone = store
    out, summary = exported
    st = open_store(path)
    df = pl.read_parquet(str(out / "*.parquet"))
    assert df.height == len(st) == summary["rows"] and len(summary["files"]) == 3     # 49 rows, 20 a file
    assert not set(gone) & set(df["key"].to_list())
    assert df["id"].to_list() == st.all_ids().tolist()
    for key, lab, sp in df.select("key", "label_region", "split_region").iter_rows():
        assert (lab, sp) == truth.get(key, (None, None)), key
    assert {"key", "id", "slide", "x", "y", "level", "tile_size", "mpp", "tile_size_level0"} <= set(df.columns)
    assert df["slide"].unique().to_list() == [SLIDE]
    meta = st.metadata(st.all_ids(), ("x", "y"))
    assert df["x"].to_list() == meta["x"].tolist() and df["y"].to_list() == meta["y"].tolist()


def test_embeddings_are_the_stores_as_float32(store: tuple[Path, dict, list], exported: tuple[Path, dict]) -> None:
    st = open_store(store[0])
    t = pads.dataset(str(exported[0]), format="parquet").to_table()
    kind = t.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == st.dim and kind.value_type == pa.float32()
    emb = t.column("embedding").combine_chunks().values.to_numpy().reshape(-1, st.dim)
    np.testing.assert_array_equal(emb, st.gather(t.column("id").to_numpy()).astype(np.float32))
    np.testing.assert_array_equal(emb, st.to_numpy(np.float32))
    info = json.loads(t.schema.metadata[b"embedstore"])
    assert info["fingerprint"]["weights_sha256"] == st.fingerprint()["weights_sha256"] and info["dim"] == st.dim


def test_duckdb_reads_it(store: tuple[Path, dict, list], exported: tuple[Path, dict]) -> None:
    path, truth, _ = store
    st = open_store(path)
    glob = str(exported[0] / "*.parquet")
    n, labelled, dim, tumour = duckdb.sql(
        f"select count(*), count(label_region), max(len(embedding)), "
        f"count(*) filter (where label_region = 'tumour') from '{glob}'").fetchall()[0]
    live = set(st.keys())
    assert n == len(st) and labelled == sum(k in live for k in truth) and dim == st.dim
    assert tumour == sum(k in live and v[0] == "tumour" for k, v in truth.items())
    first = duckdb.sql(f"select embedding from '{glob}' order by id limit 1").fetchall()[0][0]
    np.testing.assert_allclose(first, st.gather(st.all_ids()[:1])[0].astype(np.float32))


def test_pyarrow_dataset_and_pandas_see_the_table_only(exported: tuple[Path, dict],
                                                       store: tuple[Path, dict, list]) -> None:
    out, _ = exported
    assert pads.dataset(str(out), format="parquet").count_rows() == len(open_store(store[0]))
    df = pd.read_parquet(out)
    assert len(df) == len(open_store(store[0])) and df["tile_size_level0"].notna().all()


def test_level0_tile_size_is_the_slides(store: tuple[Path, dict, list], exported: tuple[Path, dict]) -> None:
    st = open_store(store[0])
    slide_mpp = st.units()[f"slide:{SLIDE}"]["slide_mpp"]
    col = pl.read_parquet(str(exported[0] / "*.parquet"))["tile_size_level0"]
    assert col.unique().to_list() == [pytest.approx(224 * 0.5 / slide_mpp)]


def test_views_arrow_and_float16_on_a_synthetic_store(tmp_path: Path) -> None:
    path = tmp_path / "syn"
    write_units(path, [0, 1, 2])
    st = open_store(path)
    out = tmp_path / "t"
    code, stdout, err = _run("export-table", path, "--out", out, "--format", "arrow", "--with-views", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    views = st.views()
    assert summary["views"]["rows"] == len(views.ids) > 0
    base = pads.dataset(str(out), format="arrow").to_table()          # _views/ is not mixed in
    assert base.num_rows == len(st)
    assert set(base.column("tile_size_level0").to_pylist()) == {224.0}   # no slide mpp: the grid step
    v = pa.ipc.open_file(out / "_views" / "part-00000.arrow").read_all()
    assert v.column_names == ["key", "id", "view", "embedding"] and v.num_rows == len(views.ids)
    emb = v.column("embedding").combine_chunks().values.to_numpy().reshape(-1, st.dim)
    np.testing.assert_array_equal(emb, views.gather(np.arange(len(views.ids))).astype(np.float32))
    assert v.column("key").to_pylist() == st.keys_of(views.ids)
    code, _, err = _run("export-table", path, "--out", out, "--float16")              # replaces it whole
    assert code == 0, err
    t = pads.dataset(str(out), format="parquet").to_table()
    assert t.schema.field("embedding").type.value_type == pa.float16()
    assert sorted(p.name for p in out.iterdir()) == ["_embedstore_export.json", "part-00000.parquet"]


def test_a_folder_of_other_files_is_refused(store: tuple[Path, dict, list], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run("export-table", store[0], "--out", out)
    assert code == 2 and err.count("\n") == 1 and "not an embedstore export" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]               # no staging left


class _NumpyMetadataOnly:
    """The store without ``metadata_arrow`` (an optional protocol method): export falls back
    to numpy metadata, row by row for strings."""

    def __init__(self, store: object) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        if name == "metadata_arrow":
            raise AttributeError(name)
        return getattr(self._store, name)


def test_arrow_and_numpy_metadata_export_the_same_table(store: tuple[Path, dict, list], tmp_path: Path) -> None:
    from embedstore.interop import export_table
    st = open_store(store[0])
    a, b = tmp_path / "arrow", tmp_path / "numpy"
    export_table(st, a, fmt="arrow")
    export_table(_NumpyMetadataOnly(st), b, fmt="arrow")
    ta = pads.dataset(str(a), format="arrow").to_table()
    tb = pads.dataset(str(b), format="arrow").to_table()
    assert ta.num_rows == len(st) > 0 and ta.schema == tb.schema
    assert ta.equals(tb)
    lab = ta.column("label_region").to_pylist()
    assert None in lab and {"tumour", "normal"} <= set(lab)            # unlabelled rows are null
    assert ta.column("x").null_count == 0 and ta.column("mpp").null_count == 0

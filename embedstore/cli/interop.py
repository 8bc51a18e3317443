"""``embedstore export-geojson`` (QuPath) and ``embedstore export-table`` (dataframes): CLI over
:mod:`embedstore.interop`."""
from __future__ import annotations

from pathlib import Path

import click

from ._app import COUNT, echo_json, json_option, main


@main.command("export-geojson")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--slide", required=True, help="Slide to export (see `embedstore info`; names as stored).")
@click.option("--predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Arrow file from `embedstore predict`: classification and prob_<class> measurements.")
@click.option("--head", "head_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Head directory from train-head, run on the slide's tiles (instead of --predictions).")
@click.option("--query", metavar="KEY", help="Tile key: each tile's cosine similarity to it (measurement 'similarity').")
@click.option("--clusters", type=COUNT, metavar="K", help="k-means of the slide's tiles (measurement 'cluster').")
@click.option("--tissue", is_flag=True, help="Add the tissue contours found at extraction as annotations.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GeoJSON file to write.")
@json_option
def export_geojson(store: Path, slide: str, predictions: Path | None, head_dir: Path | None, query: str | None,
                   clusters: int | None, tissue: bool, out: Path, as_json: bool) -> None:
    """Write one slide's tiles as a QuPath GeoJSON FeatureCollection: each tile a square in
    level-0 pixels (objectType "tile", name = tile key) with its predicted class and numeric
    measurements (prob_<class>, similarity, cluster); --tissue adds the tissue outline as
    "annotation" objects.

    \b
    Opening it in QuPath (0.4 or later): open the slide, then File > Import objects from file
    and pick the .geojson, or drag the .geojson onto the open image (QuPath 0.3: File > Object
    data > Import objects; in a script: importObjectsFromFile("/path/slide.geojson")).
    Coordinates are level-0 pixels of the slide as OpenSlide reads it. Tiles show in their
    class colour; Measure > Show measurement maps colours them by any measurement.

    \b
    Example:
      embedstore predict st --head head/ --out preds.arrow
      embedstore export-geojson st --slide CMU-1.svs --predictions preds.arrow --tissue --out CMU-1.geojson
    """
    from ..interop import export_geojson as run
    from ..store import open_store
    result = run(open_store(store), slide, out, predictions=predictions, head=head_dir, query=query,
                 tissue=tissue, clusters=clusters)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"wrote {result['tiles']} tiles and {result['annotations']} tissue annotations of "
                   f"{slide} to {out} (tile side {result['tile_l0']:.2f} level-0 px, from {result['geometry']})")


@main.command("export-table")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write (a new or empty one, or an earlier export, replaced whole).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "arrow"]), default="parquet", show_default=True)
@click.option("--float32/--float16", "float32", default=True, show_default=True,
              help="Embedding value type (duckdb reads no float16).")
@click.option("--with-views", is_flag=True, help="Also write the augmented views, under DIR/_views/.")
@click.option("--rows-per-file", type=COUNT, metavar="N", default=1_000_000, show_default=True)
@json_option
def export_table(store: Path, out: Path, fmt: str, float32: bool, with_views: bool, rows_per_file: int,
                 as_json: bool) -> None:
    """Write the store's live rows (deleted ones left out) as a table any dataframe library
    opens: key, id, slide, source, x, y, level, tile_size, mpp, label, tile_size_level0,
    label_<task>/split_<task>/group_<task> per labels task, and embedding
    (fixed_size_list<float32>[dim]).

    \b
    Reading it:
      polars:   pl.read_parquet("DIR/*.parquet")
      pandas:   pd.read_parquet("DIR")
      duckdb:   duckdb.sql("select slide, count(*) from 'DIR/*.parquet' group by slide")
      pyarrow:  pyarrow.dataset.dataset("DIR", format="parquet")   (skips _views/ and _*.json)
    """
    from ..interop import export_table as run
    from ..store import open_store
    result = run(open_store(store), out, fmt=fmt, float32=float32, with_views=with_views,
                 rows_per_file=rows_per_file)
    if as_json:
        echo_json(result)
    else:
        views = f", {result['views']['rows']} views" if result["views"] else ""
        click.echo(f"wrote {result['rows']} rows{views} to {out} ({len(result['files'])} {fmt} file(s))")

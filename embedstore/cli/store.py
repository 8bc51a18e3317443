"""Store commands: info, errors, verify, compact, upgrade, delete, labels, import-h5, export-h5, rebuild-catalog."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..sizes import format_bytes
from ._app import EXIT_FAIL, echo_json, fail, json_option, main


def _info_text(d: dict[str, Any]) -> str:
    lines = [
        f"store      {d['path']}",
        f"rows       {d['rows']:,}" + (f"  ({d['deleted']:,} deleted, awaiting compact)" if d["deleted"] else ""),
        f"embedding  {d['dim']}-d {d['dtype']}",
        f"backbone   {d['backbone']}" + (f"  weights sha256 {d['weights_sha256'][:12]}" if d["weights_sha256"] else ""),
    ]
    if d["tile"]:
        lines.append("tiles      " + ", ".join(f"{k}={v}" for k, v in d["tile"].items()))
    lines.append(f"shards     {d['shards']} base + {d['view_shards']} view, {format_bytes(d['bytes'])}")
    if d["views"]:
        lines.append(f"views      {d['views']:,} view rows" + (f"  recipe {d['view_recipe']}" if d["view_recipe"] else ""))
    lines.append(f"units      {d['units_done']:,} done, {d['slides']:,} slides")
    tasks = ", ".join(f"{k} ({v:,})" for k, v in d["tasks"].items()) or "none"
    lines.append(f"tasks      {tasks}")
    lines.append(f"errors     {d['errors']}" + ("  (see `embedstore errors STORE`)" if d["errors"] else ""))
    return "\n".join(lines)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@json_option
def info(store: Path, as_json: bool) -> None:
    """Summarise a store: rows, dim, dtype, backbone, shards, size, tasks, errors."""
    from ..store import open_store
    d = open_store(store).info()
    if as_json:
        echo_json(d)
    else:
        click.echo(_info_text(d))


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@json_option
def errors(store: Path, as_json: bool) -> None:
    """List the inputs recorded as errors (unit and reason)."""
    from ..store import open_store
    errs = open_store(store).errors()
    if as_json:
        echo_json({"store": str(store), "errors": [{"unit": unit, **e} for unit, e in sorted(errs.items())]})
        return
    if not errs:
        click.echo("no errors recorded")
    for unit, e in sorted(errs.items()):
        click.echo(f"{unit}\t{e.get('reason')}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@json_option
def verify(store: Path, as_json: bool) -> None:
    """Check every shard's checksum (xxh3-128, or sha256 for shards of older stores) and that
    catalog and shards agree (exit 2 on a mismatch)."""
    from ..store import verify_store
    rep = verify_store(store)
    if as_json:
        echo_json({"store": str(store), "ok": rep.ok, "shards": rep.shards, "rows": rep.rows,
                   "problems": rep.problems, "notes": rep.notes})
    else:
        click.echo(rep.text())
    if not rep.ok:
        sys.exit(EXIT_FAIL)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@json_option
def compact(store: Path, as_json: bool) -> None:
    """Rewrite shards without deleted tiles (ids are kept). Needs no writer running."""
    from ..store import compact as do
    r = do(store)
    if as_json:
        echo_json({"store": str(store), **r})
    else:
        click.echo(f"rewrote {r['rewritten']} shard(s), removed {r['removed_rows']} deleted row(s)")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@json_option
def upgrade(store: Path, as_json: bool) -> None:
    """Bring a store made by an older embedstore to the current layout (view shards move from
    shards/ to views/, so tools reading STORE/shards see one row per tile). Safe to interrupt and
    rerun; needs no writer running. Older layouts are still read without it."""
    from ..store import upgrade as do
    r = do(store)
    if as_json:
        echo_json(r)
    elif r["moved"]:
        click.echo(f"moved {r['moved']} view shard(s) ({format_bytes(r['bytes'])}) to {store}/views")
    else:
        click.echo(f"{store} already has the current layout")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, help="Tile key to delete (repeatable).")
@click.option("--keys-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file with one tile key per line.")
@click.option("--slide", "slides", multiple=True, help="Delete every tile of this slide (repeatable).")
@click.option("--reason", default="", help="Why (withdrawn consent, failed QC...); kept in the catalog.")
@json_option
def delete(store: Path, keys: tuple[str, ...], keys_file: Path | None, slides: tuple[str, ...],
           reason: str, as_json: bool) -> None:
    """Delete tiles by key or whole slides. Readers hide them at once; `compact` reclaims space."""
    from ..store import delete as do
    ks = list(keys) + ([ln.strip() for ln in keys_file.read_text().splitlines() if ln.strip()]
                       if keys_file else [])
    if not ks and not slides:
        fail("nothing to delete: give --key, --keys-file or --slide")
    n = do(store, ks, list(slides), reason)
    if as_json:
        echo_json({"store": str(store), "deleted": n})
    else:
        click.echo(f"deleted {n} tile(s); run `embedstore compact {store}` to reclaim the space")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("csv_path", metavar="CSV", type=click.Path(path_type=Path))
@click.option("--task", required=True, help="Name of the labelling task (e.g. metastasis).")
@click.option("--skip-unknown", is_flag=True, help="Ignore keys the store lacks instead of failing.")
@json_option
def labels(store: Path, csv_path: Path, task: str, skip_unknown: bool, as_json: bool) -> None:
    """Import labels from CSV (columns key or path, label, optional split, group) as a task."""
    from ..store import import_labels, open_store
    open_store(store)          # a missing or foreign store fails here, before the catalog is touched
    r = import_labels(store, csv_path, task, on_unknown="skip" if skip_unknown else "error")
    if as_json:
        echo_json({"store": str(store), "task": task, **r})
        return
    classes = ", ".join(f"{k}: {v}" for k, v in r["classes"].items())
    click.echo(f"task {task!r}: {r['n']} labelled tiles ({classes})"
               + (f"; {r['skipped_unknown']} unknown keys skipped" if r["skipped_unknown"] else ""))


@main.command("import-h5")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store to create or append to.")
@click.option("--backbone-name", help="Backbone that made the features (when the files lack an 'encoder' attribute).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@json_option
def import_h5(src: Path, store: Path, backbone_name: str | None, dtype: str, as_json: bool) -> None:
    """Import per-slide HDF5 feature files: a TRIDENT job folder as it is (its features_<encoder>
    folders; TRIDENT encoder names such as uni_v1 map to the registry's), CLAM's h5_files, or an
    export-h5 output."""
    from ..backbones._registry import registered_spec
    from ..store.h5io import import_h5 as do

    def resolve(name: str) -> dict[str, Any] | None:
        spec = registered_spec(name)
        return spec.to_dict() if spec is not None else None
    r = do(src, store, backbone_name=backbone_name, dtype=dtype, resolve=resolve)
    if as_json:
        echo_json({"store": str(store), **r})
        return
    click.echo(f"imported {r['files']} file(s), {r['rows']:,} tiles, backbone {r['backbone']}"
               + ("" if r["backbone_known"] else " (unknown to the registry)")
               + (f"; {r['skipped']} already imported" if r["skipped"] else ""))
    for note in r["notes"]:
        click.echo(f"  note: {note}")


@main.command("export-h5")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--layout", type=click.Choice(["trident", "clam"]), default="trident", show_default=True,
              help="trident: OUT/<slide>.h5; clam: OUT/h5_files/<slide>.h5 + OUT/pt_files/<slide>.pt.")
@json_option
def export_h5(store: Path, out: Path, layout: str, as_json: bool) -> None:
    """Write one HDF5 file per slide (features, coords, TRIDENT's coords attributes); a store of
    tile folders gets one file per source folder or CSV."""
    from ..store import open_store
    from ..store.h5io import export_h5 as do
    r = do(open_store(store), out, layout=layout)
    if as_json:
        echo_json({"store": str(store), "out": str(out), **r})
        return
    click.echo(f"wrote {r['files']} file(s) ({layout} layout, one per {r['per']}), {r['rows']:,} tiles "
               f"to {out}; {r['per']} -> file in {r['mapping']}"
               + (f" ({r['renamed']} name(s) made into safe file names)" if r["renamed"] else ""))
    if r["incomplete_geometry"]:
        click.echo(f"  note: {r['incomplete_geometry']} slide(s) lack level-0 geometry (slide µm/px or "
                   "size not recorded): their coords attributes are incomplete for TRIDENT")


@main.command("rebuild-catalog")
@click.argument("store", type=click.Path(path_type=Path))
@json_option
def rebuild_catalog(store: Path, as_json: bool) -> None:
    """Rebuild a damaged or missing catalog from the shards (no writer may be running)."""
    from ..store import rebuild_catalog as do
    r = do(store)
    if as_json:
        echo_json(r)
        return
    click.echo(f"rebuilt the catalog of {store}: {r['shards']} shard(s) + {r['view_shards']} view shard(s), "
               f"{r['rows']:,} rows, {r['deleted']:,} deleted, {r['units']:,} units done"
               + ("" if r["ids_preserved"] else "; some ids changed"))
    for x in r["lost"]:
        click.echo(f"  not recovered: {x}")

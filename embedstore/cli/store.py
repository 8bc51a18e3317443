"""Store commands: info, errors, verify, compact, delete, labels, import-h5, export-h5."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ._app import EXIT_FAIL, _fail, _human, handled, main

@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handled
def info(store: Path, as_json: bool) -> None:
    """Summarise a store: rows, dim, dtype, backbone, shards, size, tasks, errors."""
    from ..store import open_store
    s = open_store(store)
    d = s.info()
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    click.echo(f"store      {d['path']}")
    click.echo(f"rows       {d['rows']:,}" + (f"  ({d['deleted']:,} deleted, awaiting compact)" if d["deleted"] else ""))
    click.echo(f"embedding  {d['dim']}-d {d['dtype']}")
    click.echo(f"backbone   {d['backbone']}" + (f"  weights sha256 {d['weights_sha256'][:12]}" if d["weights_sha256"] else ""))
    if d["tile"]:
        click.echo("tiles      " + ", ".join(f"{k}={v}" for k, v in d["tile"].items()))
    click.echo(f"shards     {d['shards']} base + {d['view_shards']} view, {_human(d['bytes'])}")
    if d["views"]:
        click.echo(f"views      {d['views']:,} view rows" + (f"  recipe {d['view_recipe']}" if d["view_recipe"] else ""))
    click.echo(f"units      {d['units_done']:,} done, {d['slides']:,} slides")
    tasks = ", ".join(f"{k} ({v:,})" for k, v in d["tasks"].items()) or "none"
    click.echo(f"tasks      {tasks}")
    click.echo(f"errors     {d['errors']}" + ("  (see `embedstore errors STORE`)" if d["errors"] else ""))


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@handled
def errors(store: Path) -> None:
    """List the inputs recorded as errors (unit and reason)."""
    from ..store import open_store
    errs = open_store(store).errors()
    if not errs:
        click.echo("no errors recorded")
    for unit, e in sorted(errs.items()):
        click.echo(f"{unit}\t{e.get('reason')}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@handled
def verify(store: Path) -> None:
    """Check every shard's sha256 and that catalog and shards agree (exit 2 on a mismatch)."""
    from ..store import verify_store
    rep = verify_store(store)
    click.echo(rep.text())
    if not rep.ok:
        sys.exit(EXIT_FAIL)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@handled
def compact(store: Path) -> None:
    """Rewrite shards without deleted tiles (ids are kept). Needs no writer running."""
    from ..store import compact as do
    r = do(store)
    click.echo(f"rewrote {r['rewritten']} shard(s), removed {r['removed_rows']} deleted row(s)")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, help="Tile key to delete (repeatable).")
@click.option("--keys-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file with one tile key per line.")
@click.option("--slide", "slides", multiple=True, help="Delete every tile of this slide (repeatable).")
@click.option("--reason", default="", help="Why (withdrawn consent, failed QC...); kept in the catalog.")
@handled
def delete(store: Path, keys: tuple[str, ...], keys_file: Path | None, slides: tuple[str, ...],
           reason: str) -> None:
    """Delete tiles by key or whole slides. Readers hide them at once; `compact` reclaims space."""
    from ..store import delete as do
    ks = list(keys) + ([ln.strip() for ln in keys_file.read_text().splitlines() if ln.strip()]
                       if keys_file else [])
    if not ks and not slides:
        _fail("nothing to delete: give --key, --keys-file or --slide")
    n = do(store, ks, list(slides), reason)
    click.echo(f"deleted {n} tile(s); run `embedstore compact {store}` to reclaim the space")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("csv_path", metavar="CSV", type=click.Path(path_type=Path))
@click.option("--task", required=True, help="Name of the labelling task (e.g. metastasis).")
@click.option("--skip-unknown", is_flag=True, help="Ignore keys the store lacks instead of failing.")
@handled
def labels(store: Path, csv_path: Path, task: str, skip_unknown: bool) -> None:
    """Import labels from CSV (columns key or path, label, optional split, group) as a task."""
    from ..store import import_labels, open_store
    open_store(store)
    r = import_labels(store, csv_path, task, on_unknown="skip" if skip_unknown else "error")
    classes = ", ".join(f"{k}: {v}" for k, v in r["classes"].items())
    click.echo(f"task {task!r}: {r['n']} labelled tiles ({classes})"
               + (f"; {r['skipped_unknown']} unknown keys skipped" if r["skipped_unknown"] else ""))


@main.command("import-h5")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store to create or append to.")
@click.option("--backbone-name", help="Backbone that made the features (when the files lack an 'encoder' attribute).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@handled
def import_h5(src: Path, store: Path, backbone_name: str | None, dtype: str) -> None:
    """Import per-slide HDF5 feature files (TRIDENT / CLAM layout: features, coords)."""
    from ..store.h5io import import_h5 as do
    r = do(src, store, backbone_name=backbone_name, dtype=dtype)
    click.echo(f"imported {r['files']} file(s), {r['rows']:,} tiles"
               + (f"; {r['skipped']} already imported" if r["skipped"] else ""))


@main.command("export-h5")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@handled
def export_h5(store: Path, out: Path) -> None:
    """Write one TRIDENT-layout HDF5 file per slide (features, coords, attributes)."""
    from ..store import open_store
    from ..store.h5io import export_h5 as do
    r = do(open_store(store), out)
    click.echo(f"wrote {r['files']} file(s), {r['rows']:,} tiles to {out}")

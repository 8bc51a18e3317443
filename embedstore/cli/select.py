"""``embedstore select``: the CLI over :func:`embedstore.select.proxy.select_backbones`."""
from __future__ import annotations

from pathlib import Path

import click

from ._app import COUNT, NON_NEGATIVE, echo_json, json_option, main


@main.command()
@click.option("--proxy", required=True, type=click.Path(path_type=Path),
              help="Labelled proxy tiles: a CSV (path,label[,split,slide]) or a folder of class folders.")
@click.option("--backbone", "backbones", multiple=True, required=True,
              help="A candidate (repeat for each): registry name, timm name, hf-hub:ORG/MODEL or .onnx file.")
@click.option("--k", type=COUNT, metavar="K", default=20, show_default=True, help="Neighbours that vote.")
@click.option("--folds", type=click.IntRange(min=2), metavar="N", default=5, show_default=True,
              help="Cross-validation folds.")
@click.option("--group-by", default="auto", show_default=True,
              help="Keep each group in one fold: auto (the CSV slide column when present), none, "
                   "slide, or another CSV column (patient, ...).")
@click.option("--metric", type=click.Choice(["balanced_accuracy", "f1"]), default="balanced_accuracy",
              show_default=True, help="Proxy score (f1 = macro F1).")
@click.option("--random-init", is_flag=True,
              help="Untrained seeded weights for candidates that can have them (timm); ONNX models keep theirs.")
@click.option("--centre", is_flag=True,
              help="Subtract the training-fold mean before L2-normalising (helps foundation-model embeddings).")
@click.option("--cache", type=click.Path(path_type=Path),
              help="Root of the per-backbone proxy stores (default OUT/stores); reused by later runs.")
@click.option("--validate", type=click.Path(path_type=Path),
              help="Downstream task CSV (path,label,split): a linear head per candidate, trained on "
                   "split=train, F1 on split=valid, Spearman against the proxy ranking.")
@click.option("--head-seeds", type=COUNT, metavar="N", default=10, show_default=True,
              help="--validate: linear heads trained per candidate (seeds); F1 is their mean.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("selection"), show_default=True,
              help="Output directory: selection.json, selection.png.")
@click.option("--seed", type=int, metavar="SEED", default=0, show_default=True, help="Fold assignment seed.")
@click.option("--batch-size", type=COUNT, metavar="N", default=64, show_default=True,
              help="Extraction: tiles per forward pass.")
@click.option("--workers", type=NON_NEGATIVE, metavar="N",
              help="Extraction: DataLoader workers (default as for `extract`).")
@click.option("--threads", type=COUNT, metavar="N", help="Extraction: intra-op threads.")
@click.option("--devices", default="cpu", show_default=True, help="Extraction devices, as for `extract`.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--memory-budget", metavar="SIZE",
              help="RAM the kNN (and --validate's heads) may hold, e.g. 8G (default: a quarter of "
                   "this machine's RAM); a candidate's proxy rows past it are scored from its store, "
                   "read in blocks.")
@json_option
def select(proxy: Path, backbones: tuple[str, ...], k: int, folds: int, group_by: str, metric: str,
           random_init: bool, centre: bool, cache: Path | None, validate: Path | None, head_seeds: int,
           out: Path,
           seed: int, batch_size: int, workers: int | None, threads: int | None, devices: str,
           quiet: bool, memory_budget: str | None, as_json: bool) -> None:
    """Rank candidate backbones by a kNN proxy task on labelled tiles.

    \b
    Each candidate embeds the proxy into its own cached store (same pipeline as `extract`;
    a re-run embeds nothing), then a cosine kNN classifier (vote exp(sim/0.07)) is scored
    under stratified cross-validation grouped by slide, so no tile is judged by neighbours
    from its own slide. Prints the ranked table, writes OUT/selection.json and a bar chart.

    \b
    Example:
      embedstore select --proxy tiles.csv --backbone mobilenetv2-onnx-int8 \\
          --backbone resnet18 --random-init --validate task.csv --out sel
    """
    from ..backbones.devices import parse_devices
    from ..select.proxy import SelectConfig, select_backbones
    from ..sizes import parse_size
    parse_devices(devices)                 # a bad --devices fails here, before anything is embedded
    budget = parse_size(memory_budget, "--memory-budget") if memory_budget is not None else None
    cfg = SelectConfig(proxy=proxy, backbones=tuple(backbones), out=out, k=k, folds=folds,
                       group_by=group_by, metric=metric, random_init=random_init, centre=centre,
                       seed=seed, cache=cache, validate=validate, head_seeds=head_seeds,
                       batch_size=batch_size,
                       num_workers=workers, num_threads=threads, devices=devices, progress=not quiet,
                       memory_budget=budget)
    res = select_backbones(cfg)
    if as_json:
        echo_json(res.to_dict())
        return
    click.echo(res.table())
    click.echo(f"wrote {res.files['json']} and {res.files['plot']}")

"""``embedstore train-head`` and ``embedstore predict``: CLI over :mod:`embedstore.heads`."""
from __future__ import annotations

from pathlib import Path

import click

from ._app import COUNT, POSITIVE, echo_json, json_option, main, progress_echo

MAX_HIDDEN = 65536              # --hidden: wider MLP heads than this are a typo, not a model


@main.command("train-head")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--task", help="Labels task in the store (see `embedstore info`). Default: labels from extraction.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with key (or path), label[, split, group] instead of a task.")
@click.option("--head", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True)
@click.option("--hidden", type=click.IntRange(1, MAX_HIDDEN), metavar="N", default=256, show_default=True,
              help="MLP hidden units.")
@click.option("--epochs", type=COUNT, metavar="N", default=100, show_default=True,
              help="Maximum epochs (early stopping on validation).")
@click.option("--lr", type=POSITIVE, metavar="LR", help="Learning rate (default 3e-3 linear, 1e-3 MLP).")
@click.option("--weight-decay", type=click.FloatRange(min=0.0), metavar="WD", default=1e-4, show_default=True)
@click.option("--dropout", type=click.FloatRange(0.0, 1.0, max_open=True), metavar="P",
              default=0.0, show_default=True, help="Dropout probability (MLP).")
@click.option("--class-weights", type=click.Choice(["none", "auto"]), default="none", show_default=True,
              help="auto: inverse class frequency (imbalanced tasks).")
@click.option("--split", default="column", show_default=True,
              help="column (the split column: train/valid/test) | slide | group:COLUMN | kfold:5")
@click.option("--seeds", type=COUNT, metavar="N", default=5, show_default=True,
              help="Seeds to report mean ± std over.")
@click.option("--augment", help="Feature-space augmentation, e.g. views,noise=0.1,mixup=0.2,dropout=0.1")
@click.option("--sweep", is_flag=True, help="Tune lr, weight decay, hidden, dropout, augmentation by CV on training data.")
@click.option("--positive", help="Positive class for binary F1 (default: the minority class).")
@click.option("--seed", type=int, metavar="SEED", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Directory to save the head (safetensors + JSON).")
@click.option("--memory-budget", metavar="SIZE",
              help="RAM the labelled rows and views may take, e.g. 8G (default: a quarter of this "
                   "machine's RAM); a larger set trains from the store, read as it goes.")
@json_option
def train_head(store: Path, task: str | None, labels: Path | None, head: str, hidden: int, epochs: int,
               lr: float | None, weight_decay: float, dropout: float, class_weights: str, split: str,
               seeds: int, augment: str | None, sweep: bool, positive: str | None, seed: int,
               out: Path | None, memory_budget: str | None, as_json: bool) -> None:
    """Train a linear or MLP head on the store's embeddings and report F1, balanced accuracy,
    AUROC and the confusion matrix (mean ± std over seeds). Takes seconds: tune freely."""
    from ..heads.jobs import train_head_command
    from ..sizes import parse_size
    budget = parse_size(memory_budget, "--memory-budget") if memory_budget is not None else None
    result = train_head_command(store, task=task, labels=labels, head=head, hidden=hidden, epochs=epochs,
                                lr=lr, weight_decay=weight_decay, dropout=dropout,
                                class_weights=class_weights, split=split, seeds=seeds, augment=augment,
                                sweep=sweep, out=out, positive=positive, seed=seed,
                                memory_budget=budget, echo=progress_echo(as_json))
    if as_json:
        echo_json(result)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--head", "head_dir", required=True, type=click.Path(path_type=Path), help="Head directory from train-head.")
@click.option("--out", type=click.Path(path_type=Path), default="preds.arrow", show_default=True,
              help="Arrow IPC file: key, pred, prob_<label>..., slide, x, y.")
@click.option("--batch-size", type=COUNT, metavar="N", default=65536, show_default=True,
              help="Rows scored per step.")
@click.option("--heatmap", "heatmap_slide", help="Slide whose class probability to draw over its thumbnail.")
@click.option("--heatmap-class", help="Class to draw (default: the positive class).")
@click.option("--heatmap-out", type=click.Path(path_type=Path), help="PNG path (default: next to --out).")
@json_option
def predict(store: Path, head_dir: Path, out: Path, batch_size: int, heatmap_slide: str | None,
            heatmap_class: str | None, heatmap_out: Path | None, as_json: bool) -> None:
    """Predict every row of STORE with a head, in constant memory. A head applies to any store
    of the same backbone and transform; another backbone is refused."""
    from ..heads.jobs import predict_command
    from ..heads.predict import HeatmapSpec
    spec = None
    if heatmap_slide:
        from ..store import open_store
        from ..extract.readback import slide_thumbnail
        thumb, ds = slide_thumbnail(open_store(store), heatmap_slide)
        png = heatmap_out or Path(out).with_suffix("").with_name(Path(out).stem + "-heatmap.png")
        spec = HeatmapSpec(heatmap_slide, png, thumb, ds, heatmap_class)
    result = predict_command(store, head_dir=head_dir, out=out, batch_size=batch_size, heatmap=spec,
                             echo=progress_echo(as_json))
    if as_json:
        echo_json(result)

"""``embedstore extract`` (the CLI over :func:`embedstore.extract.runner.extract`) and
``embedstore backbones``."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from ._app import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, echo_json, json_option, main


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(path_type=Path),
              help="Store directory (created if missing; must match the backbone if it exists).")
@click.option("--backbone", required=True,
              help="Registry name (uni, virchow2, mobilenetv2-onnx-int8, ...), timm name, hf-hub:ORG/MODEL or a .onnx file. "
                   "`embedstore backbones` lists them.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Weights file (safetensors, torch state dict loaded with weights_only=True, or .onnx).")
@click.option("--random-init", is_flag=True, help="Use seeded untrained weights (explicit: never a silent fallback).")
@click.option("--target-mpp", type=POSITIVE, metavar="MPP",
              help="µm/px tiles are cut at (default: the backbone's native, else 0.5).")
@click.option("--slide-mpp", type=POSITIVE, metavar="MPP", help="µm/px of slides whose metadata lacks it.")
@click.option("--tile-size", type=COUNT, metavar="PX",
              help="Tile side in px (slides: default 224; files: their own size).")
@click.option("--views", type=COUNT, metavar="K",
              help="Also embed K augmented views per tile (flips, rotations, stain and colour jitter).")
@click.option("--view-seed", type=int, metavar="SEED", default=0, show_default=True,
              help="Seed of the view recipe.")
@click.option("--devices", default="cpu", show_default=True,
              help="cpu | cuda:0,cuda:1 | all | cpu,cpu (one process per entry).")
@click.option("--batch-size", type=COUNT, metavar="N", default=64, show_default=True,
              help="Tiles per forward pass.")
@click.option("--workers", type=NON_NEGATIVE, metavar="N",
              help="DataLoader workers per process (default: cores - 1, at most 8; 0 for a CPU model "
                   "on 2 cores or fewer).")
@click.option("--threads", type=COUNT, metavar="N", help="Intra-op threads per process.")
@click.option("--decode-ahead/--no-decode-ahead", "decode_ahead", default=None,
              help="With 0 workers, read and decode the next batches in a thread while the model runs "
                   "(default: on; with a CPU model on every core that thread, and the one planning "
                   "slides ahead, run at idle priority, on the cycles the model leaves).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Inference precision (autocast). Default: fp32 on CPU, the backbone's on GPU.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="On-disk embedding dtype.")
@click.option("--task", help="Name of the labels task created from class folders / CSV labels.")
@click.option("--min-tissue", type=FRACTION, metavar="FRACTION", default=0.25, show_default=True,
              help="Tissue fraction a slide tile needs to be kept.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--files-per-unit", type=COUNT, metavar="N", default=256, show_default=True,
              help="Files per work unit (what a resume skips or redoes).")
@click.option("--rows-per-shard", type=COUNT, metavar="N", default=65536, show_default=True,
              help="Rows per committed shard (a shard is also committed every 30 s of work).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_option
def extract(sources: tuple[Path, ...], store: Path, backbone: str, weights: str | None,
            random_init: bool, target_mpp: float | None, slide_mpp: float | None,
            tile_size: int | None, views: int | None, view_seed: int, devices: str, batch_size: int,
            workers: int | None, threads: int | None, decode_ahead: bool | None, precision: str | None, dtype: str,
            task: str | None, min_tissue: float, compile_: bool, files_per_unit: int, rows_per_shard: int, quiet: bool,
            as_json: bool) -> None:
    """Embed tiles into STORE. SOURCE is a folder of tiles (class sub-folders become labels),
    a CSV manifest (path,label[,split,slide]), a slide file or a folder of slides.

    \b
    Re-running resumes: finished units are skipped, failed ones retried. Exit status 0 when
    everything was embedded, 1 when some inputs were recorded as errors, 2 on failure.
    """
    from ..backbones.devices import parse_devices
    from ..extract.runner import ExtractConfig, extract as run
    parse_devices(devices)                 # a bad --devices fails here, before any process or file
    cfg = ExtractConfig(store=store, backbone=backbone, weights=weights, random_init=random_init,
                        target_mpp=target_mpp, slide_mpp=slide_mpp, tile_size=tile_size, views=views,
                        view_seed=view_seed, batch_size=batch_size, num_workers=workers,
                        precision=precision, dtype=dtype, task=task, devices=devices,
                        compile=compile_, min_tissue=min_tissue, progress=not quiet,
                        num_threads=threads, files_per_unit=files_per_unit,
                        rows_per_shard=rows_per_shard, decode_ahead=decode_ahead)
    res = run(list(sources), cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for all
        sys.exit(res.exit_code)
    if as_json:
        echo_json({**dataclasses.asdict(res), "tiles_per_s": res.tiles_per_s, "exit_code": res.exit_code})
        sys.exit(res.exit_code)
    click.echo(res.summary())
    if res.overlays:
        click.echo(f"tissue overlays: {', '.join(res.overlays[:4])}" + (" ..." if len(res.overlays) > 4 else ""))
    sys.exit(res.exit_code)


@main.command()
@click.argument("pattern", required=False)
@json_option
def backbones(pattern: str | None, as_json: bool) -> None:
    """List the named backbones (any timm architecture name also works)."""
    from ..backbones import get_spec, list_backbones
    specs = [get_spec(name) for name in list_backbones(pattern)]
    if as_json:
        echo_json([s.to_dict() for s in specs])
        return
    for s in specs:
        mpp = f"{s.native_mpp} µm/px" if s.native_mpp else "-"
        click.echo(f"{s.name:24s} {s.kind:12s} dim {s.dim:<5d} {s.precision:5s} {mpp:10s} {s.hub_id or s.model_id}")

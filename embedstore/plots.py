"""Every picture embedstore draws with matplotlib: probability and similarity heatmaps over a
slide, search galleries, the backbone-selection chart. Figures are built without pyplot (no
global backend state) and published atomically as PNG."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import ConfigError
from .store.atomic import atomic_path
from .store.geometry import grid_step

if TYPE_CHECKING:
    from .index.search import SearchResult
    from .select.ranking import SelectionResult

__all__ = ["paint_tiles", "render_heatmap", "save_gallery", "plot_selection", "infer_tile_size"]


def infer_tile_size(coords: np.ndarray) -> int:
    """The tile side in level-0 pixels as the smallest positive step between grid coordinates."""
    xy = np.asarray(coords)
    step = grid_step(xy[:, 0], xy[:, 1])
    if step is None:
        raise ConfigError("cannot infer the tile size from a single tile; give tile_size=...")
    return int(step)


def _source_name(source: Path) -> str:
    return source.parent.name if source.stem == "labels" else source.stem or source.name


def paint_tiles(shape: tuple[int, int], downsample: float, coords: np.ndarray, side: float,
                values: np.ndarray) -> np.ndarray:
    """(h, w) float32 grid at ``downsample``: each tile (level-0 ``coords`` (n, 2) x, y, ``side``
    level-0 px) set to its ``values`` (n,) entry, NaN where no tile lies; a square spans the floor
    of its left/top edge to the ceiling of its right/bottom (at least one pixel), and later tiles
    paint over earlier ones."""
    h, w = shape
    grid = np.full((h, w), np.nan, dtype=np.float32)
    xy = np.asarray(coords, dtype=np.float64)
    x0 = np.floor(xy[:, 0] / downsample).astype(np.int64)
    y0 = np.floor(xy[:, 1] / downsample).astype(np.int64)
    x1 = np.clip(np.maximum(np.ceil((xy[:, 0] + side) / downsample).astype(np.int64), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.ceil((xy[:, 1] + side) / downsample).astype(np.int64), y0 + 1), 0, h)
    x0, y0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
    for a, b, c, d, v in zip(x0.tolist(), x1.tolist(), y0.tolist(), y1.tolist(),
                             np.asarray(values, np.float32).tolist()):
        grid[c:d, a:b] = v
    return grid


def render_heatmap(thumbnail: np.ndarray, downsample: float, coords: np.ndarray, values: np.ndarray,
                   out: str | os.PathLike[str], *, tile_size: int | None = None, alpha: float = 0.5,
                   title: str = "", cmap: str = "inferno", label: str = "probability") -> Path:
    """Draw each tile (level-0 ``coords`` (n, 2) int x, y; ``values`` (n,) in [0, 1]) as a
    semi-transparent square over ``thumbnail`` (h, w, 3) uint8, with a colour bar; writes a PNG."""
    from matplotlib.figure import Figure      # no pyplot: no global backend state

    thumb = np.asarray(thumbnail)
    h, w = thumb.shape[:2]
    side = tile_size if tile_size is not None else infer_tile_size(coords)
    grid = paint_tiles((h, w), downsample, coords, side, values)
    fig = Figure(figsize=(8, 8 * h / max(w, 1) + 0.5), dpi=100)
    ax = fig.subplots()
    ax.imshow(thumb)
    shown = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha,
                      interpolation="nearest")
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label=label)
    assert bar.solids is not None             # a colorbar of an image always has its solids
    bar.solids.set_alpha(1.0)                 # the scale itself opaque, the overlay see-through
    ax.set_title(title)
    ax.set_axis_off()
    path = Path(out)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def save_gallery(hits: list[SearchResult], names: list[str], out: Path,
                 load_tile: Callable[[str], object] | None = None) -> Path:
    """A grid: one row per query, its neighbours left to right, titled with score and slide.
    Tiles are drawn when ``load_tile(key)`` returns an image, else the cell shows the key."""
    from matplotlib.figure import Figure      # no pyplot: no global backend state

    cols = max(1, max((len(h.ids) for h in hits), default=1))
    fig = Figure(figsize=(1.8 * cols, 2.1 * len(hits)))
    axes = fig.subplots(len(hits), cols, squeeze=False)
    for r, (hit, name) in enumerate(zip(hits, names)):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(hit.ids):
                continue
            key = hit.keys[c]
            image = load_tile(key) if load_tile is not None else None
            if image is not None:
                ax.imshow(np.asarray(image))
            else:
                ax.text(0.5, 0.5, key.replace("/", "/\n"), ha="center", va="center", fontsize=6)
            ax.set_title(f"{hit.scores[c]:.3f}\n{hit.meta['slide'][c]}", fontsize=6)
        axes[r][0].text(-0.1, 0.5, name, transform=axes[r][0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return out


def plot_selection(result: SelectionResult, path: Path) -> None:
    """Bar chart of the proxy score (± std over folds), best first; downstream F1 beside it."""
    from matplotlib.figure import Figure
    cands = result.candidates
    down = all(c.downstream for c in cands)
    fig = Figure(figsize=((2.4 + 1.5 * len(cands)) * (2 if down else 1), 4.4), layout="constrained")
    axes = fig.subplots(1, 2 if down else 1, squeeze=False)[0]
    x = np.arange(len(cands))
    names = [c.label.replace(" (", "\n(") for c in cands]
    panels = [(axes[0], [c.mean for c in cands], [c.std for c in cands], f"{result.config['metric']} (± std over folds)",
               f"proxy: {_source_name(Path(result.proxy['source']))} ({result.proxy['folds']}-fold kNN, "
               f"k={result.config['k']})", "#3b75af")]
    if down:
        panels.append((axes[1], [c.downstream["f1"][0] for c in cands],   # type: ignore[index]
                       [c.downstream["f1"][1] for c in cands], "F1 on split=valid (± std over seeds)",  # type: ignore[index]
                       f"downstream: {_source_name(Path(result.config['validate']))}"
                       + (f"  (Spearman {result.spearman:.2f})" if result.spearman is not None else ""),
                       "#e08a3c"))
    chance = 1.0 / len(result.proxy["classes"])
    axes[0].axhline(chance, color="grey", linestyle="--", linewidth=1)
    axes[0].text(-0.45, chance + 0.01, "chance", ha="left", va="bottom", fontsize=8, color="grey",
                 bbox={"facecolor": "white", "edgecolor": "none", "pad": 1}, zorder=3)
    for ax, mean, std, ylabel, title, colour in panels:
        ax.bar(x, mean, yerr=std, capsize=6, color=colour, edgecolor="black", linewidth=0.6)
        for xi, m, s in zip(x, mean, std):
            ax.text(xi, m + s + 0.01, f"{m:.3f}", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)

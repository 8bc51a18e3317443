"""The ranked result of a selection and the statistics behind it: each candidate's scores, the
ranking (best mean proxy score first; ties: smaller spread, then the order given), Spearman's
correlation with a downstream task, and which downstream differences seed noise leaves unresolved.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..arrays import average_ranks
from ..errors import ShapeError

__all__ = ["Candidate", "SelectionResult", "rank_candidates", "spearman", "seed_noise_notes"]


@dataclass
class Candidate:
    backbone: str                  # the name given
    weights: str                   # "pretrained" | "random init"
    store: str                     # its proxy store
    dim: int = 0                   # embedding dimension
    fold_scores: list[float] = field(default_factory=list)
    mean: float = float("nan")     # metric mean over folds
    std: float = float("nan")      # metric std over folds (population)
    extract_s: float = 0.0         # extract() wall time (a cached run: the time to find it done)
    tiles_written: int = 0         # tiles embedded by this run (0 when the cache held them all)
    extract_errors: int = 0        # inputs extract() recorded as errors
    knn_s: float = 0.0             # kNN fit + predict over all folds
    streamed: bool = False         # scored from the store (past the memory budget), not in RAM
    rank: int = 0                  # 1 = best proxy score
    downstream: dict[str, Any] | None = None   # validate: f1/balanced accuracy mean, std, times

    @property
    def label(self) -> str:
        return self.backbone + (" (random init)" if self.weights == "random init" else "")


@dataclass
class SelectionResult:
    config: dict[str, Any]                 # the SelectConfig, JSON-ready
    proxy: dict[str, Any]                  # source, tiles, classes, groups, folds
    candidates: list[Candidate]            # best first
    spearman: float | None = None          # proxy score vs downstream F1 (validate only)
    elapsed: float = 0.0                   # the whole selection, seconds
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # caveats about this proxy and these settings

    def table(self) -> str:
        metric = self.config["metric"]
        head = ["rank", "backbone", "weights", f"{metric} (mean ± std)", "extract s", "kNN s"]
        if any(c.downstream for c in self.candidates):
            head.append("downstream F1")
        rows = []
        for c in self.candidates:
            ex = f"{c.extract_s:.1f}" + (" (cached)" if c.tiles_written == 0 else "")
            knn = f"{c.knn_s:.3f}" + (" (streamed)" if c.streamed else "")
            row = [str(c.rank), c.backbone, c.weights, f"{c.mean:.4f} ± {c.std:.4f}", ex, knn]
            if len(head) == 7:
                d = c.downstream
                row.append(f"{d['f1'][0]:.4f} ± {d['f1'][1]:.4f}" if d else "-")
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        p = self.proxy
        lines.append(f"proxy {p['source']}: {p['tiles']} tiles, {len(p['classes'])} classes, "
                     f"{p['folds']}-fold CV " + (f"grouped by {p['group_by']} ({p['groups']} groups)"
                                                 if p["group_by"] else "ungrouped")
                     + f", k={self.config['k']}" + (", centred" if self.config["centre"] else ""))
        lines += [f"note: {n}" for n in self.notes]
        if p["tiles_missing"]:
            lines.append(f"{p['tiles_missing']} proxy tile(s) missing from some store (unreadable: "
                         f"`embedstore errors STORE`); every candidate is scored on the same {p['tiles']}")
        rnd = [c.backbone for c in self.candidates if c.weights == "random init"]
        kept = [c.backbone for c in self.candidates if c.weights != "random init"]
        if self.config["random_init"]:
            lines.append(f"random init applied to: {', '.join(rnd) or 'none'}"
                         + (f"; not to {', '.join(kept)} (own weights)" if kept else ""))
        if self.spearman is not None:
            lines.append(f"Spearman(proxy score, downstream F1) = {self.spearman:.3f}")
        elif any(c.downstream for c in self.candidates):
            lines.append("Spearman undefined (fewer than 2 candidates or constant scores)")
        lines.append(f"selection time {self.elapsed:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "proxy": self.proxy,
                "candidates": [asdict(c) for c in self.candidates], "spearman": self.spearman,
                "elapsed_s": self.elapsed, "files": self.files, "notes": self.notes}


def rank_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """``candidates`` best first, each given its ``rank`` (1 = best): by mean proxy score, then the
    smaller spread over folds, then the order given."""
    order = sorted(range(len(candidates)),
                   key=lambda i: (-candidates[i].mean, candidates[i].std, i))
    ranked = [candidates[i] for i in order]
    for r, c in enumerate(ranked, start=1):
        c.rank = r
    return ranked


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two (n,) arrays (average ranks for ties); NaN when n < 2 or
    either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ShapeError(f"spearman needs two (n,) arrays, got {a.shape} and {b.shape}")
    if a.size < 2:
        return float("nan")
    ra, rb = average_ranks(a) - (a.size + 1) / 2, average_ranks(b) - (b.size + 1) / 2
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def seed_noise_notes(runs: Sequence[tuple[str, Sequence[float]]], z: float = 2.0) -> list[str]:
    """Downstream neighbours (by mean F1) whose gap is under ``z`` standard errors of the
    difference of their seed means: their downstream order, and so Spearman, is not resolved."""
    stats = sorted(((float(np.mean(r)), float(np.var(r, ddof=1)) / len(r) if len(r) > 1 else float("nan"), n)
                    for n, r in runs), reverse=True)
    out = []
    for (ma, va, a), (mb, vb, b) in zip(stats, stats[1:]):
        se = float(np.sqrt(va + vb))
        if not np.isfinite(se):
            out.append(f"downstream F1 of {a} and {b} comes from one head each: their order is not "
                       f"tested against seed noise; use --head-seeds 5 or more")
        elif ma - mb < z * se:
            out.append(f"downstream F1 of {a} ({ma:.4f}) and {b} ({mb:.4f}) differ by {ma - mb:.4f}, "
                       f"under {z:g} standard errors ({z * se:.4f}) of seed noise: their downstream "
                       f"order is not resolved, nor is Spearman; raise --head-seeds")
    return out

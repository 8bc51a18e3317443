"""Classification metrics in plain numpy (no scikit-learn at run time).

Conventions, fixed here once:
- labels are integer class indices ``0..c-1``; ``prob`` is ``(n, c)`` float.
- binary F1 is the F1 of the *positive* class (an explicit index, see ``resolve_positive``);
  multi-class F1 is the unweighted mean over all ``c`` classes (macro).
- a ratio whose denominator is zero counts as 0 (scikit-learn's ``zero_division=0``).
- AUROC is the Mann-Whitney statistic with tied scores counted as one half; multi-class AUROC
  is the macro mean of one-vs-rest AUROCs over the classes present in ``y_true``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..arrays import average_ranks
from ..errors import ShapeError

__all__ = [
    "confusion_matrix", "f1", "balanced_accuracy", "accuracy", "auroc",
    "classification_metrics", "mean_std", "format_table", "best_f1_threshold",
]


def _codes(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ShapeError(f"labels must be 1-D class indices, got shape {y.shape}")
    return y.astype(np.int64, copy=False)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(c, c)`` int64 counts; row = true class, column = predicted class."""
    t, p = _codes(y_true), _codes(y_pred)
    flat = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(a, b).shape, dtype=np.float64)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _per_class_f1(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return _safe_div(2 * tp, 2 * tp + fp + fn)


def f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, positive: int | None = None) -> float:
    """F1 of class ``positive`` when given (binary), else macro F1 over ``n_classes``."""
    per = _per_class_f1(confusion_matrix(y_true, y_pred, n_classes))
    return float(per[positive]) if positive is not None else float(per.mean())


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes that occur in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(cm)[present] / support[present]).mean())


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    t, p = _codes(y_true), _codes(y_pred)
    return float((t == p).mean()) if t.size else float("nan")


def _binary_auroc(is_pos: np.ndarray, score: np.ndarray) -> float:
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(score, dtype=np.float64))
    u = ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc(y_true: np.ndarray, prob: np.ndarray, positive: int | None = None) -> float:
    """Binary AUROC of ``prob[:, positive]`` when ``positive`` is given, else macro one-vs-rest.

    ``prob``: (n, c) float. NaN when a needed class is absent from ``y_true``.
    """
    t = _codes(y_true)
    prob = np.asarray(prob)
    if positive is not None:
        return _binary_auroc(t == positive, prob[:, positive])
    scores = [_binary_auroc(t == c, prob[:, c]) for c in range(prob.shape[1]) if (t == c).any()]
    scores = [s for s in scores if not math.isnan(s)]
    return float(np.mean(scores)) if scores else float("nan")


def best_f1_threshold(is_pos: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """Threshold ``t`` maximising the F1 of the rule ``score >= t``; returns ``(t, f1)``.

    Every distinct score is a candidate; ties in F1 prefer the threshold closest to 0.5.
    """
    is_pos = np.asarray(is_pos, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(is_pos.sum())
    if n_pos == 0 or n_pos == is_pos.size:
        return 0.5, float("nan")
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], is_pos[order]
    tp = np.cumsum(p)
    fp = np.cumsum(~p)
    last_of_value = np.r_[s[1:] != s[:-1], True]      # cut only between distinct scores
    tp, fp, cut = tp[last_of_value], fp[last_of_value], s[last_of_value]
    f1s = 2 * tp / (2 * tp + fp + (n_pos - tp))
    best = f1s.max()
    candidates = np.flatnonzero(np.isclose(f1s, best, rtol=0, atol=1e-12))
    pick = candidates[np.argmin(np.abs(cut[candidates] - 0.5))]
    return float(cut[pick]), float(best)


def classification_metrics(y_true: np.ndarray, prob: np.ndarray, y_pred: np.ndarray,
                           positive: int | None = None) -> dict[str, Any]:
    """Every metric we report for one evaluation.

    ``prob``: (n, c) float; ``y_pred``: (n,) class indices (after any threshold);
    ``positive``: the positive class index for binary tasks (None for multi-class).
    """
    c = int(np.asarray(prob).shape[1])
    return {
        "n": int(np.asarray(y_true).size),
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, c),
        "f1": f1(y_true, y_pred, c, positive),
        "auroc": auroc(y_true, prob, positive),
        "confusion": confusion_matrix(y_true, y_pred, c).tolist(),
    }


SCALAR_METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc")


def mean_std(runs: Sequence[Mapping[str, Any]],
             names: Sequence[str] = SCALAR_METRICS) -> dict[str, tuple[float, float]]:
    """``{name: (mean, std)}`` over runs (population std; 0 for a single run; NaNs ignored)."""
    out: dict[str, tuple[float, float]] = {}
    for name in names:
        values = np.array([float(r[name]) for r in runs if name in r], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[name] = (float(values.mean()), float(values.std())) if values.size else (math.nan, math.nan)
    return out


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table; ``(mean, std)`` tuples print as ``mean ± std``."""
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, tuple) and len(v) == 2:
            return f"{v[0]:.4f} ± {v[1]:.4f}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(b) for b in body])

"""A FAISS k-nearest-neighbour classifier over embeddings: the scoring rule of the proxy task.

The rule, fixed here once:

- **Similarity** is cosine: rows are L2-normalised and compared by inner product (an exact
  ``IndexFlatIP``). With ``centre=True`` the mean of the *training* rows is subtracted from
  training and query rows first; foundation-model embeddings share a large common component
  that otherwise dominates every cosine.
- **Vote**: each of the ``k`` nearest training rows adds ``exp(score / temperature)`` to its class
  (temperature 0.07, the weighting of the non-parametric classifiers of Wu et al. 2018 and DINO's
  kNN evaluation), ``score`` being its cosine similarity. Closer neighbours count exponentially
  more; with ``score`` in [-1, 1] the weights stay within float64 range for any temperature
  above ~0.0015.
- **Prediction**: the class with the largest vote; equal votes go to the lowest class index.

Rows whose norm is zero (possible after centring) stay zero: similarity 0 to every row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..arrays import l2_normalise
from ..errors import NotFittedError, SelectionError

__all__ = ["KnnConfig", "KnnClassifier", "fold_scores", "score_folds", "vote", "metric_value", "METRICS"]

METRICS = ("balanced_accuracy", "f1")   # f1 = macro F1 over the classes


@dataclass(frozen=True)
class KnnConfig:
    k: int = 20                  # neighbours that vote
    temperature: float = 0.07    # vote weight exp(score / temperature)
    centre: bool = False         # subtract the training mean before L2-normalising

    def __post_init__(self) -> None:
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise SelectionError(f"k must be a positive integer, got {self.k!r}")
        if not self.temperature > 0.0015:
            raise SelectionError(f"temperature must be > 0.0015 (exp(1/T) overflows below), "
                                 f"got {self.temperature!r}")



class KnnClassifier:
    """Fit on labelled rows, then vote over the ``k`` most similar of them.

    >>> clf = KnnClassifier(KnnConfig(k=20)).fit(emb_train, y_train, n_classes=3)
    >>> pred = clf.predict(emb_test)                       # (n,) int64 class indices
    """

    def __init__(self, config: KnnConfig | None = None) -> None:
        self.config = config or KnnConfig()
        self._index: Any = None
        self._y = np.empty(0, dtype=np.int64)
        self._mean: np.ndarray | None = None
        self.n_classes = 0

    def fit(self, emb: np.ndarray, y: np.ndarray, n_classes: int | None = None) -> "KnnClassifier":
        """``emb``: (n, dim) float; ``y``: (n,) int class indices in ``0..n_classes-1``."""
        import faiss

        y = np.asarray(y, dtype=np.int64)
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[0] != y.size:
            raise SelectionError(f"kNN needs (n, dim) embeddings and (n,) labels; got "
                                 f"{emb.shape} and {y.shape}")
        if self.config.k > y.size:
            raise SelectionError(f"k={self.config.k} is larger than the {y.size} training rows; "
                                 f"use a smaller --k")
        if not np.isfinite(emb).all():
            raise SelectionError("embeddings hold NaN or inf; re-extract the store")
        self.n_classes = int(n_classes if n_classes is not None else y.max() + 1)
        self._mean = emb.mean(axis=0, dtype=np.float64).astype(np.float32) if self.config.centre else None
        x = l2_normalise(emb, self._mean)
        self._index = faiss.IndexFlatIP(x.shape[1])
        self._index.add(x)
        self._y = y
        return self

    def kneighbors(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``: (n, k) float32 cosine similarities, largest first, and (n, k) int64
        ids of the neighbours in this classifier's index: positions among the training rows."""
        if self._index is None:
            raise NotFittedError("the kNN classifier is not fitted; call fit(emb, y) first")
        scores, ids = self._index.search(l2_normalise(emb, self._mean), self.config.k)
        return scores, ids

    def votes(self, emb: np.ndarray) -> np.ndarray:
        """(n, n_classes) float64: summed ``exp(score / temperature)`` of the neighbours per class."""
        scores, ids = self.kneighbors(emb)
        return vote(scores, self._y[ids], self.n_classes, self.config.temperature)

    def predict(self, emb: np.ndarray) -> np.ndarray:
        """(n,) int64 class with the largest vote (ties: lowest index)."""
        return np.argmax(self.votes(emb), axis=1).astype(np.int64)


def vote(scores: np.ndarray, labels: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    """(n, n_classes) float64 votes of neighbours with ``scores`` (n, k) and classes ``labels``
    (n, k): each adds ``exp(score / temperature)`` to its class."""
    n = scores.shape[0]
    w = np.exp(scores.astype(np.float64) / temperature)
    out = np.zeros((n, n_classes), dtype=np.float64)
    np.add.at(out, (np.repeat(np.arange(n), scores.shape[1]), np.asarray(labels).ravel()), w.ravel())
    return out


def metric_value(name: str, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    from ..heads.metrics import balanced_accuracy, f1
    if name == "balanced_accuracy":
        return balanced_accuracy(y_true, y_pred, n_classes)
    if name == "f1":
        return f1(y_true, y_pred, n_classes)   # macro over every class
    raise SelectionError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}")


def score_folds(y: np.ndarray, fold: np.ndarray, metric: str, n_classes: int | None,
                predict: Callable[[np.ndarray, np.ndarray, int], np.ndarray]) -> tuple[np.ndarray, float]:
    """The cross-validation loop of every kNN path: for each fold ``f``, ``predict(train, test,
    n_classes)`` (row positions with ``fold != f`` and ``== f``) gives the test rows' classes,
    scored by ``metric``. Returns ``(scores, seconds)``: (n_folds,) float64 in fold order and the
    time spent fitting and predicting."""
    if metric not in METRICS:
        raise SelectionError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    from ..heads import metrics as _  # noqa: F401  (imported outside the timed part)
    y = np.asarray(y, dtype=np.int64)
    fold = np.asarray(fold, dtype=np.int64)
    c = int(n_classes if n_classes is not None else y.max() + 1)
    scores = []
    t0 = time.perf_counter()
    for f in np.unique(fold):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        scores.append(metric_value(metric, y[test], predict(train, test, c), c))
    return np.asarray(scores, dtype=np.float64), time.perf_counter() - t0


def fold_scores(emb: np.ndarray, y: np.ndarray, fold: np.ndarray, config: KnnConfig,
                metric: str = "balanced_accuracy",
                n_classes: int | None = None) -> tuple[np.ndarray, float]:
    """Cross-validated kNN over ``emb`` (n, dim) in memory; ``y``, ``fold``: (n,) int
    (see :func:`score_folds`)."""
    y = np.asarray(y, dtype=np.int64)
    return score_folds(y, fold, metric, n_classes, lambda train, test, c: KnnClassifier(config).fit(
        emb[train], y[train], c).predict(emb[test]))

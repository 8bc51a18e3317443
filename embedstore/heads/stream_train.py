"""Training one head over rows read from the store, for sets larger than a memory budget.

The in-RAM path (:mod:`.train`) standardises the whole training matrix once. Here nothing of
the labelled set is held: the mean and std come from one streaming pass, each epoch reads its
rows window by window (blocks of consecutive ids in a shuffled order, shuffled within the
window, views sampled per row as in RAM, seeded by ``(seed, epoch)``), a background thread
prepares the next batches, and the early-stopping rows are read in chunks (or held, when they
fit a quarter of the budget). Memory: two windows and a few batches in flight, the model, and
O(n) index arrays (ids, labels, which view each row uses) — never an (n, dim) matrix.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augment import ViewBank, add_noise, epoch_generator, feature_dropout, mixup_within_class, sample_views
from ..errors import LabelsError
from .models import HeadConfig, HeadModule
from .stream import LazyRows, LazyViews, Prefetcher, locality_order, scan_rows
from ._fitting import EarlyStopping, start_fit, step_threads, torch_threads
from .train import (TrainedHead, _class_weights, carve_held_rows,
                    _training_codes, _tune_on, check_features, encode_labels, resolve_positive)

__all__ = ["train_head_streamed", "predict_rows", "streaming_moments"]

PREFETCH_BATCHES = 3      # batches the reading thread may run ahead of the optimiser
WINDOW_COPIES = 6         # float32 copies of a window alive at once (read, shuffle, augment)


@dataclass
class _Streamed:
    """The training problem, as positions into the store and the statistics to standardise by."""
    fit: LazyRows                  # the fitting rows
    codes: np.ndarray              # (n_fit,) int64 their classes
    bank: LazyViews | None         # their views, when views are sampled
    mean: torch.Tensor             # (dim,) of the fitting rows
    std: torch.Tensor              # (dim,) (1 for constant features)
    weight: torch.Tensor | None    # (c,) class weights of the loss
    held: LazyRows | None          # the early-stopping rows
    held_codes: np.ndarray | None  # (n_valid,) int64
    held_x: torch.Tensor | None    # the early-stopping rows standardised, when they fit
    window: int                    # rows read per window (a multiple of the batch)
    block: int                     # consecutive-id rows per block of the read order


def _as_rows(X: np.ndarray | LazyRows, chunk_rows: int) -> LazyRows:
    if isinstance(X, LazyRows):          # rows handed in lazily read as this fit's budget allows
        return X.with_chunks(chunk_rows)
    return LazyRows.of_array(np.asarray(X), chunk_rows=chunk_rows)


def streaming_moments(rows: LazyRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std per dimension, float32, from one pass in ``rows.chunk_rows``
    chunks (float64 accumulators, Chan's pairwise merge); NaN rows refused."""
    n, mean, m2 = 0, np.zeros(rows.dim), np.zeros(rows.dim)
    for pos, chunk in rows.chunks():
        x = check_features(chunk, rows.name).astype(np.float64)
        k, mu = x.shape[0], x.mean(axis=0)
        d = mu - mean
        m2 += ((x - mu) ** 2).sum(axis=0) + d * d * (n * k / (n + k))
        mean += d * (k / (n + k))
        n += k
    std = np.sqrt(m2 / max(n, 1))
    std[std < 1e-6] = 1.0                       # a constant feature standardises to 0
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def _sizes(budget: int, dim: int, itemsize: int, bs: int, n: int) -> tuple[int, int]:
    """``(window, block)``: rows per window (a multiple of the batch, two windows in half the
    budget) and rows per block (at least 16 blocks a window, so a batch mixes many places)."""
    per_row = dim * (itemsize + 4 * WINDOW_COPIES) * 2
    window = max(1, (budget // 2) // (per_row * bs)) * bs
    window = min(window, -(-n // bs) * bs)
    return window, max(1, min(4096, window // 16))


def _split_rows(cfg: HeadConfig, X: LazyRows, codes: np.ndarray, X_val: LazyRows | None,
                val_codes: np.ndarray | None, groups: np.ndarray | None, positive: int | None,
                seed: int) -> tuple[np.ndarray, LazyRows | None, np.ndarray | None]:
    """``(fit, held, held_codes)`` as the in-RAM ``_early_stopping_rows``, without reading rows."""
    if X_val is not None:
        return np.arange(codes.size), X_val, val_codes
    fit, held = carve_held_rows(cfg, codes, groups, positive, seed)
    return (fit, None, None) if held is None else (fit, X[held], codes[held])


def _held_chunks(data: _Streamed) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The early-stopping rows standardised, with their classes, chunk by chunk."""
    if data.held is None or data.held_codes is None:
        return
    if data.held_x is not None:
        yield data.held_x, torch.from_numpy(data.held_codes)
        return
    for pos, chunk in data.held.chunks():
        x = torch.from_numpy(np.array(chunk, dtype=np.float32)).sub_(data.mean).div_(data.std)
        yield x, torch.from_numpy(data.held_codes[pos])


def _read_window(data: _Streamed, p: np.ndarray, pick: np.ndarray | None) -> torch.Tensor:
    """The rows at positions ``p`` (each its view ``pick[p]``, or itself when -1), standardised."""
    x = np.empty((p.size, data.fit.dim), dtype=np.float32)
    if pick is None or data.bank is None:
        x[:] = data.fit.read(p)
    else:
        v = pick[p]
        use = v >= 0
        x[~use] = data.fit.read(p[~use])
        x[use] = data.bank.read_views(data.bank.offsets[p[use]] + v[use], data.fit.dim, data.fit.dtype)
    return torch.from_numpy(x).sub_(data.mean).div_(data.std)


def epoch_batches(data: _Streamed, cfg: HeadConfig, seed: int, epoch: int,
                  bs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's ``(x (b, dim) float32, y (b,) int64)`` batches, ``ceil(n / bs)`` of them,
    read window by window in locality order; determined by ``(seed, epoch)`` alone."""
    n = data.codes.size
    rng = np.random.default_rng([int(seed), int(epoch), 0x57E4])
    pos = np.arange(n)
    if cfg.balanced_sampling:
        p = 1.0 / np.bincount(data.codes)[data.codes]
        pos = rng.choice(n, size=n, replace=True, p=p / p.sum())
    aug = cfg.augment
    pick = None
    if aug.views and data.bank is not None and data.bank.offsets[-1] > 0:
        pick = sample_views(data.bank.counts, seed, epoch, aug.p_original)
    order = locality_order(data.fit.ids, pos, data.block, rng)
    for w, a in enumerate(range(0, order.size, data.window)):
        p = order[a:a + data.window]
        perm = rng.permutation(p.size)
        p = p[perm]                                       # shuffled within the window
        x, y = _read_window(data, p, pick), data.codes[p]
        if aug.noise > 0:
            x = add_noise(x, aug.noise, torch.ones(x.shape[1]), epoch_generator(seed, epoch, 4 * w + 5))
        if aug.mixup > 0:
            x = mixup_within_class(x, y, aug.mixup, np.random.default_rng([int(seed), int(epoch), w, 0x31C5]))
        if aug.dropout > 0:
            x = feature_dropout(x, aug.dropout, epoch_generator(seed, epoch, 4 * w + 7))
        yt = torch.from_numpy(y)
        for b in range(0, p.size, bs):
            yield x[b:b + bs], yt[b:b + bs]


def _valid_loss(body: torch.nn.Module, data: _Streamed) -> float:
    """Mean (class-weighted) cross-entropy over the early-stopping rows, read in chunks."""
    total, denom = 0.0, 0.0
    with torch.no_grad():
        for x, y in _held_chunks(data):
            total += float(F.cross_entropy(body(x), y, weight=data.weight, reduction="sum"))
            denom += float(data.weight[y].sum()) if data.weight is not None else y.numel()
    return total / max(denom, 1e-12)


def _fit_streamed(cfg: HeadConfig, data: _Streamed, n_classes: int, seed: int,
                  threads: int | None) -> tuple[HeadModule, dict[str, Any]]:
    """As the in-RAM ``_fit``: train epoch by epoch from prefetched batches, keeping the
    weights of the best validation loss."""
    n, dim = data.codes.size, data.fit.dim
    bs = cfg.batch_rows(n)
    with torch.random.fork_rng(devices=[]), torch_threads(step_threads(cfg, n, dim, n_classes, threads)):
        module, opt, factor = start_fit(cfg, n, dim, n_classes, data.mean, data.std, seed)
        body = module.body
        stopping = EarlyStopping(body, cfg)
        for epoch in range(cfg.epochs):
            stopping.epoch = epoch
            body.train()
            total = 0.0
            for xb, yb in Prefetcher(epoch_batches(data, cfg, seed, epoch, bs), PREFETCH_BATCHES):
                loss = F.cross_entropy(body(xb), yb, weight=data.weight)
                opt.zero_grad()
                loss.backward()
                opt.step(factor(opt.steps))
                total += loss.item() * yb.numel()
            stopping.train_loss.append(total / n)
            if data.held is None or cfg.patience == 0:
                continue
            body.eval()
            if stopping.stop(epoch, _valid_loss(body, data)):
                break
        stopping.restore()
    module.eval()
    return module, stopping.history()


def _prepare(X: LazyRows, codes: np.ndarray, fit: np.ndarray, held: LazyRows | None,
             held_codes: np.ndarray | None, cfg: HeadConfig, views: LazyViews | None, n_classes: int,
             budget: int) -> _Streamed:
    """The streamed problem: statistics from one pass, the held rows kept when they fit."""
    rows = X[fit]
    mean, std = streaming_moments(rows)
    held_x = None
    if held is not None and held.shape[0] * held.dim * 4 <= budget // 4:
        held_x = torch.from_numpy(np.array(check_features(held.materialise(), "validation embeddings"),
                                           dtype=np.float32)).sub_(mean).div_(std)
    bank = views.take(fit) if views is not None and cfg.augment.views else None
    window, block = _sizes(budget, X.dim, X.dtype.itemsize, cfg.batch_rows(fit.size), fit.size)
    y_fit = codes[fit]
    return _Streamed(rows, y_fit, bank, mean, std, _class_weights(y_fit, n_classes, cfg.class_weights),
                     held, held_codes, held_x, window, block)


def train_head_streamed(X_train: np.ndarray | LazyRows, y_train: Sequence[Any] | np.ndarray,
                        X_val: np.ndarray | LazyRows | None = None,
                        y_val: Sequence[Any] | np.ndarray | None = None, *,
                        groups: np.ndarray | None = None, config: HeadConfig | None = None,
                        views: ViewBank | LazyViews | None = None, seed: int = 0,
                        classes: Sequence[str] | None = None, threads: int | None = None,
                        memory_budget: int) -> TrainedHead:
    """``train_head`` for a set over ``memory_budget`` bytes: same arguments, same result in
    distribution, rows read from the store (or memmap) as training goes."""
    cfg = config or HeadConfig()
    t0 = time.perf_counter()
    chunk = scan_rows(memory_budget, int(X_train.shape[1]), np.dtype(X_train.dtype).itemsize)
    X = _as_rows(X_train, chunk)
    bank = LazyViews.from_bank(views) if isinstance(views, ViewBank) else views
    codes, class_list = _training_codes(X, y_train, bank, classes)
    positive = resolve_positive(class_list, codes, cfg.positive)
    held, held_codes = None, None
    if X_val is not None:
        if y_val is None:
            raise LabelsError("X_val given without y_val")
        held, held_codes = _as_rows(X_val, chunk), encode_labels(y_val, class_list)[0]
    fit, held, held_codes = _split_rows(cfg, X, codes, held, held_codes, groups, positive, seed)
    data = _prepare(X, codes, fit, held, held_codes, cfg, bank, len(class_list), memory_budget)
    module, history = _fit_streamed(cfg, data, len(class_list), seed, threads)
    head = TrainedHead(module, cfg, class_list, positive)
    valid: dict[str, Any] = {}
    if data.held is not None and data.held_codes is not None:
        valid = _tune_on(head, data.held_codes, predict_rows(head, data.held, data.held_x))
    head.history = {**history, "n_fit": int(fit.size), "n_valid": int(held_codes.size) if held is not None
                    and held_codes is not None else 0, "seconds": time.perf_counter() - t0,
                    "streamed": {"budget": int(memory_budget), "window_rows": data.window,
                                 "block_rows": data.block, "chunk_rows": chunk}}
    if valid:
        head.metrics["valid"] = valid
    return head


def predict_rows(head: TrainedHead, rows: LazyRows, standardised: torch.Tensor | None = None) -> np.ndarray:
    """Class probabilities (n, c) float32 of ``rows``, read ``rows.chunk_rows`` at a time
    (``standardised``: the rows already read and standardised, scored by the body directly)."""
    if standardised is not None:
        with torch.inference_mode():
            return torch.softmax(head.module.body(standardised), dim=1).numpy()
    out = np.empty((len(rows), len(head.classes)), dtype=np.float32)
    for pos, chunk in rows.chunks():
        out[pos] = head.predict_proba(check_features(chunk, rows.name))
    return out

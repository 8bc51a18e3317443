"""Training one head over in-memory embeddings: full-batch or large minibatches, no DataLoader.

The whole training matrix is standardised into one float32 tensor once; each epoch is a
permutation (or a class-balanced draw) of row indices and a few slices of that tensor.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augment import ViewBank, augment_epoch
from ..errors import DimensionMismatchError, HeadError, LabelsError
from .splits import carve_validation
from .metrics import best_f1_threshold, classification_metrics
from ._optim import AdamW
from ._fitting import EarlyStopping, start_fit, step_threads, torch_threads
from .models import HeadConfig, HeadModule
from .stream import LazyRows, LazyViews, stream_budget

__all__ = ["TrainedHead", "train_head", "evaluate", "encode_labels", "resolve_positive",
           "check_features"]

@dataclass
class TrainedHead:
    module: HeadModule                       # standardisation + body; input (n, dim) float
    config: HeadConfig                       # what trained it
    classes: list[str]                       # class index -> label
    positive: int | None = None              # binary: index of the positive class
    threshold: float | None = None           # binary: predict positive when prob >= threshold
    history: dict[str, Any] = field(default_factory=dict)   # losses, best epoch, timings
    metrics: dict[str, Any] = field(default_factory=dict)   # evaluation results recorded with it
    fingerprint: dict[str, Any] | None = None               # the store's embedding space, if known

    @property
    def dim(self) -> int:
        return int(self.module.mean.shape[0])

    def predict_proba(self, emb: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Class probabilities (n, c) float32 for ``emb`` (n, dim) float16/float32."""
        return self.predictor(batch_size)(emb)

    def predictor(self, batch_size: int = 65536) -> Callable[[np.ndarray], np.ndarray]:
        """``predict_proba`` as a function to call block after block (``predict_store``): the
        standardisation folded into the first layer once, and one float32 buffer reused for
        every block's rows. A fresh 15 MB tensor per block of 5,000 x 768 was kept by malloc
        in a 10M-row predict (~14 MB of anonymous memory per block, OOM-killed at 24 GB)."""
        self.module.eval()
        body = self.module.folded()
        classes, dim = len(self.classes), self.dim
        buf = torch.empty((0, dim), dtype=torch.float32)

        def proba(emb: np.ndarray) -> np.ndarray:
            nonlocal buf
            if emb.ndim != 2 or emb.shape[1] != dim:
                raise DimensionMismatchError(f"head expects (n, {dim}) embeddings, got {emb.shape}")
            out = np.empty((emb.shape[0], classes), dtype=np.float32)
            with torch.inference_mode():
                for a in range(0, emb.shape[0], batch_size):
                    rows = _tensor(emb[a:a + batch_size])
                    if buf.shape[0] < rows.shape[0]:
                        buf = torch.empty((rows.shape[0], dim), dtype=torch.float32)
                    chunk = buf[:rows.shape[0]]
                    chunk.copy_(rows)       # float16 -> float32 in torch: 6x numpy's astype
                    out[a:a + batch_size] = torch.softmax(body(chunk), dim=1).numpy()
            return out
        return proba

    def decide(self, prob: np.ndarray) -> np.ndarray:
        """Class indices (n,) int64 from probabilities, applying the binary threshold if any."""
        if self.positive is not None and self.threshold is not None:
            negative = 1 - self.positive
            return np.where(prob[:, self.positive] >= self.threshold, self.positive, negative).astype(np.int64)
        return prob.argmax(axis=1).astype(np.int64)

    def predict(self, emb: np.ndarray) -> np.ndarray:
        """Predicted class indices (n,) int64."""
        return self.decide(self.predict_proba(emb))

    def predict_labels(self, emb: np.ndarray) -> np.ndarray:
        """Predicted labels (n,) object (str)."""
        return np.asarray(self.classes, dtype=object)[self.predict(emb)]


def _tensor(rows: Any) -> torch.Tensor:
    """``rows`` as a tensor without a copy where numpy allows (a read-only memory map too: the
    tensor is only read; torch's warning about non-writable arrays is for writers)."""
    arr = np.asarray(rows)
    if arr.dtype not in (np.float16, np.float32, np.float64) or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def check_features(emb: np.ndarray, name: str = "embeddings", chunk: int = 65536) -> np.ndarray:
    """``emb`` as a 2-D float array with no NaN/inf; one-line HeadError otherwise."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] == 0 or not np.issubdtype(emb.dtype, np.floating):
        raise HeadError(f"{name} must be a non-empty (n, dim) float array, got {emb.dtype} {emb.shape}")
    n_bad, first = 0, -1
    for a in range(0, emb.shape[0], chunk):
        bad = np.flatnonzero(~np.isfinite(emb[a:a + chunk]).all(axis=1))
        if bad.size and first < 0:
            first = a + int(bad[0])
        n_bad += bad.size
    if n_bad:
        raise HeadError(f"{name} hold NaN or inf in {n_bad} row(s) (first: row {first}); "
                        f"re-extract or drop those tiles")
    return emb


def encode_labels(y: Sequence[Any] | np.ndarray, classes: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, list[str]]:
    """``(codes (n,) int64, classes)``; classes default to the sorted distinct labels (as str)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise LabelsError(f"labels must be 1-D, got shape {y.shape}")
    if any(v is None for v in y.tolist()):
        raise LabelsError("labels contain missing values; drop unlabelled rows first")
    if classes is None:
        uniq, codes = np.unique(y, return_inverse=True)
        return codes.astype(np.int64).reshape(-1), [str(u) for u in uniq.tolist()]
    index = {c: i for i, c in enumerate(classes)}
    as_str = [str(v) for v in y.tolist()]
    unknown = sorted({s for s in as_str if s not in index})
    if unknown:
        raise LabelsError(f"labels {unknown[:5]} are not among the head's classes {list(classes)}")
    return np.fromiter((index[s] for s in as_str), dtype=np.int64, count=len(as_str)), list(classes)


def resolve_positive(classes: Sequence[str], codes: np.ndarray, positive: str | None) -> int | None:
    """Binary tasks: the index of the positive class — ``positive`` if given, else the minority
    class of ``codes`` (the second class on a tie). None for multi-class."""
    if len(classes) != 2:
        if positive is not None:
            raise HeadError(f"positive={positive!r} only applies to binary tasks; got {len(classes)} classes")
        return None
    if positive is not None:
        if positive not in classes:
            raise HeadError(f"positive class {positive!r} is not one of {list(classes)}")
        return list(classes).index(positive)
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=2)
    return 0 if counts[0] < counts[1] else 1


def _class_weights(codes: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, codes.size / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _owned_float32(emb: np.ndarray, rows: np.ndarray | None) -> torch.Tensor:
    """A float32 tensor copy of ``emb[rows]`` (all rows when None) that we may modify in place;
    one copy whatever the input (float16, read-only memmap, float32)."""
    picked = emb[rows] if rows is not None else emb          # fancy indexing copies already
    if rows is not None and picked.dtype == np.float32:
        return torch.from_numpy(picked)
    return torch.from_numpy(np.array(picked, dtype=np.float32))


def train_head(X_train: np.ndarray | LazyRows, y_train: Sequence[Any] | np.ndarray,
               X_val: np.ndarray | LazyRows | None = None, y_val: Sequence[Any] | np.ndarray | None = None,
               *, groups: np.ndarray | None = None, config: HeadConfig | None = None,
               views: ViewBank | LazyViews | None = None, seed: int = 0,
               classes: Sequence[str] | None = None, threads: int | None = None,
               memory_budget: int | str | None = None) -> TrainedHead:
    """Train one head.

    ``X_train``: (n, dim) float16/float32; ``y_train``: (n,) labels; ``groups``: (n,) slide or
    patient of each row, so the early-stopping set carved from the training rows (when ``X_val``
    is None) never shares a group with them; ``views``: the view bank aligned with ``X_train``
    rows (used when ``config.augment.views``); ``classes``: fix the label order (default sorted);
    ``threads``: torch threads while training (None: 1 for small steps, else torch's setting).
    ``X_*`` may be ``LazyRows`` (rows read from a store on demand) and ``views`` ``LazyViews``;
    ``memory_budget`` (bytes or "8G"): when the rows and views would take more than that in RAM,
    train from the store instead (``stream_train``, same result in distribution). None: arrays
    train in RAM as given, ``LazyRows`` get the default share of the machine's RAM.
    """
    cfg = config or HeadConfig()
    budget = stream_budget(X_train, views, cfg.augment.views, memory_budget)
    if budget is not None:
        from .stream_train import train_head_streamed     # imports this module
        return train_head_streamed(X_train, y_train, X_val, y_val, groups=groups, config=cfg,
                                   views=views, seed=seed, classes=classes, threads=threads,
                                   memory_budget=budget)
    X_train, X_val, views = _in_memory(X_train, X_val, views)
    t0 = time.perf_counter()
    X_train = check_features(X_train, "training embeddings")
    codes, class_list = _training_codes(X_train, y_train, views, classes)
    positive = resolve_positive(class_list, codes, cfg.positive)
    fit, X_val, val_codes = _early_stopping_rows(cfg, X_train, codes, X_val, y_val, class_list,
                                                 groups, positive, seed)
    data = _standardise(cfg, X_train, codes, fit, X_val, val_codes, views, len(class_list))
    module, history = _fit(cfg, data, len(class_list), seed, threads)
    head = TrainedHead(module, cfg, class_list, positive)
    valid_metrics = _tune_and_score(head, data)
    head.history = {**history, "n_fit": int(data.y.numel()),
                    "n_valid": int(data.yv.numel()) if data.yv is not None else 0,
                    "seconds": time.perf_counter() - t0}
    if valid_metrics:
        head.metrics["valid"] = valid_metrics
    return head


def _in_memory(X_train: np.ndarray | LazyRows, X_val: np.ndarray | LazyRows | None,
               views: ViewBank | LazyViews | None) -> tuple[np.ndarray, np.ndarray | None, ViewBank | None]:
    """Lazy rows and views read whole (they fit the budget); arrays as they are."""
    if isinstance(views, LazyViews):
        views = views.materialise(int(X_train.shape[1]), np.dtype(X_train.dtype))
    if isinstance(X_train, LazyRows):
        X_train = X_train.materialise()
    if isinstance(X_val, LazyRows):
        X_val = X_val.materialise()
    return X_train, X_val, views


def _training_codes(X_train: np.ndarray | LazyRows, y_train: Sequence[Any] | np.ndarray,
                    views: ViewBank | LazyViews | None,
                    classes: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """``(codes (n,) int64, classes)`` of the training labels; one line for labels that cannot train."""
    codes, class_list = encode_labels(y_train, classes)
    if codes.size != X_train.shape[0]:
        raise LabelsError(f"{codes.size} labels for {X_train.shape[0]} embeddings; give one label per row")
    present = np.unique(codes)
    if present.size < 2:
        raise LabelsError(f"only one class ({class_list[present[0]]}) in the training labels; "
                          f"a classifier needs at least two")
    if views is not None and views.ids.size != codes.size:
        raise HeadError(f"view bank has {views.ids.size} rows for {codes.size} training rows")
    return codes, class_list


def _early_stopping_rows(cfg: HeadConfig, X_train: np.ndarray, codes: np.ndarray,
                         X_val: np.ndarray | None, y_val: Sequence[Any] | np.ndarray | None,
                         classes: list[str], groups: np.ndarray | None, positive: int | None,
                         seed: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(fit, X_val, val_codes)``: the training rows that fit, and the early-stopping set — the
    one given, or one carved from the training rows by ``groups`` (None when neither is used)."""
    fit = np.arange(codes.size)
    if X_val is not None:
        X_val = check_features(X_val, "validation embeddings")
        if y_val is None:
            raise LabelsError("X_val given without y_val")
        return fit, X_val, encode_labels(y_val, classes)[0]
    fit, held = carve_held_rows(cfg, codes, groups, positive, seed)
    return (fit, None, None) if held is None else (fit, X_train[held], codes[held])


def carve_held_rows(cfg: HeadConfig, codes: np.ndarray, groups: np.ndarray | None,
                    positive: int | None, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(fit, held)`` positions: the rows carved from the training rows by ``groups`` for early
    stopping or threshold tuning (``held`` None, ``fit`` every row, when neither is asked for or
    the carve leaves a side empty or one class to fit)."""
    every = np.arange(codes.size)
    if cfg.valid_fraction > 0 and (cfg.patience > 0 or (positive is not None and cfg.tune_threshold)):
        fit, held = carve_validation(codes, groups, cfg.valid_fraction, seed)
        if held.size == 0 or fit.size == 0 or np.unique(codes[fit]).size < 2:
            return every, None
        return fit, held
    return every, None


@dataclass
class _Problem:
    """The standardised training problem: every tensor one float32 copy, made once."""
    x: torch.Tensor                  # (n_fit, dim) standardised fitting rows
    y: torch.Tensor                  # (n_fit,) int64 their class indices
    y_fit: np.ndarray                # (n_fit,) int64 the same, for the augmentation
    mean: torch.Tensor               # (dim,) of the fitting rows
    std: torch.Tensor                # (dim,) of the fitting rows (1 for constant features)
    weight: torch.Tensor | None      # (c,) class weights of the loss
    xv: torch.Tensor | None          # (n_valid, dim) standardised early-stopping rows
    yv: torch.Tensor | None          # (n_valid,) int64
    val_codes: np.ndarray | None     # (n_valid,) int64, as yv
    bank: ViewBank | None            # the views of the fitting rows
    bank_emb: torch.Tensor | None    # (m, dim) standardised views, when views are sampled


def _standardise(cfg: HeadConfig, X_train: np.ndarray, codes: np.ndarray, fit: np.ndarray,
                 X_val: np.ndarray | None, val_codes: np.ndarray | None, views: ViewBank | None,
                 n_classes: int) -> _Problem:
    """Standardise the fitting rows by their own mean and std, and the validation rows and
    views by the same statistics."""
    whole = fit.size == codes.size
    y_fit = codes[fit]
    bank = views.take(fit) if views is not None and not whole else views
    x = _owned_float32(X_train, None if whole else fit)     # (n_fit, dim)
    mean = x.mean(dim=0)
    x.sub_(mean)
    std = torch.linalg.vector_norm(x, dim=0).div_(math.sqrt(x.shape[0]))
    std[std < 1e-6] = 1.0                       # a constant feature standardises to 0
    x.div_(std)
    xv = yv = None
    if X_val is not None and val_codes is not None:
        xv = _owned_float32(X_val, None).sub_(mean).div_(std)
        yv = torch.from_numpy(val_codes)
    bank_emb = None
    if cfg.augment.views and bank is not None and bank.emb.shape[0]:
        bank_emb = _owned_float32(bank.emb, None).sub_(mean).div_(std)
    return _Problem(x, torch.from_numpy(y_fit), y_fit, mean, std,
                    _class_weights(y_fit, n_classes, cfg.class_weights), xv, yv,
                    val_codes if xv is not None else None, bank, bank_emb)


def _fit(cfg: HeadConfig, data: _Problem, n_classes: int, seed: int,
         threads: int | None) -> tuple[HeadModule, dict[str, Any]]:
    """Build the head and train it epoch by epoch, keeping the weights of the best validation
    loss (early stopping). Returns the module in eval mode and its training history."""
    n, dim = data.x.shape
    bs = cfg.batch_rows(n)
    with torch.random.fork_rng(devices=[]), torch_threads(step_threads(cfg, n, dim, n_classes, threads)):
        module, opt, factor = start_fit(cfg, n, dim, n_classes, data.mean, data.std, seed)
        body = module.body
        order_gen = torch.Generator().manual_seed(seed)
        sample_p = None
        if cfg.balanced_sampling:
            counts = torch.bincount(data.y, minlength=n_classes).to(torch.float64)
            sample_p = (1.0 / counts.clamp_min(1))[data.y]
        batch = torch.empty(bs, dim)
        stopping = EarlyStopping(body, cfg)
        for epoch in range(cfg.epochs):
            stopping.epoch = epoch
            body.train()
            xe = augment_epoch(data.x, data.y_fit, cfg.augment, seed=seed, epoch=epoch, bank=data.bank,
                               bank_emb=data.bank_emb) if cfg.augment.active else data.x
            if sample_p is not None:
                order = torch.multinomial(sample_p, n, replacement=True, generator=order_gen)
            else:
                order = torch.randperm(n, generator=order_gen)
            stopping.train_loss.append(_epoch(body, opt, factor, xe, data.y, order, batch, data.weight))
            if data.xv is None or data.yv is None or cfg.patience == 0:
                continue
            body.eval()
            with torch.no_grad():
                vl = float(F.cross_entropy(body(data.xv), data.yv, weight=data.weight))
            if stopping.stop(epoch, vl):
                break
        stopping.restore()
    module.eval()
    return module, stopping.history()


def _epoch(body: torch.nn.Module, opt: AdamW, factor: Callable[[int], float], xe: torch.Tensor,
           y: torch.Tensor, order: torch.Tensor, batch: torch.Tensor,
           weight: torch.Tensor | None) -> float:
    """One pass over the rows in ``order``, ``len(batch)`` rows a step; the mean training loss."""
    n, bs = order.numel(), batch.shape[0]
    total = 0.0
    for a in range(0, n, bs):
        idx = order[a:a + bs]
        xb = torch.index_select(xe, 0, idx, out=batch[:idx.numel()])   # no per-step allocation
        loss = F.cross_entropy(body(xb), y[idx], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step(factor(opt.steps))
        total += loss.item() * idx.numel()
    return total / n


def _tune_and_score(head: TrainedHead, data: _Problem) -> dict[str, Any]:
    """Binary heads: the F1-maximising threshold on the early-stopping rows (when asked); then
    the metrics there. Empty without early-stopping rows."""
    if data.xv is None or data.val_codes is None:
        return {}
    with torch.inference_mode():
        prob = torch.softmax(head.module.body(data.xv), dim=1).numpy()
    return _tune_on(head, data.val_codes, prob)


def _tune_on(head: TrainedHead, val_codes: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Tune the binary threshold (when asked) and score, on early-stopping rows of ``prob`` (n, c)."""
    positive = head.positive
    if positive is not None and head.config.tune_threshold:
        threshold, best_f1 = best_f1_threshold(val_codes == positive, prob[:, positive])
        head.threshold = None if math.isnan(best_f1) else threshold
    return classification_metrics(val_codes, prob, head.decide(prob), positive)


def evaluate(head: TrainedHead, X: np.ndarray | LazyRows, y: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    """Metrics of ``head`` on (n, dim) embeddings (or ``LazyRows``, scored chunk by chunk) with
    (n,) labels: accuracy, balanced accuracy, F1 (positive class for binary, macro otherwise),
    AUROC, confusion matrix."""
    if not isinstance(X, LazyRows):
        X = check_features(X, "evaluation embeddings")
    codes, _ = encode_labels(y, head.classes)
    if isinstance(X, LazyRows):
        from .stream_train import predict_rows
        prob = predict_rows(head, X)
    else:
        prob = head.predict_proba(X)
    return classification_metrics(codes, prob, head.decide(prob), head.positive)

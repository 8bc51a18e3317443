"""Feature-space augmentation for head training, seeded by ``(seed, epoch)``.

Two families, composable in this order each epoch:

(a) **view sampling** — each training tile is represented by one of its K stored augmented views
    or by its original embedding (uniform over K+1, or original with probability ``p_original``).
    Views are gathered from a ``ViewBank`` by index arrays computed once.
(b) **embedding-space perturbations** — Gaussian noise scaled to each dimension's std
    (``noise`` = sigma), mixup with a partner of the *same class* (``mixup`` = Beta alpha; the
    label is unchanged), and feature dropout (``dropout`` = p, inverted scaling).

CLI strings: ``views,noise=0.1,mixup=0.2,dropout=0.1[,p_original=0.5]`` (``none`` or ``""`` = off).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from ..errors import HeadError

__all__ = ["AugmentConfig", "parse_augment", "ViewBank", "epoch_generator", "sample_views",
           "add_noise", "mixup_within_class", "feature_dropout", "augment_epoch"]


@dataclass(frozen=True)
class AugmentConfig:
    views: bool = False               # sample one stored view (or the original) per tile per epoch
    p_original: float | None = None   # chance of the original embedding; None = uniform over K+1
    noise: float = 0.0                # Gaussian noise sigma, in units of each dimension's std
    mixup: float = 0.0                # within-class mixup Beta(alpha, alpha); 0 = off
    dropout: float = 0.0              # feature dropout probability; 0 = off

    def __post_init__(self) -> None:
        for name in ("noise", "mixup"):
            if getattr(self, name) < 0:
                raise HeadError(f"augment {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise HeadError(f"augment dropout must be in [0, 1), got {self.dropout}")
        if self.p_original is not None and not 0 <= self.p_original <= 1:
            raise HeadError(f"augment p_original must be in [0, 1], got {self.p_original}")

    @property
    def active(self) -> bool:
        return self.views or self.noise > 0 or self.mixup > 0 or self.dropout > 0

    def __str__(self) -> str:
        parts = ["views"] if self.views else []
        if self.p_original is not None:
            parts.append(f"p_original={self.p_original:g}")
        parts += [f"{f}={getattr(self, f):g}" for f in ("noise", "mixup", "dropout") if getattr(self, f)]
        return ",".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_augment(text: str | None) -> AugmentConfig:
    """Parse ``views,noise=0.1,mixup=0.2,dropout=0.1,p_original=0.5`` (any subset, any order)."""
    cfg = AugmentConfig()
    if text is None or text.strip().lower() in ("", "none", "off"):
        return cfg
    values: dict[str, Any] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, eq, raw = item.partition("=")
        name = name.strip().lower().replace("-", "_")
        if name == "views" and not eq:
            values["views"] = True
        elif name in ("noise", "mixup", "dropout", "p_original") and eq:
            try:
                values[name] = float(raw)
            except ValueError:
                raise HeadError(f"augment {name} needs a number, got {raw!r} in {text!r}") from None
        else:
            raise HeadError(f"unknown augmentation {item!r} in {text!r}; use views, noise=S, mixup=A, "
                            f"dropout=P, p_original=P")
    if "p_original" in values and not values.get("views"):
        raise HeadError(f"p_original only applies with views, got {text!r}")
    return replace(cfg, **values)


@dataclass(frozen=True)
class ViewBank:
    """The stored views of a set of labelled rows, gathered once.

    Row ``i`` (tile ``ids[i]``) has its views in ``emb[offsets[i]:offsets[i+1]]`` (K_i of them,
    possibly 0); ``base_ids`` names the tile of every view, so leak checks need no other table.
    """
    ids: np.ndarray        # (n,) int64 tile id of each row
    emb: np.ndarray        # (m, dim) float views, grouped by row in row order
    offsets: np.ndarray    # (n + 1,) int64 CSR offsets into emb, one segment per row
    base_ids: np.ndarray   # (m,) int64 tile id of each view

    @classmethod
    def build(cls, ids: np.ndarray, view_ids: np.ndarray, view_emb: np.ndarray) -> "ViewBank":
        """Select the views of the tiles ``ids`` from a store's bank (``store.views()``).

        ``ids``: (n,) int64 tile ids in row order; ``view_ids``: (M,) base tile id of each stored
        view; ``view_emb``: (M, dim). A view is taken only through its own tile's id.
        """
        ids = np.asarray(ids, dtype=np.int64)
        view_ids = np.asarray(view_ids, dtype=np.int64)
        if np.unique(ids).size != ids.size:
            raise HeadError("tile ids repeat; each tile may appear once in a view bank")
        order = np.argsort(view_ids, kind="stable")
        sorted_ids = view_ids[order]
        lo = np.searchsorted(sorted_ids, ids, side="left")
        hi = np.searchsorted(sorted_ids, ids, side="right")
        return cls._from_segments(ids, lo, hi - lo, view_emb, order, view_ids)

    @classmethod
    def _from_segments(cls, ids: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                       emb: np.ndarray, order: np.ndarray | None, base: np.ndarray) -> "ViewBank":
        """Rows ``i`` take the views ``order[starts[i] : starts[i] + counts[i]]`` of ``emb``."""
        offsets = np.zeros(ids.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        pos = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])
        rows = order[pos] if order is not None else pos
        base_ids = np.asarray(base[rows], dtype=np.int64)
        assert np.array_equal(base_ids, np.repeat(ids, counts)), "a view left its tile"
        return cls(ids, np.asarray(emb[rows]), offsets, base_ids)

    def take(self, rows: np.ndarray) -> "ViewBank":
        """The bank of a subset of rows (e.g. one fold's training rows), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return ViewBank._from_segments(self.ids[rows], self.offsets[rows], self.counts[rows],
                                       self.emb, None, self.base_ids)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A torch generator determined by ``(seed, epoch, stream)`` alone."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream), 0xA46]).generate_state(2)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def sample_views(counts: np.ndarray, seed: int, epoch: int, p_original: float | None = None) -> np.ndarray:
    """Which representation each row uses this epoch: ``(n,)`` int64, -1 = original, else the
    view number ``0..K_i-1`` within the row's own segment (so a row only ever gets its own views)."""
    counts = np.asarray(counts, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch), 0x71E5])
    u = rng.random(counts.size)
    if p_original is None:
        pick = np.floor(u * (counts + 1)).astype(np.int64) - 1         # uniform over K+1
    else:
        v = rng.random(counts.size)
        pick = np.where(u < p_original, -1, np.floor(v * counts).astype(np.int64))
    return np.where(counts > 0, np.minimum(pick, counts - 1), -1)


def add_noise(x: torch.Tensor, sigma: float, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``x + sigma * std * N(0, 1)`` with ``std`` (dim,) the per-dimension std."""
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x + noise.mul_(std.to(x.dtype) * sigma)


def mixup_within_class(x: torch.Tensor, y: np.ndarray, alpha: float,
                       rng: np.random.Generator) -> torch.Tensor:
    """Mix each row with a random row of the *same class*: ``lam * x + (1 - lam) * x_partner``,
    ``lam ~ Beta(alpha, alpha)`` per row; ``y`` (n,) int class indices. Labels are unchanged."""
    y = np.asarray(y, dtype=np.int64)
    n = y.size
    by_class_a = np.lexsort((rng.random(n), y))          # rows grouped by class, random within
    by_class_b = np.lexsort((rng.random(n), y))          # an independent order, same grouping
    partner = np.empty(n, dtype=np.int64)
    partner[by_class_a] = by_class_b
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=n)).to(x.dtype).unsqueeze(1)
    return lam * x + (1 - lam) * x[torch.from_numpy(partner)]


def feature_dropout(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero each feature with probability ``p`` and scale the rest by ``1 / (1 - p)``."""
    keep = torch.rand(x.shape, generator=gen) >= p
    return x * keep.to(x.dtype) / (1 - p)


def augment_epoch(x: torch.Tensor, y: np.ndarray, cfg: AugmentConfig, *, seed: int, epoch: int,
                  std: torch.Tensor | None = None, bank: ViewBank | None = None,
                  bank_emb: torch.Tensor | None = None) -> torch.Tensor:
    """The training matrix for one epoch: (n, dim) from ``x`` (n, dim), never modified in place.

    ``bank_emb`` is ``bank.emb`` already converted (and standardised) like ``x``; ``std`` (dim,)
    scales the noise (ones when ``x`` is standardised).
    """
    out = x
    if cfg.views and bank is not None and bank.offsets[-1] > 0:
        pick = sample_views(bank.counts, seed, epoch, cfg.p_original)
        use = np.flatnonzero(pick >= 0)
        src = torch.from_numpy(bank.offsets[use] + pick[use])
        out = x.clone()
        emb = bank_emb if bank_emb is not None else torch.as_tensor(np.asarray(bank.emb, np.float32))
        out[torch.from_numpy(use)] = emb[src].to(x.dtype)
    if cfg.noise > 0:
        scale = std if std is not None else torch.ones(x.shape[1], dtype=x.dtype)
        out = add_noise(out, cfg.noise, scale, epoch_generator(seed, epoch, 1))
    if cfg.mixup > 0:
        rng = np.random.default_rng([int(seed), int(epoch), 0x31C5])
        out = mixup_within_class(out, y, cfg.mixup, rng)
    if cfg.dropout > 0:
        out = feature_dropout(out, cfg.dropout, epoch_generator(seed, epoch, 3))
    return out

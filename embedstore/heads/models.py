"""Head configuration and the torch modules: a standardising front end and a linear or MLP body."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import torch
from torch import nn

from .augment import AugmentConfig
from ..errors import HeadError

__all__ = ["HeadConfig", "HeadModule", "build_head_module"]

KINDS = ("linear", "mlp")
SCHEDULES = ("cosine", "constant")
CLASS_WEIGHTS = ("none", "auto")


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "linear"            # "linear" | "mlp"
    hidden: int = 256               # MLP hidden width (ignored by linear)
    dropout: float = 0.0            # MLP dropout after the hidden layer (ignored by linear)
    lr: float | None = None         # AdamW peak learning rate; None = 3e-3 linear, 1e-3 MLP
    weight_decay: float = 1e-4      # AdamW decoupled weight decay
    epochs: int = 100               # upper bound; early stopping usually ends sooner
    batch_size: int = 0             # minibatch rows; 0 = auto (n/16 in [64, 8192]); >= n = full batch
    schedule: str = "cosine"        # "cosine" (over all epochs' steps) | "constant"
    class_weights: str = "none"     # "none" | "auto" (inverse class frequency in the loss)
    balanced_sampling: bool = False # draw each epoch's rows with equal class probability
    patience: int = 5               # epochs without validation-loss improvement before stopping; 0 = off
    valid_fraction: float = 0.1     # share of training rows (grouped) carved for early stopping
    tune_threshold: bool = True     # binary: pick the F1-maximising threshold on validation
    positive: str | None = None     # binary positive class label; None = minority (second on ties)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # feature-space augmentation

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HeadError(f"head kind must be one of {KINDS}, got {self.kind!r}")
        if self.schedule not in SCHEDULES:
            raise HeadError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise HeadError(f"class_weights must be one of {CLASS_WEIGHTS}, got {self.class_weights!r}")
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 0 or self.patience < 0:
            raise HeadError(f"hidden and epochs must be >= 1, batch_size and patience >= 0; got "
                            f"hidden={self.hidden} epochs={self.epochs} batch_size={self.batch_size} "
                            f"patience={self.patience}")
        if not 0 <= self.dropout < 1 or not 0 <= self.valid_fraction < 1:
            raise HeadError(f"dropout and valid_fraction must be in [0, 1), got {self.dropout}, "
                            f"{self.valid_fraction}")
        if (self.lr is not None and self.lr <= 0) or self.weight_decay < 0:
            raise HeadError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")

    @property
    def learning_rate(self) -> float:
        """The lr in effect (the per-kind default when ``lr`` is None)."""
        if self.lr is not None:
            return self.lr
        return 3e-3 if self.kind == "linear" else 1e-3

    def batch_rows(self, n: int) -> int:
        """Rows per step for ``n`` training rows (auto: ~16 steps an epoch, 64 to 8192 rows)."""
        if self.batch_size == 0:
            return max(1, min(n, max(64, min(8192, n // 16))))
        return max(1, min(self.batch_size, n))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["augment"] = self.augment.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if isinstance(values.get("augment"), Mapping):
            values["augment"] = AugmentConfig(**values["augment"])
        return cls(**values)

    def with_params(self, params: Mapping[str, Any]) -> "HeadConfig":
        """A copy with ``params`` set; ``augment.noise`` style names reach the augmentation."""
        top = {k: v for k, v in params.items() if not k.startswith("augment.")}
        aug = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("augment.")}
        unknown = set(top) - {f.name for f in fields(self)}
        unknown |= {f"augment.{k}" for k in set(aug) - {f.name for f in fields(AugmentConfig)}}
        if unknown:
            raise HeadError(f"unknown head parameter(s) {sorted(unknown)}")
        out = replace(self, **top)
        return replace(out, augment=replace(out.augment, **aug)) if aug else out


class HeadModule(nn.Module):
    """``(x - mean) / std`` followed by the body. Input (n, dim) float; output (n, c) logits."""

    mean: torch.Tensor   # (dim,) float32 buffer
    std: torch.Tensor    # (dim,) float32 buffer

    def __init__(self, body: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("mean", mean.to(torch.float32).clone())
        self.register_buffer("std", std.to(torch.float32).clone())

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.standardise(x))

    def folded(self) -> nn.Module:
        """A copy of the body taking raw inputs: the standardisation folded into its first
        linear layer (``W / std``, ``b - (W / std) @ mean``). The same logits up to float
        rounding, without a pass over the input (prediction over millions of rows). A body
        that does not start with a linear layer: a copy of this module, standardising."""
        import copy
        body = copy.deepcopy(self.body)
        first = body if isinstance(body, nn.Linear) else body[0] if isinstance(body, nn.Sequential) else None
        if not isinstance(first, nn.Linear):
            return copy.deepcopy(self)
        with torch.no_grad():
            w = first.weight / self.std
            first.weight.copy_(w)
            if first.bias is not None:
                first.bias.sub_(w @ self.mean)
        return body


def build_head_module(cfg: HeadConfig, dim: int, n_classes: int, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None) -> HeadModule:
    """A fresh head for ``dim`` inputs and ``n_classes`` outputs (identity standardisation by default)."""
    if cfg.kind == "linear":
        body: nn.Module = nn.Linear(dim, n_classes)
    else:
        body = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                             nn.Linear(cfg.hidden, n_classes))
    mean = torch.zeros(dim) if mean is None else mean
    std = torch.ones(dim) if std is None else std
    return HeadModule(body, mean, std)

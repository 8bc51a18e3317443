"""What the in-RAM and the streamed fit share: early stopping on the validation loss and how
many torch threads a training step deserves."""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator

import torch

from ._optim import AdamW, lr_factor
from .models import HeadConfig, HeadModule, build_head_module

__all__ = ["EarlyStopping", "start_fit", "step_threads", "torch_threads", "MIN_DELTA", "SMALL_STEP"]

MIN_DELTA = 1e-4          # validation loss must improve by this much to reset patience
SMALL_STEP = 10_000_000   # multiply-adds per step below which one thread beats several


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (None: unchanged), restoring the previous count.
    Small steps spend more time synchronising threads than computing: on a busy machine two
    threads can be ~40x slower than one for a 2000 x 32 problem."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class EarlyStopping:
    """Best-validation-loss bookkeeping shared by the in-RAM and the streamed fit: the losses of
    each epoch, the weights of the best one (restored at the end) and when patience runs out."""

    def __init__(self, body: torch.nn.Module, cfg: HeadConfig) -> None:
        self.body, self.cfg = body, cfg
        self.best = (math.inf, -1, copy.deepcopy(body.state_dict()))
        self.train_loss: list[float] = []
        self.valid_loss: list[float] = []
        self.epoch = 0

    def stop(self, epoch: int, valid_loss: float) -> bool:
        """Record ``valid_loss`` of ``epoch``; True when training should stop."""
        self.valid_loss.append(valid_loss)
        if valid_loss < self.best[0] - MIN_DELTA:
            self.best = (valid_loss, epoch, copy.deepcopy(self.body.state_dict()))
            return False
        return epoch - self.best[1] >= self.cfg.patience

    def restore(self) -> None:
        if self.best[1] >= 0:
            self.body.load_state_dict(self.best[2])

    def history(self) -> dict[str, Any]:
        e, b = self.epoch, self.best[1]
        return {"epochs_run": e + 1, "best_epoch": b + 1 if b >= 0 else e + 1,
                "stopped_early": e + 1 < self.cfg.epochs, "train_loss": self.train_loss,
                "valid_loss": self.valid_loss}


def step_threads(cfg: HeadConfig, n: int, dim: int, n_classes: int, threads: int | None) -> int | None:
    """One torch thread when a training step is too small to gain from more."""
    width = cfg.hidden if cfg.kind == "mlp" else n_classes
    if threads is None and cfg.batch_rows(n) * dim * width < SMALL_STEP:
        return 1
    return threads


def start_fit(cfg: HeadConfig, n: int, dim: int, n_classes: int, mean: torch.Tensor | None,
              std: torch.Tensor | None, seed: int) -> tuple[HeadModule, AdamW, Callable[[int], float]]:
    """Seed torch, build the head and its optimiser and learning-rate schedule over all the
    fit's steps; both fits start here (inside their forked RNG)."""
    torch.manual_seed(seed)
    module = build_head_module(cfg, dim, n_classes, mean, std)
    opt = AdamW(module.body.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return module, opt, lr_factor(cfg.schedule, cfg.epochs * math.ceil(n / cfg.batch_rows(n)))

"""AdamW for heads, without ``torch.optim``.

The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, amsgrad off);
tests check the two agree step for step. It exists because constructing any ``torch.optim``
optimizer imports ``torch._dynamo`` (~900 modules, ~3 s), which would dominate a CLI call that
trains a head in well under a second.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["AdamW", "lr_factor"]


class AdamW:
    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr_scale: float = 1.0) -> None:
        """One update at learning rate ``lr * lr_scale``."""
        self.steps += 1
        lr = self.lr * lr_scale
        b1, b2 = self.betas
        step_size = lr / (1 - b1 ** self.steps)
        bc2_sqrt = math.sqrt(1 - b2 ** self.steps)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            g = p.grad
            p.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


def lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: 1 (constant) or a half cosine down to 0 at the end."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

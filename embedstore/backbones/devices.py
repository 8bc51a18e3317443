"""What ``--devices`` means: a list of torch devices, one process each, checked up front.

    >>> parse_devices("cpu,cpu", cuda_count=0)
    ['cpu', 'cpu']
    >>> parse_devices("all", cuda_count=2)
    ['cuda:0', 'cuda:1']

Pure but for the GPU count, which is asked of torch only when the spec names CUDA (pass
``cuda_count`` to decide without torch). Every refusal is a one-line ConfigError naming the
flag and the value, raised before any process starts or any file is written.
"""
from __future__ import annotations

import re

from ..errors import ConfigError

__all__ = ["parse_devices", "cuda_device_count"]

_DEVICE = re.compile(r"(cpu|mps|cuda)(?::(\d+))?")
_FORMS = "cpu, cuda, cuda:N, mps, a comma list of those (one process each) or all"


def cuda_device_count() -> int:
    """GPUs torch can use here (0 when torch has no CUDA)."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def parse_devices(spec: str, cuda_count: int | None = None, flag: str = "--devices") -> list[str]:
    """``spec`` ("cpu", "cuda:0,cuda:1", "all", "cpu,cpu") -> its devices, one per process.

    ``all`` is every GPU (``["cpu"]`` when there is none); ``cuda:N`` must name a GPU that
    exists; an empty spec, an empty entry or anything else is refused.
    """
    text = spec.strip()
    if text == "all":
        n = cuda_device_count() if cuda_count is None else cuda_count
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    if not text:
        raise ConfigError(f"{flag} {spec!r}: names no device; use {_FORMS}")
    out: list[str] = []
    for entry in (e.strip() for e in text.split(",")):
        m = _DEVICE.fullmatch(entry)
        if not m or (m.group(2) is not None and m.group(1) != "cuda"):
            what = "an empty entry" if not entry else f"{entry!r} is not a device"
            raise ConfigError(f"{flag} {spec!r}: {what}; use {_FORMS}")
        if m.group(1) == "cuda":
            if cuda_count is None:            # asked once, and only when CUDA is named
                cuda_count = cuda_device_count()
            n = cuda_count
            index = int(m.group(2) or 0)
            if index >= n:
                have = f"this machine has {n} GPU(s) (cuda:0..cuda:{n - 1})" if n \
                    else "CUDA is not available here"
                raise ConfigError(f"{flag} {spec!r}: {entry!r} asked for but {have}; "
                                  f"use --devices cpu" + (" or all" if n else ""))
        out.append(entry)
    return out

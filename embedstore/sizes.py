"""Byte sizes as people write and read them (``"8G"`` in, ``"1.5 GB"`` out), and the machine's
memory and cores they are weighed against."""
from __future__ import annotations

import os
import re

from .errors import ConfigError

__all__ = ["parse_size", "format_bytes", "physical_memory", "usable_cores", "rows_per_pass"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def physical_memory() -> int:
    """Bytes of physical memory (8 GiB assumed where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 2


def rows_per_pass(budget: int, dim: int, itemsize: int = 4) -> int:
    """Rows a pass over a set under ``budget`` bytes reads at once: the block read, its float32
    copy and one more working copy fit a quarter of the budget."""
    return max(1, budget // (4 * dim * (itemsize + 8)))


def parse_size(value: str | int | float, what: str = "memory budget") -> int:
    """``"8G"``, ``"512M"``, ``"1.5GB"``, ``"800KiB"`` or a positive byte count -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{what} must be positive, got {value!r}; e.g. 8G")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(value).upper())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"cannot read {what} {value!r}; use a size like 8G, 512M or 1.5G")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    """1536 -> ``"1.5 KB"`` (binary multiples; whole bytes below 1 KB)."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TB"

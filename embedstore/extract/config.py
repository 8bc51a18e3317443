"""What an extraction run is asked to do (``ExtractConfig``) and what it reports (``ExtractResult``),
with the defaults that depend on the machine (cores, DataLoader workers)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..sizes import usable_cores
from .sources import control_char

__all__ = ["ExtractConfig", "ExtractResult", "usable_cores", "default_workers",
           "model_leaves_a_core", "STAGES"]

# the stages timed per run, in the order the summary prints them
STAGES = ("plan", "read+decode", "wait", "transfer", "forward", "write")


@dataclass(frozen=True)
class ExtractConfig:
    store: Path                       # the store directory (created when missing)
    backbone: str                     # registry name, timm name, hf-hub: id or .onnx path
    weights: str | None = None        # weights file (safetensors / torch / onnx)
    random_init: bool = False         # explicit: seeded untrained weights
    target_mpp: float | None = None   # µm/px tiles are cut at (default: backbone native, else 0.5)
    slide_mpp: float | None = None    # µm/px of slides whose metadata lacks it
    tile_size: int | None = None      # tile side in px (slides: 224; files: their own size)
    views: int | None = None          # K augmented views per tile (None: the store's recipe)
    view_seed: int = 0                # seed of the view recipe
    batch_size: int = 64              # tiles per forward pass
    num_workers: int | None = None    # DataLoader workers per process (None: default_workers)
    precision: str | None = None      # fp32 | bf16 | fp16 (None: backbone default)
    dtype: str = "float16"            # on-disk embedding dtype
    task: str | None = None           # name of the labels task (default: the source's name)
    devices: str = "cpu"              # "cpu", "cuda:0,cuda:1", "all", "cpu,cpu" (processes)
    compile: bool = False             # torch.compile the model
    min_tissue: float = 0.25          # tissue fraction a slide tile needs
    rows_per_shard: int = 65536       # rows per committed shard
    progress: bool = True             # tqdm bar
    num_threads: int | None = None    # intra-op threads per process (torch / onnxruntime)
    files_per_unit: int = 256         # files per work unit (the resume granularity)
    decode_ahead: bool | None = None  # 0 workers: decode the next batches in a thread while the
                                      # model runs (None: on)

    def __post_init__(self) -> None:
        """Refuse a value out of range before anything is written: one line naming the flag."""
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--rows-per-shard", self.rows_per_shard, 1)
        _at_least("--files-per-unit", self.files_per_unit, 1)
        for flag, value, low in (("--views", self.views, 1), ("--tile-size", self.tile_size, 1),
                                 ("--threads", self.num_threads, 1), ("--workers", self.num_workers, 0)):
            if value is not None:
                _at_least(flag, value, low)
        for flag, mpp in (("--target-mpp", self.target_mpp), ("--slide-mpp", self.slide_mpp)):
            if mpp is not None and not (_real(mpp) and mpp > 0):
                raise ConfigError(f"{flag} must be > 0 (µm/px), got {mpp!r}")
        if not (_real(self.min_tissue) and 0.0 <= self.min_tissue <= 1.0):
            raise ConfigError(f"--min-tissue must be a fraction in [0, 1], got {self.min_tissue!r}")
        if self.task is not None and (not self.task or control_char(self.task)):
            raise ConfigError(f"--task must be a non-empty name without control characters, got {self.task!r}")
        if self.weights is not None and self.random_init:
            raise ConfigError("--weights and --random-init exclude each other: give one")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.decode_ahead is not None and not isinstance(self.decode_ahead, bool):
            raise ConfigError(f"decode_ahead must be True, False or None, got {self.decode_ahead!r}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")


def _real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(flag: str, value: object, low: int) -> None:
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= low):
        raise ConfigError(f"{flag} must be >= {low}, got {value!r}")


def default_workers(device: str) -> int:
    """DataLoader workers when not given: cores - 1 (at most 8), except a model on a CPU with
    at most 2 cores, which decodes in its own process: there a decode process only takes turns
    with the model's threads (measured on 2 cores, benchmarks/bench_extract.py: workers=0 was
    faster and closer to the model alone than 1 worker in every case, tiles and slides)."""
    cores = usable_cores()
    if device.startswith("cpu") and cores <= 2:
        return 0
    return max(0, min(8, cores - 1))


def model_leaves_a_core(device: str, threads: int) -> bool:
    """Whether the model leaves a core idle: it runs on a GPU, or with fewer intra-op
    ``threads`` than this process has cores. Where it does not, the helper threads of a run
    (decoding ahead, planning ahead) run at the lowest priority (``SCHED_IDLE``), on the
    cycles the model leaves: 4 slides of 40,000 x 30,000 px, 2 cores, the ONNX model on both,
    decoding ahead, end to end against the model alone: 0.82x with helpers at nice 19, 0.87x
    at ``SCHED_IDLE``; 0.84x with decoding in the model's thread (bench_bigslide, 2026-12-04,
    two rounds each)."""
    return not device.startswith("cpu") or threads < usable_cores()


@dataclass
class ExtractResult:
    tiles_written: int = 0
    tiles_skipped: int = 0            # already in the store
    views_added: int = 0              # tiles of earlier runs given their views
    units_done: int = 0
    units_skipped: int = 0            # done in an earlier run
    units_left: int = 0               # claimed by (or finished by) another running extract
    tiles_discarded: int = 0          # embedded, then dropped at commit: another run committed them
    errors: list[tuple[str, str]] = field(default_factory=list)
    conflicting_keys: list[str] = field(default_factory=list)   # keys holding another file's row
    stages: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    overlays: list[str] = field(default_factory=list)
    store: str = ""

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_written / self.elapsed if self.elapsed else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def merge(self, other: "ExtractResult") -> None:
        self.tiles_written += other.tiles_written
        self.tiles_skipped += other.tiles_skipped
        self.views_added += other.views_added
        self.units_done += other.units_done
        self.units_left += other.units_left
        self.tiles_discarded += other.tiles_discarded
        self.errors += other.errors
        self.conflicting_keys += other.conflicting_keys
        self.overlays += other.overlays
        for k, v in other.stages.items():
            self.stages[k] = self.stages.get(k, 0.0) + v

    def summary(self) -> str:
        st = self.stages
        lines = [
            f"extracted into {self.store}: {self.tiles_written:,} tiles written, "
            f"{self.tiles_skipped:,} already present, "
            + (f"{self.views_added:,} given views, " if self.views_added else "")
            + f"{self.units_done} units done "
            f"({self.units_skipped} done before), {len(self.errors)} error(s)",
        ]
        if self.units_left or self.tiles_discarded:
            lines.append(f"{self.units_left} unit(s) left to another running extract"
                         + (f", {self.tiles_discarded:,} tiles discarded at commit (another run "
                            "committed them first)" if self.tiles_discarded else ""))
        lines += [
            f"time {self.elapsed:.1f} s, {self.tiles_per_s:.1f} tiles/s",
            "stages (s): " + ", ".join(f"{k} {st.get(k, 0.0):.1f}" for k in STAGES),
        ]
        if "read+decode" in st:
            lines.append("  (read+decode is summed over DataLoader workers; wait is the time the "
                         "model waited for input)")
        for unit, reason in self.errors[:10]:
            lines.append(f"  error {unit}: {reason}")
        if len(self.errors) > 10:
            lines.append(f"  ... {len(self.errors) - 10} more (embedstore errors STORE)")
        return "\n".join(lines)

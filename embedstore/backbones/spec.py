"""`BackboneSpec`: everything that fixes one embedding space, in one frozen record.

A spec names the model (architecture, hub id or file), how tiles are turned into its input
(size, crop, interpolation, mean/std), how its output is pooled into one vector per tile, the
vector's dimension and the inference precision. `to_dict()` is what a store writes under
"backbone" in STORE.json; two stores share an embedding space only if these dicts are equal.

Order of precedence for every field: CLI flag > store metadata > registry default.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from ..errors import BackboneError

__all__ = [
    "BackboneSpec", "frozen_kwargs", "KINDS", "POOLINGS", "PRECISIONS", "INTERPOLATIONS",
    "IMAGENET_MEAN", "IMAGENET_STD",
]

KINDS = ("timm", "onnx", "transformers", "titan")
POOLINGS = ("model", "cls", "cls_mean")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
INTERPOLATIONS = ("bilinear", "bicubic")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def frozen_kwargs(**kwargs: Any) -> str:
    """Constructor keyword arguments as canonical JSON text (sorted keys), hashable and
    ready for STORE.json. Values must be JSON types; classes are named by string
    (e.g. ``mlp_layer="SwiGLUPacked"``, ``act_layer="silu"``) and resolved at load time."""
    return _canonical_json(kwargs)


def _canonical_json(obj: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BackboneError(f"backbone kwargs must be JSON values (name classes by string): {exc}") from None


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """One backbone and its preprocessing. Hashable; `to_dict()`/`from_dict()` round-trip."""

    name: str                          # registry key, e.g. "uni2-h", "resnet18"
    kind: str                          # what builds it: one of KINDS
    model_id: str                      # timm architecture, transformers hub id or ONNX file
    hub_id: str | None = None          # Hugging Face repo of the weights (None: a file only)
    kwargs: str = "{}"                 # constructor kwargs, JSON text (a dict/pairs get frozen)
    pooling: str = "model"             # "model" output, "cls" token, "cls_mean": cls ++ patch mean
    input_size: int = 224              # side of the square network input, pixels
    crop_pct: float = 1.0              # <1: resize to input_size/crop_pct, centre-crop input_size
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB mean on the [0, 1] scale
    std: tuple[float, float, float] = IMAGENET_STD    # RGB std on the [0, 1] scale
    interpolation: str = "bicubic"     # antialiased resize filter: "bilinear" or "bicubic"
    dim: int = 0                       # embedding dimension of one tile
    precision: str = "fp32"            # fp32; fp16/bf16 (autocast); int8 (quantised ONNX graph)
    native_mpp: float | None = None    # um/px the model was trained at (0.5 = 20x); None: not H&E
    loader_note: str = ""              # what loads it where plain timm cannot; licence caveats

    def __post_init__(self) -> None:
        if isinstance(self.kwargs, Mapping):  # accept a dict, store it frozen
            object.__setattr__(self, "kwargs", _canonical_json(self.kwargs))
        elif isinstance(self.kwargs, (tuple, list)):  # or (key, value) pairs
            object.__setattr__(self, "kwargs", _canonical_json(dict(self.kwargs)))
        else:
            try:
                parsed = json.loads(self.kwargs)
            except ValueError as exc:
                raise BackboneError(f"backbone {self.name!r}: kwargs {self.kwargs!r} is not JSON "
                                    f"({exc})") from None
            if not isinstance(parsed, dict):
                raise BackboneError(f"backbone {self.name!r}: kwargs must be a JSON object, got {self.kwargs!r}")
            object.__setattr__(self, "kwargs", _canonical_json(parsed))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "dim", int(self.dim))
        if self.native_mpp is not None:
            object.__setattr__(self, "native_mpp", float(self.native_mpp))
        self._check()

    def _check(self) -> None:
        def bad(field: str, value: object, allowed: str) -> BackboneError:
            return BackboneError(f"backbone {self.name!r}: {field}={value!r} is invalid; use {allowed}")

        if not self.name or self.name != self.name.strip():
            raise bad("name", self.name, "a non-empty name without surrounding spaces")
        if self.kind not in KINDS:
            raise bad("kind", self.kind, " | ".join(KINDS))
        if self.pooling not in POOLINGS:
            raise bad("pooling", self.pooling, " | ".join(POOLINGS))
        if self.interpolation not in INTERPOLATIONS:
            raise bad("interpolation", self.interpolation, " | ".join(INTERPOLATIONS))
        if self.precision not in PRECISIONS:
            raise bad("precision", self.precision, " | ".join(PRECISIONS))
        if self.input_size <= 0:
            raise bad("input_size", self.input_size, "a positive number of pixels")
        if not 0.0 < self.crop_pct <= 1.0:
            raise bad("crop_pct", self.crop_pct, "a fraction in (0, 1]")
        if self.dim <= 0:
            raise bad("dim", self.dim, "the positive embedding dimension")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise bad("mean/std", (self.mean, self.std), "three RGB values each, std > 0")
        if self.native_mpp is not None and not (math.isfinite(self.native_mpp) and self.native_mpp > 0):
            raise bad("native_mpp", self.native_mpp, "micrometres per pixel > 0, or None")

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """The constructor kwargs as a fresh dict."""
        out: dict[str, Any] = json.loads(self.kwargs)
        return out

    def replace(self, **changes: Any) -> BackboneSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples; kwargs as a dict): equal after a JSON round trip."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        out["kwargs"] = self.model_kwargs
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of `to_dict` (unknown keys are an error: they mean a newer format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BackboneError(f"backbone spec has unknown fields {unknown}; written by a newer embedstore?")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in data]
        if required:
            raise BackboneError(f"backbone spec {dict(data).get('name', '?')!r} lacks the fields "
                                f"{required}; it was not written by embedstore's BackboneSpec.to_dict()")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

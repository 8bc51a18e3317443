"""Checking a head directory's ``head.json`` and weights before anything is built from them.

A head directory may come from anywhere (a colleague, a download, an edit by hand), so nothing
in ``head.json`` is trusted: every field is checked for type and range, and the tensor shapes
the weights file declares (read from its header only) are compared with the shapes the
configuration implies, all before a module is allocated. Each refusal is one ``HeadError`` line
naming the head directory and the field.
"""
from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..errors import HeadError
from .augment import AugmentConfig
from .models import HeadConfig, build_head_module

__all__ = ["MAX_DIM", "MAX_HIDDEN", "MAX_CLASSES", "checked_meta", "checked_config", "check_weight_shapes",
           "read_weights"]

MAX_DIM = 65536        # widest embedding a head is built for (real backbones: 384 to 2560)
MAX_HIDDEN = 65536     # widest MLP hidden layer a head is built with
MAX_CLASSES = 65536    # most classes a head is built for

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}
_SAY = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _fail(where: Path, field: str, problem: str) -> HeadError:
    return HeadError(f"head {str(where)!r}: head.json field {field!r} {problem}; the head is damaged "
                     f"or was edited; retrain it with train-head --out DIR")


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _is(value: Any, kind: type) -> bool:
    """JSON-typed check: bools are not numbers, integers are floats too, floats are finite."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _int_field(where: Path, meta: dict[str, Any], name: str, low: int, high: int) -> int:
    v = meta.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise _fail(where, name, f"must be an integer in [{low}, {high}], got {_show(v)}")
    return v


def _typed_fields(where: Path, values: dict[str, Any], cls: type, prefix: str) -> None:
    """Each known field of dataclass ``cls`` present in ``values`` has its annotated JSON type
    (annotations read as ``"float | None"`` strings)."""
    for f in fields(cls):
        if f.name not in values or f.name == "augment":
            continue
        kinds = [_TYPES[t.strip()] for t in str(f.type).split("|") if t.strip() in _TYPES]
        if kinds and not any(_is(values[f.name], k) for k in kinds):
            names = " or ".join(_SAY[k] for k in kinds)
            raise _fail(where, f"{prefix}{f.name}", f"must be {names}, got {_show(values[f.name])}")


def checked_config(where: Path, raw: Any) -> HeadConfig:
    """``head.json``'s ``config`` as a HeadConfig, every field type- and range-checked."""
    if not isinstance(raw, dict):
        raise _fail(where, "config", f"must be an object, got {_show(raw)}")
    _typed_fields(where, raw, HeadConfig, "config.")
    hidden = raw.get("hidden", 1)
    if not 1 <= hidden <= MAX_HIDDEN:
        raise _fail(where, "config.hidden", f"must be in [1, {MAX_HIDDEN}], got {_show(hidden)}")
    aug = raw.get("augment", {})
    if not isinstance(aug, dict):
        raise _fail(where, "config.augment", f"must be an object, got {_show(aug)}")
    unknown = sorted(set(aug) - {f.name for f in fields(AugmentConfig)})
    if unknown:
        raise _fail(where, f"config.augment.{unknown[0]}", "is not an augmentation setting")
    _typed_fields(where, aug, AugmentConfig, "config.augment.")
    try:
        return HeadConfig.from_dict(raw)
    except HeadError as e:                  # a range HeadConfig itself refuses; the message names it
        raise HeadError(f"head {str(where)!r}: head.json field 'config' is out of range: {e}; the head is "
                        f"damaged or was edited") from None


def checked_meta(where: Path, meta: dict[str, Any]) -> tuple[int, list[str], int | None, float | None]:
    """``(dim, classes, positive index, threshold)`` from ``head.json``, each checked."""
    dim = _int_field(where, meta, "dim", 1, MAX_DIM)
    classes = meta.get("classes")
    if (not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) for c in classes)):
        raise _fail(where, "classes", f"must be a list of 2 to {MAX_CLASSES} class names, got {_show(classes)}")
    if len(set(classes)) != len(classes):
        raise _fail(where, "classes", f"names a class twice: {_show(classes)}")
    positive = meta.get("positive")
    if positive is not None and (len(classes) != 2 or positive not in classes):
        raise _fail(where, "positive", f"must be null or, for a binary head, one of {_show(classes)}; "
                                        f"got {_show(positive)}")
    threshold = meta.get("threshold")
    if threshold is not None and (not _is(threshold, float) or not 0 <= threshold <= 1):
        raise _fail(where, "threshold", f"must be null or a number in [0, 1], got {_show(threshold)}")
    for name in ("history", "metrics", "fingerprint"):
        if meta.get(name) is not None and not isinstance(meta[name], dict):
            raise _fail(where, name, f"must be an object or null, got {_show(meta[name])}")
    return dim, classes, (classes.index(positive) if positive is not None else None), (
        float(threshold) if threshold is not None else None)


def expected_shapes(cfg: HeadConfig, dim: int, n_classes: int) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes a head of this configuration has (built on the meta device: no memory)."""
    with torch.device("meta"):
        module = build_head_module(cfg, dim, n_classes)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def read_weights(where: Path, weights: Path, raw: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file read as ``raw``; HeadError for a damaged one."""
    from safetensors.torch import load
    try:
        return load(raw)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise HeadError(f"head {str(where)!r}: {weights.name} is not a readable safetensors file "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def check_weight_shapes(where: Path, weights: Path, tensors: dict[str, torch.Tensor], cfg: HeadConfig,
                        dim: int, n_classes: int) -> None:
    """HeadError unless ``tensors`` (read from ``weights``) are exactly those ``cfg`` implies."""
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    want = expected_shapes(cfg, dim, n_classes)
    implied = (f"head.json (kind {cfg.kind!r}, dim {dim}, {n_classes} classes"
               f"{f', hidden {cfg.hidden}' if cfg.kind == 'mlp' else ''})")
    for name, shape in want.items():
        if found.get(name) != shape:
            has = "is missing" if name not in found else f"has shape {found[name]}"
            raise HeadError(f"head {str(where)!r}: {weights.name} does not match head.json: tensor "
                            f"{name!r} {has} but {implied} implies {shape}")
    extra = sorted(set(found) - set(want))
    if extra:
        raise HeadError(f"head {str(where)!r}: {weights.name} does not match head.json: it holds tensor "
                        f"{extra[0]!r} {found[extra[0]]}, which {implied} has no place for")

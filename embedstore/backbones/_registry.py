"""The registry: a name -> `BackboneSpec` table with a fixed verb set.

`get_spec` resolves, in order: a registered name (case-insensitive), or an alias of one
(`ALIASES`: TRIDENT's encoder names such as ``uni_v1``, ``conch_v15``); an ``hf-hub:ORG/MODEL``
id (a registered entry with that hub id, else the timm ``config.json`` in the local Hugging Face
cache); a path to an ``.onnx`` file; a timm architecture name, optionally with a pretrained tag
(``resnet18``, ``resnet50.tv_in1k``). Anything else is an `UnknownBackboneError` that lists
close matches.
"""
from __future__ import annotations

import difflib
import functools
import fnmatch
import json
from pathlib import Path
from typing import Any

from ..errors import ArgumentTypeError, BackboneError, UnknownBackboneError, WeightsNotFoundError
from .builtin import ALIASES, BUILTIN_SPECS
from .spec import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, BackboneSpec, frozen_kwargs

__all__ = ["register_backbone", "list_backbones", "get_spec", "registered_spec", "ALIASES"]

_REGISTRY: dict[str, BackboneSpec] = {}
HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def register_backbone(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Add `spec` under ``spec.name`` (case-insensitive). Registering the same spec twice is
    a no-op; a different spec under a taken name needs ``overwrite=True``."""
    if not isinstance(spec, BackboneSpec):
        raise ArgumentTypeError(f"register_backbone takes a BackboneSpec, got {type(spec).__name__}")
    key = spec.name.lower()
    old = _REGISTRY.get(key)
    if old is not None and old != spec and not overwrite:
        raise BackboneError(f"backbone {spec.name!r} is already registered with another spec; "
                            "pass overwrite=True to replace it")
    _REGISTRY[key] = spec
    return spec


def list_backbones(pattern: str | None = None) -> list[str]:
    """Sorted registered names, filtered by a shell-style `pattern` (case-insensitive).
    Any timm architecture (``timm.list_models()``) is accepted by name as well."""
    names = sorted(spec.name for spec in _REGISTRY.values())
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower())]


def get_spec(name: str) -> BackboneSpec:
    """The spec `name` resolves to (see the module docstring for the order)."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownBackboneError(f"backbone name must be a non-empty string, got {name!r}")
    name = name.strip()
    spec = registered_spec(name)
    if spec is not None:
        return spec
    if name.startswith(HUB_PREFIXES):
        return _hub_spec(name)
    if name.lower().endswith(".onnx"):
        return _onnx_file_spec(name)
    timm_spec = _timm_spec(name)
    if timm_spec is not None:
        return timm_spec
    raise UnknownBackboneError(_unknown_message(name))


def registered_spec(name: str) -> BackboneSpec | None:
    """The registered spec named `name` or by one of its aliases (case-insensitive), else None:
    no timm, hub or file look-up (what importing another tool's features by encoder name needs)."""
    key = name.strip().lower()
    spec = _REGISTRY.get(key)
    if spec is None and key in ALIASES:
        spec = _REGISTRY.get(ALIASES[key].lower())
    return spec


def _unknown_message(name: str) -> str:
    candidates = [spec.name for spec in _REGISTRY.values()]
    try:
        import timm

        candidates += timm.list_models()
    except ImportError:  # pragma: no cover - timm is a hard dependency
        pass
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = ", ".join(by_lower[c] for c in close) if close else "none"
    return (f"unknown backbone {name!r}; close matches: {hint}; registered names: "
            "list_backbones(), timm architectures: timm.list_models()")


def _hub_spec(name: str) -> BackboneSpec:
    hub_id = name.split(":", 1)[1].strip("/")
    for spec in _REGISTRY.values():
        if spec.hub_id is not None and spec.hub_id.lower() == hub_id.lower():
            return spec
    from ._weights import find_in_hf_cache, missing_weights_message

    config_path = find_in_hf_cache(hub_id, ("config.json",))
    if config_path is None:
        raise WeightsNotFoundError(missing_weights_message(name, hub_id, ("config.json",)))
    config = json.loads(Path(config_path).read_text())
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise UnknownBackboneError(f"{name}: cached config.json has no timm 'architecture' "
                                   "(not a timm model; register a spec with the right kind)")
    cfg = config.get("pretrained_cfg", {})
    kwargs: dict[str, Any] = dict(config.get("model_args", {}))
    kwargs["num_classes"] = 0
    return _with_dim(BackboneSpec(
        name=name, kind="timm", model_id=arch, hub_id=hub_id, kwargs=frozen_kwargs(**kwargs),
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=_rgb(cfg.get("mean", IMAGENET_MEAN)), std=_rgb(cfg.get("std", IMAGENET_STD)),
        interpolation=_interp(cfg.get("interpolation")), dim=1,
        loader_note=f"timm model from the cached Hugging Face repo {hub_id}",
    ))


@functools.lru_cache(maxsize=256)
def _timm_spec(name: str) -> BackboneSpec | None:
    """Spec of a timm architecture (tag optional): timm's transform, dim measured on meta."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not timm.is_model(name):
        return None
    arch, _tag = split_model_name_tag(name)
    cfg = get_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else None
    size = cfg.input_size[-1] if cfg is not None else 224
    return _with_dim(BackboneSpec(
        name=name, kind="timm", model_id=arch, hub_id=hub_id, kwargs=frozen_kwargs(num_classes=0),
        input_size=size,
        mean=_rgb(cfg.mean) if cfg is not None else IMAGENET_MEAN,
        std=_rgb(cfg.std) if cfg is not None else IMAGENET_STD,
        interpolation=_interp(cfg.interpolation if cfg is not None else None), dim=1,
        precision="fp32", native_mpp=None,
        loader_note=f"timm architecture {arch}; tiles are resized, not cropped",
    ))


def _with_dim(spec: BackboneSpec) -> BackboneSpec:
    """Measure the output dim by building the model on the meta device (no memory)."""
    from ._load import build_module

    import torch

    module = build_module(spec, device="meta")
    out = module(torch.empty(1, 3, spec.input_size, spec.input_size, device="meta"))
    return spec.replace(dim=int(out.shape[-1]))


def _rgb(values: Any) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return (r, g, b)


def _interp(value: object) -> str:
    return value if isinstance(value, str) and value in INTERPOLATIONS else "bicubic"


def _onnx_file_spec(name: str) -> BackboneSpec:
    from .onnx import probe_onnx

    path = Path(name).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"ONNX model {name} not found; pass the path of an existing .onnx file")
    size, dim = probe_onnx(path)
    return BackboneSpec(
        name=path.stem, kind="onnx", model_id=str(path), input_size=size, interpolation="bilinear",
        dim=dim, precision="fp32",
        loader_note="ONNX file; ImageNet mean/std and 224 px assumed: register a spec if it differs",
    )


for _spec in BUILTIN_SPECS:
    register_backbone(_spec)

"""Backbone registry: timm names, ``hf-hub:`` ids, local checkpoints and ONNX models, each
with its transform, output dim and inference precision fixed in one `BackboneSpec`.

    >>> spec = get_spec("uni2-h")                      # no torch import, no weights needed
    >>> bb = create_backbone("resnet18", random_init=True)
    >>> emb = bb.embed(tiles)                          # (n, H, W, 3) uint8 -> (n, 512) float32

Importing this package is cheap; torch, timm and onnxruntime load on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._registry import get_spec, list_backbones, register_backbone
from .spec import BackboneSpec, frozen_kwargs

if TYPE_CHECKING:
    from ._load import build_module, create_backbone
    from .backbone import Backbone, TorchBackbone
    from .images import image_embedder
    from .onnx import OnnxBackbone

__all__ = [
    "BackboneSpec", "frozen_kwargs", "register_backbone", "list_backbones", "get_spec",
    "create_backbone", "build_module", "Backbone", "TorchBackbone", "OnnxBackbone",
    "image_embedder",
]

_LAZY = {
    "create_backbone": "._load", "build_module": "._load",
    "Backbone": ".backbone", "TorchBackbone": ".backbone", "OnnxBackbone": ".onnx",
    "image_embedder": ".images",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

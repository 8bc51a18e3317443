"""`create_backbone`: spec -> module -> weights -> `Backbone`.

Weights come from, in order: ``weights=FILE``; the local Hugging Face cache for the spec's hub
id; the torch hub cache (timm weights published only by URL). Missing weights are a
`WeightsNotFoundError` unless ``random_init=True`` asks for seeded untrained weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from ..errors import (BackboneError, BackboneMismatchError, ConfigError, MissingDependencyError,
                      WeightsNotFoundError)
from ._registry import get_spec
from ._weights import (
    WEIGHT_FILES, file_sha256, find_in_hf_cache, hf_cache_dir, find_in_torch_hub_cache,
    missing_weights_message, read_state_dict,
)
from .backbone import RANDOM_INIT_SEED, Backbone, TorchBackbone
from .spec import BackboneSpec

__all__ = ["create_backbone", "build_module"]


def create_backbone(name: str | BackboneSpec, *, weights: str | os.PathLike[str] | None = None,
                    random_init: bool = False, device: str | torch.device = "cpu",
                    precision: str | None = None, compile: bool = False,
                    num_threads: int | None = None) -> Backbone:
    """Load a backbone by registry name, ``hf-hub:`` id, timm name, ``.onnx`` path or spec.

    `precision` defaults to the spec's on CUDA and to fp32 elsewhere (bf16/fp16 on CPU only
    when asked, or when `name` is a spec, which is taken as is); the returned
    ``backbone.spec.precision`` is the one used, so it is part of the fingerprint.
    `num_threads` sets onnxruntime's intra-op threads. ``device="meta"`` with ``random_init=True`` builds the
    module without memory (for checking shapes of billion-parameter models).
    """
    spec = name if isinstance(name, BackboneSpec) else get_spec(name)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N "
                          "(CLI --devices cpu | cuda:0,cuda:1 | all)") from None
    if weights is not None and random_init:
        raise ConfigError("pass either weights=FILE or random_init=True, not both")
    if spec.kind == "onnx":
        from .onnx import OnnxBackbone

        if precision not in (None, spec.precision):
            raise ConfigError(f"ONNX backbone {spec.name!r} runs its graph's own precision "
                              f"({spec.precision}); precision={precision!r} cannot be applied")
        if random_init:
            raise ConfigError(f"ONNX backbone {spec.name!r} has no random initialisation; drop random_init")
        return OnnxBackbone(spec, weights=weights, device=dev, num_threads=num_threads)

    explicit = isinstance(name, BackboneSpec)  # e.g. read back from a store: taken as is
    used = precision or (spec.precision if explicit or dev.type == "cuda" else "fp32")
    spec = spec.replace(precision=used)
    if dev.type == "meta":
        if not random_init:
            raise ConfigError("device='meta' builds shapes only; pass random_init=True")
        return TorchBackbone(spec, build_module(spec, device="meta"), "meta:no-weights", dev)
    if random_init:
        module = _seeded_module(spec, RANDOM_INIT_SEED)
        return TorchBackbone(spec, module, f"random-init:seed={RANDOM_INIT_SEED}", dev, compile)
    if spec.kind in ("transformers", "titan") and weights is None:
        module, path = _load_hub_module(spec)
        return TorchBackbone(spec, module, file_sha256(path), dev, compile)
    path = Path(weights) if weights is not None else _find_weights(spec)
    state = read_state_dict(path)
    module = _empty_module(spec)
    load_weights(module, state, spec)
    return TorchBackbone(spec, module, file_sha256(path), dev, compile)


def _empty_module(spec: BackboneSpec) -> Embedder:
    """A CPU module to load weights into, without paying for a random init when every buffer
    is persistent (all of its tensors then come from the checkpoint, which is checked)."""
    module = build_module(spec, device="meta")
    saved = set(module.state_dict())
    if all(name in saved for name, _ in module.named_buffers()):
        return module.to_empty(device="cpu")
    return _seeded_module(spec, RANDOM_INIT_SEED)


def _seeded_module(spec: BackboneSpec, seed: int) -> Embedder:
    """Build on the CPU under a fixed seed, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_module(spec, device="cpu")


def _find_weights(spec: BackboneSpec) -> Path:
    if spec.hub_id is not None:
        found = find_in_hf_cache(spec.hub_id, WEIGHT_FILES)
        if found is not None:
            return found
    if spec.kind == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.name) if _is_timm_name(spec.name) else None
        found = find_in_torch_hub_cache(cfg.url if cfg is not None else None)
        if found is not None:
            return found
    raise WeightsNotFoundError(missing_weights_message(spec.name, spec.hub_id))


def _is_timm_name(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


# -- building modules ---------------------------------------------------------------------

class Embedder(nn.Module):
    """Trunk plus pooling: ``x: (n, 3, S, S)`` -> ``(n, dim)``.

    pooling "model": the trunk's own output (timm with ``num_classes=0``: its pooled features);
    "cls": token 0 of ``forward_features``; "cls_mean": token 0 concatenated with the mean of
    the patch tokens (prefix tokens -- class and registers -- excluded).
    """

    def __init__(self, trunk: nn.Module, pooling: str, num_prefix_tokens: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "model":
            return self.trunk(x).flatten(1)
        # torch types a submodule's attributes as Tensor | Module; the trunk's is a method
        forward_features = cast("Callable[[torch.Tensor], torch.Tensor]", self.trunk.forward_features)
        tokens = forward_features(x)  # (n, T, C)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


class _HFTokens(nn.Module):
    """A transformers vision model seen as a trunk whose forward_features are its tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.model(pixel_values=x).last_hidden_state
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


def build_module(spec: BackboneSpec, *, device: str | torch.device = "cpu") -> Embedder:
    """The untrained `Embedder` of `spec` on `device` (``"meta"``: shapes only, no memory)."""
    if spec.kind == "timm":
        import timm

        kwargs = _resolve_timm_kwargs(spec.model_kwargs)
        kwargs.setdefault("num_classes", 0)
        with torch.device(device):
            trunk = timm.create_model(spec.model_id, pretrained=False, **kwargs)
        return Embedder(trunk, spec.pooling, int(getattr(trunk, "num_prefix_tokens", 1)))
    if spec.kind == "transformers":
        transformers = _import_transformers(spec)
        assert spec.hub_id is not None
        config = transformers.AutoConfig.from_pretrained(spec.hub_id, local_files_only=True,
                                                         cache_dir=str(hf_cache_dir()))
        with torch.device(device):
            model = transformers.AutoModel.from_config(config)
        return Embedder(_HFTokens(model), spec.pooling, 1 + int(getattr(config, "num_register_tokens", 0)))
    raise BackboneError(f"backbone {spec.name!r} of kind {spec.kind!r} cannot be built without its "
                        f"weights: {spec.loader_note}")


def _resolve_timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Layer classes are named by string in specs; map the few that are allowed."""
    from timm import layers

    allowed = {"Mlp": layers.Mlp, "GluMlp": layers.GluMlp, "SwiGLU": layers.SwiGLU,
               "SwiGLUPacked": layers.SwiGLUPacked}
    value = kwargs.get("mlp_layer")
    if isinstance(value, str):
        if value not in allowed:
            raise BackboneError(f"mlp_layer={value!r} is not one of {sorted(allowed)}")
        kwargs["mlp_layer"] = allowed[value]
    if isinstance(kwargs.get("act_layer"), str):
        kwargs["act_layer"] = layers.get_act_layer(kwargs["act_layer"])
    return kwargs


def load_weights(module: Embedder, state: dict[str, Any], spec: BackboneSpec) -> None:
    """Load `state` into the trunk; classifier-head keys are dropped, anything else must match."""
    trunk = module.trunk
    own = trunk.state_dict()
    classifier = getattr(trunk, "pretrained_cfg", {}).get("classifier") or ("head", "fc", "classifier")
    heads = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(heads)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise BackboneMismatchError(
            f"weights do not fit backbone {spec.name!r} ({spec.model_id}): missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''}; pass the checkpoint of this architecture")
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise BackboneMismatchError(f"weights do not fit backbone {spec.name!r}: {detail}") from None


def _import_transformers(spec: BackboneSpec) -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(f"backbone {spec.name!r} needs the transformers package "
                                     f"(`pip install transformers`): {spec.loader_note}") from None
    return transformers


def _load_hub_module(spec: BackboneSpec) -> tuple[Embedder, Path]:
    """transformers / TITAN models, from the local cache only."""
    assert spec.hub_id is not None
    path = find_in_hf_cache(spec.hub_id, WEIGHT_FILES)
    config = find_in_hf_cache(spec.hub_id, ("config.json",))
    if path is None or config is None:
        raise WeightsNotFoundError(missing_weights_message(spec.name, spec.hub_id,
                                                           ("config.json", *WEIGHT_FILES)))
    transformers = _import_transformers(spec)
    if spec.kind == "transformers":
        model = transformers.AutoModel.from_pretrained(spec.hub_id, local_files_only=True,
                                                       cache_dir=str(hf_cache_dir()))
        n_prefix = 1 + int(getattr(model.config, "num_register_tokens", 0))
        return Embedder(_HFTokens(model), spec.pooling, n_prefix), path
    titan = transformers.AutoModel.from_pretrained(spec.hub_id, local_files_only=True,
                                                   cache_dir=str(hf_cache_dir()),
                                                   trust_remote_code=True)
    conch, _transform = titan.return_conch()
    return Embedder(conch, "model", 1), path

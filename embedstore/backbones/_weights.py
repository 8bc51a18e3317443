"""Finding and reading weight files, offline only.

The local Hugging Face cache is searched (``HF_HUB_CACHE`` > ``HF_HOME``/hub >
``~/.cache/huggingface/hub``, read at call time); nothing here opens a network connection,
whatever ``HF_HUB_OFFLINE`` says. Torch files are read with ``torch.load(weights_only=True)``:
a checkpoint that needs arbitrary unpickling is refused.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import BackboneError, UnsafeWeightsError, WeightsNotFoundError

__all__ = [
    "WEIGHT_FILES", "hf_cache_dir", "find_in_hf_cache", "find_in_torch_hub_cache",
    "missing_weights_message", "file_sha256", "read_state_dict",
]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache directory, from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def find_in_hf_cache(hub_id: str, filenames: Sequence[str] = WEIGHT_FILES) -> Path | None:
    """Path of the first of `filenames` present in the cached snapshot of `hub_id`, or None."""
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    if not cache.is_dir():
        return None
    for filename in filenames:
        found = try_to_load_from_cache(hub_id, filename, cache_dir=str(cache))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def find_in_torch_hub_cache(url: str | tuple[str, str] | None) -> Path | None:
    """The file torch.hub would have saved `url` to, if it is there. A timm ``(url, filename)``
    pair is saved under its filename."""
    if not url:
        return None
    import torch.hub

    name = url[1] if isinstance(url, tuple) else url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


def missing_weights_message(name: str, hub_id: str | None, filenames: Sequence[str] = WEIGHT_FILES) -> str:
    """One line: which weights are missing and the two ways to provide them."""
    if hub_id is None:
        return (f"weights for backbone {name!r} not found; pass weights=FILE (CLI --weights FILE), "
                "or random_init=True for untrained weights on purpose")
    return (f"weights for backbone {name!r} not found: hub id {hub_id} ({' or '.join(filenames)}) "
            f"is not in the local Hugging Face cache {hf_cache_dir()} (never downloaded here); "
            f"on a connected machine run `huggingface-cli download {hub_id}` and copy "
            "~/.cache/huggingface to this one (or point HF_HUB_CACHE at it), or pass weights=FILE "
            "(CLI --weights FILE); random_init=True builds untrained weights on purpose")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, cached per (path, size, mtime) within the process."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    digest = _SHA_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
        digest = _SHA_CACHE[key] = h.hexdigest()
    return digest


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Tensors of a checkpoint: safetensors, or a torch file read with ``weights_only=True``.
    Common wrappers (``state_dict``, ``model``, ``module``) and ``module.`` prefixes are removed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist; pass the path of a "
                                   ".safetensors, .pt, .pth or .bin checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:   # noqa: BLE001  (safetensors' own error class is not public)
            raise BackboneError(f"refusing {path}: not a readable safetensors file "
                                f"({_first_line(exc)}); save model.state_dict() with "
                                "safetensors.torch.save_file") from None
    else:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeWeightsError(
                f"refusing {path}: it is not a plain tensor checkpoint (torch.load weights_only=True "
                f"failed: {_first_line(exc)}); save model.state_dict() with torch.save or "
                "safetensors") from None
        except (RuntimeError, EOFError, ValueError) as exc:   # truncated or not a torch file
            raise BackboneError(f"refusing {path}: not a readable torch checkpoint "
                                f"({_first_line(exc)}); save model.state_dict() with torch.save "
                                "or safetensors") from None
    return _unwrap(state, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unwrap(state: Any, path: Path) -> dict[str, Any]:
    import torch

    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeWeightsError(f"refusing {path}: expected a mapping of parameter names to "
                                     "tensors (a state dict)")
    out: dict[str, Any] = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out

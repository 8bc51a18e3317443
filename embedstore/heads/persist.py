"""A head on disk: ``head.safetensors`` (weights + standardisation stats) and ``head.json``
(config, label map, positive class, threshold, metrics, the store's fingerprint).

Commit protocol: weights first, ``head.json`` last, each written to a temporary name, fsynced
and renamed, so a directory with a ``head.json`` always has the weights it describes.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file

from ..store.atomic import atomic_path
from ..errors import BackboneMismatchError, HeadError
from .models import HeadConfig, build_head_module
from .train import TrainedHead

__all__ = ["save_head", "load_head", "check_fingerprint", "HEAD_JSON", "HEAD_WEIGHTS"]

HEAD_JSON = "head.json"
HEAD_WEIGHTS = "head.safetensors"
FORMAT = "embedstore-head"
VERSION = 1


def _plain(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _commit(path: Path, write: Callable[[Path], object]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def save_head(head: TrainedHead, directory: str | os.PathLike[str]) -> Path:
    """Write ``head`` to ``directory`` (created if needed); returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.module.state_dict().items()}
    _commit(d / HEAD_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT, "version": VERSION, "dim": head.dim, "classes": head.classes,
        "positive": head.classes[head.positive] if head.positive is not None else None,
        "threshold": head.threshold, "config": head.config.to_dict(), "metrics": head.metrics,
        "history": head.history, "fingerprint": head.fingerprint,
    }
    text = json.dumps(_plain(meta), indent=2, sort_keys=True)
    _commit(d / HEAD_JSON, lambda p: p.write_text(text))
    return d


def load_head(directory: str | os.PathLike[str]) -> TrainedHead:
    """Read a head written by ``save_head``; one-line HeadError for anything else."""
    d = Path(directory)
    if not d.is_dir():
        raise HeadError(f"head directory {str(d)!r} does not exist; train one with train-head --out DIR")
    for name in (HEAD_JSON, HEAD_WEIGHTS):
        if not (d / name).is_file():
            raise HeadError(f"{str(d)!r} is not a head directory: {name} is missing")
    try:
        meta = json.loads((d / HEAD_JSON).read_text())
    except (OSError, ValueError) as e:
        raise HeadError(f"{str(d / HEAD_JSON)!r} is not valid JSON ({e}); the head is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HeadError(f"{str(d / HEAD_JSON)!r} is not an embedstore head (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version", 0) > VERSION:
        raise HeadError(f"head format version {meta['version']} is newer than this embedstore "
                        f"reads ({VERSION}); upgrade embedstore")
    cfg = HeadConfig.from_dict(meta["config"])
    classes = [str(c) for c in meta["classes"]]
    module = build_head_module(cfg, int(meta["dim"]), len(classes))
    try:
        state = load_file(str(d / HEAD_WEIGHTS))
        module.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors raises its own error types
        raise HeadError(f"weights in {str(d / HEAD_WEIGHTS)!r} do not match head.json "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    module.eval()
    positive = classes.index(meta["positive"]) if meta.get("positive") is not None else None
    return TrainedHead(module, cfg, classes, positive, meta.get("threshold"),
                       meta.get("history") or {}, meta.get("metrics") or {}, meta.get("fingerprint"))


def _short(v: Any, width: int = 48) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s if len(s) <= width else s[: width - 3] + "..."


def _canonical(fp: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples become lists), so that a head saved to
    disk and the live store compare equal when they describe the same space."""
    return json.loads(json.dumps(_plain(fp), sort_keys=True, default=str))


def check_fingerprint(head: TrainedHead, fingerprint: dict[str, Any], where: str = "the store") -> None:
    """BackboneMismatchError (one line) unless ``head`` was trained in ``fingerprint``'s space."""
    if head.fingerprint is None:
        raise HeadError("the head records no store fingerprint (trained from arrays); "
                        "bind it with head.fingerprint = store.fingerprint() or skip the check")
    ours, theirs = _canonical(head.fingerprint), _canonical(fingerprint)
    if ours == theirs:
        return
    keys = sorted(set(ours) | set(theirs))
    diff = [k for k in keys if ours.get(k) != theirs.get(k)]
    k = diff[0]
    raise BackboneMismatchError(
        f"head was trained on another embedding space than {where}: {k} is "
        f"{_short(ours.get(k))} in the head but {_short(theirs.get(k))} in the store"
        f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; predict with a store from the "
        f"head's backbone or retrain the head")


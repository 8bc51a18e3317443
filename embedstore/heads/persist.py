"""A head on disk: ``head.safetensors`` (weights + standardisation stats) and ``head.json``
(config, label map, positive class, threshold, metrics, the store's fingerprint, and the
sha256 of the weights it was written with).

Commit protocol: the directory is published as a whole. Both files are written into a fresh
sibling ``.DIR.staging-<host>-<pid>-<rand>``, fsynced, and swapped in with ``publish_dir``; a
crash leaves the old head or the new one, never new weights beside an old ``head.json``.
``load_head`` first undoes a swap interrupted between its two renames (``recover_dir``) and
removes staging directories whose writer is gone. Heads written before ``weights_sha256`` was
recorded (weights renamed in place, then ``head.json``) still load.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..store.atomic import crash_point, publish_dir, recover_dir
from ..errors import BackboneMismatchError, HeadError
from .headfile import check_weight_shapes, checked_config, checked_meta, read_weights
from .models import build_head_module
from .train import TrainedHead

__all__ = ["save_head", "load_head", "check_fingerprint", "check_head_target", "HEAD_JSON", "HEAD_WEIGHTS"]

HEAD_JSON = "head.json"
HEAD_WEIGHTS = "head.safetensors"
FORMAT = "embedstore-head"
VERSION = 1
_HEAD_FILES = {HEAD_JSON, HEAD_WEIGHTS}
_PARTIAL = re.compile(r"^\.head\.(json|safetensors)\..*\.partial\.(json|safetensors)$")  # old writer's temps


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- staging directories

def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _staging_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.staging-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _staging_dirs(final: Path) -> list[tuple[Path, bool]]:
    """``(path, writer alive)`` for each staging sibling of ``final``; a writer on another host
    counts as alive (unknowable from here)."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.staging-([A-Za-z0-9]+)-(\d+)-[0-9a-f]+$")
    out = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return []
    for p in siblings:
        m = pattern.match(p.name)
        if m is None:
            continue
        alive = True
        if m.group(1) == _host_tag():
            try:
                os.kill(int(m.group(2)), 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
        out.append((p, alive))
    return out


def _clean_stale(final: Path) -> None:
    """Remove staging directories left by dead writers (best effort: a read-only folder stays)."""
    for p, alive in _staging_dirs(final):
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def check_head_target(directory: str | os.PathLike[str]) -> Path:
    """The directory a head saved to ``directory`` is published as, resolved (a symlink stays,
    its target is replaced); HeadError unless it is new, empty or holds a head, since the swap
    replaces it whole."""
    d = Path(os.path.realpath(directory))
    if d == Path(d.anchor):
        raise HeadError(f"cannot save a head as the root directory {str(d)!r}; give a directory name")
    if d.exists() and not d.is_dir():
        raise HeadError(f"cannot save a head to {str(d)!r}: it is a file, not a directory")
    if d.is_dir():
        other = sorted(p.name for p in d.iterdir() if p.name not in _HEAD_FILES and not _PARTIAL.match(p.name))
        if other:
            raise HeadError(f"cannot save a head into {str(d)!r}: it holds files that are not part of a "
                            f"head ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}), which "
                            f"replacing the directory would remove; save into a new or empty directory")
    return d


def save_head(head: TrainedHead, directory: str | os.PathLike[str]) -> Path:
    """Write ``head`` to ``directory`` as a whole (created if needed, a previous head replaced);
    returns the directory."""
    d = check_head_target(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(d)                  # a swap cut short leaves the old head aside: put it back first
    _clean_stale(d)
    staged = _staging_name(d)
    staged.mkdir()
    try:
        state = {k: v.detach().contiguous() for k, v in head.module.state_dict().items()}
        save_file(state, str(staged / HEAD_WEIGHTS), metadata={"format": FORMAT})
        crash_point("head.staged_weights")
        meta = {
            "format": FORMAT, "version": VERSION, "dim": head.dim, "classes": head.classes,
            "positive": head.classes[head.positive] if head.positive is not None else None,
            "threshold": head.threshold, "config": head.config.to_dict(), "metrics": head.metrics,
            "history": head.history, "fingerprint": head.fingerprint,
            "weights_sha256": _sha256(staged / HEAD_WEIGHTS), "run": uuid.uuid4().hex,
        }
        (staged / HEAD_JSON).write_text(json.dumps(_plain(meta), indent=2, sort_keys=True))
        crash_point("head.staged")
        publish_dir(staged, d)             # fsyncs the staged files and folder, then swaps
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    crash_point("head.published")
    return Path(directory)


def _source(d: Path) -> Path:
    """The directory to read ``d``'s head from, repairing an interrupted swap on the way.

    ``d`` missing with ``.d.old`` beside it is a swap cut between its two renames: put back
    (``recover_dir``), unless a live writer is mid-swap, whose old head is then read in place."""
    old = d.with_name(f".{d.name}.old")
    if not d.exists() and old.is_dir():
        if any(alive for _, alive in _staging_dirs(d)):
            return old
        try:
            recover_dir(d)
        except OSError:             # a read-only folder: read the old head where it lies
            return old
    stale = _staging_dirs(d)
    if d.is_dir() and old.is_dir() and not any(alive for _, alive in stale):
        shutil.rmtree(old, ignore_errors=True)      # a swap that ended before removing the old head
    for p, alive in stale:
        if not alive:
            shutil.rmtree(p, ignore_errors=True)
    return d


def load_head(directory: str | os.PathLike[str]) -> TrainedHead:
    """Read a head written by ``save_head``; one-line HeadError for anything else, checked
    field by field before a module is built."""
    d = Path(directory)
    try:
        try:
            return _load(d)
        except FileNotFoundError:   # a writer swapped the directory while we read: read again
            return _load(d)
    except OSError as e:
        raise HeadError(f"cannot read head {str(d)!r}: {e.strerror or e} ({e.filename})") from None


def _load(d: Path) -> TrainedHead:
    src = _source(Path(os.path.realpath(d)))
    if not src.is_dir():
        raise HeadError(f"head directory {str(d)!r} does not exist; train one with train-head --out DIR")
    for name in (HEAD_JSON, HEAD_WEIGHTS):
        if not (src / name).is_file():
            raise HeadError(f"{str(d)!r} is not a head directory: {name} is missing")
    try:
        meta = json.loads((src / HEAD_JSON).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise HeadError(f"{str(d / HEAD_JSON)!r} is not valid JSON ({e}); the head is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HeadError(f"{str(d / HEAD_JSON)!r} is not an embedstore head (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise HeadError(f"head {str(d)!r}: head.json field 'version' must be an integer, got {version!r}")
    if version > VERSION:
        raise HeadError(f"head format version {version} is newer than this embedstore "
                        f"reads ({VERSION}); upgrade embedstore")
    dim, classes, positive, threshold = checked_meta(d, meta)
    cfg = checked_config(d, meta.get("config"))
    raw = (src / HEAD_WEIGHTS).read_bytes()     # read once: hashed, checked and loaded from memory
    sha = meta.get("weights_sha256")
    if sha is not None and sha != hashlib.sha256(raw).hexdigest():
        raise HeadError(f"head {str(d)!r}: {HEAD_WEIGHTS} is not the file head.json was written with "
                        f"(sha256 differs); the head is damaged: retrain it with train-head --out DIR")
    tensors = read_weights(d, src / HEAD_WEIGHTS, raw)
    check_weight_shapes(d, src / HEAD_WEIGHTS, tensors, cfg, dim, len(classes))
    module = build_head_module(cfg, dim, len(classes))
    try:
        module.load_state_dict(tensors, strict=True)
    except Exception as e:  # safetensors raises its own error types
        raise HeadError(f"weights in {str(d / HEAD_WEIGHTS)!r} do not match head.json "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    module.eval()
    return TrainedHead(module, cfg, classes, positive, threshold, meta.get("history") or {},
                       meta.get("metrics") or {}, meta.get("fingerprint"))


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

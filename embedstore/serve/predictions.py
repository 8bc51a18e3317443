"""Predictions served beside the stores: ``embedstore serve STORE --head DIR --predictions FILE``.

Each head (a directory written by ``save_head``) is named by its directory (de-duplicated like
the stores) and attached to every served store whose embedding space it was trained in (the
store fingerprint it records); one that fits none is refused at start, with the first difference.
A slide's probabilities are computed from its embeddings on first request and kept (bounded).

A predictions file (the Arrow IPC file ``embedstore predict`` writes: ``slide``, ``x``, ``y`` and
one ``prob_<class>`` column per class) is named by its file name and attached to every store
holding one of its slides; its probabilities are drawn where its rows say the tiles are.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, EmbedstoreError, SourceError, UnknownKeyError

if TYPE_CHECKING:
    from ..heads import TrainedHead

__all__ = ["load_heads", "StoreHeads", "fitting_heads", "PredictionFile", "fitting_files"]

_PROBS = 32                 # slides' probabilities kept per store


def load_heads(paths: Sequence[str | os.PathLike[str]], files: Sequence[str | os.PathLike[str]] = ()
               ) -> tuple[dict[str, TrainedHead], dict[str, PredictionFile]]:
    """Every head and predictions file under its short name (its directory or file name, one
    namespace); HeadError / SourceError (one line) for a bad one."""
    from ..heads import load_head
    from .stores import short_names
    heads = list(dict.fromkeys(Path(p).resolve() for p in paths))
    tables = list(dict.fromkeys(Path(p).resolve() for p in files))
    names = short_names(heads + tables)
    return ({n: load_head(p) for n, p in zip(names, heads)},
            {n: PredictionFile(p) for n, p in zip(names[len(heads):], tables)})


class PredictionFile:
    """The per-tile probabilities of an ``embedstore predict`` Arrow file, by slide."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        try:
            with pa.OSFile(str(path), "rb") as source:         # read into memory, not mapped
                table = pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"predictions file {str(path)!r} is not readable as Arrow IPC "
                              f"({' '.join(str(exc).split())[:120]}); give a file from embedstore predict") from None
        self.classes = [c[len("prob_"):] for c in table.column_names if c.startswith("prob_")]
        missing = {"slide", "x", "y"} - set(table.column_names)
        if missing or not self.classes:
            raise SourceError(f"predictions file {str(path)!r} lacks {sorted(missing) or 'prob_<class>'} "
                              "columns; a heatmap needs slide, x, y and prob_<class> (predict a slide store)")
        slide = np.asarray(table.column("slide").to_pylist(), dtype=object)
        x = table.column("x").to_numpy(zero_copy_only=False)
        y = table.column("y").to_numpy(zero_copy_only=False)
        on = np.array([s is not None for s in slide]) & np.isfinite(np.asarray(x, np.float64)) \
            & np.isfinite(np.asarray(y, np.float64))
        prob = np.stack([table.column(f"prob_{c}").to_numpy(zero_copy_only=False) for c in self.classes], axis=1)
        self._coords = np.stack([x[on], y[on]], axis=1).astype(np.int64)
        self._prob = prob[on].astype(np.float32)
        order = np.argsort(slide[on].astype(str), kind="stable")
        names, first = np.unique(slide[on].astype(str)[order], return_index=True)
        bounds = list(first) + [len(order)]
        self._rows = {str(n): order[bounds[i]:bounds[i + 1]] for i, n in enumerate(names)}
        self.path = path

    @property
    def slides(self) -> frozenset[str]:
        return frozenset(self._rows)

    def slide(self, slide: str) -> tuple[np.ndarray, np.ndarray]:
        """(coords (n, 2) int64 level-0 x, y; prob (n, classes) float32) of ``slide``'s rows."""
        rows = self._rows.get(slide)
        if rows is None:
            raise UnknownKeyError(f"predictions file {self.path.name!r} has no tiles of slide {slide!r}")
        return self._coords[rows], self._prob[rows]


def fitting_files(files: Mapping[str, PredictionFile], slides: Mapping[str, Sequence[str]]
                  ) -> dict[str, dict[str, PredictionFile]]:
    """store name -> the predictions files naming one of its slides (``slides``: store -> its
    slides); ConfigError when a file names no served slide."""
    out: dict[str, dict[str, PredictionFile]] = {name: {} for name in slides}
    for fname, f in files.items():
        for sname, names in slides.items():
            if not f.slides.isdisjoint(names):
                out[sname][fname] = f
        if not any(fname in fs for fs in out.values()):
            raise ConfigError(f"predictions file {str(f.path)!r} names none of the served stores' slides "
                              f"(it has {len(f.slides)} slide(s), e.g. {sorted(f.slides)[:1]})")
    return out


def fitting_heads(heads: Mapping[str, TrainedHead], fingerprints: Mapping[str, dict[str, Any]]
                  ) -> dict[str, dict[str, TrainedHead]]:
    """store name -> the heads trained in its space (``fingerprints``: store name -> fingerprint);
    ConfigError naming the head and its first difference when one fits no store."""
    from ..heads import check_fingerprint
    out: dict[str, dict[str, TrainedHead]] = {name: {} for name in fingerprints}
    for hname, head in heads.items():
        why = ""
        for sname, fp in fingerprints.items():
            try:
                check_fingerprint(head, fp, where=f"store {sname!r}")
            except EmbedstoreError as exc:
                why = why or str(exc)
                continue
            out[sname][hname] = head
        if not any(hname in hs for hs in out.values()):
            raise ConfigError(f"head {hname!r} fits none of the served stores: {why}")
    return out


class StoreHeads:
    """The heads and predictions files of one served store, and the probabilities the heads
    gave per slide."""

    def __init__(self, heads: Mapping[str, TrainedHead],
                 files: Mapping[str, PredictionFile] | None = None) -> None:
        self.heads = dict(heads)
        self.files = dict(files or {})
        self._probs: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def listing(self) -> list[dict[str, Any]]:
        """[{name, classes, default, source}] (default: the class drawn when none is asked;
        source: head or file)."""
        out = [{"name": n, "classes": list(h.classes), "default": h.classes[self._default(n)],
                "source": "head"} for n, h in self.heads.items()]
        return out + [{"name": n, "classes": list(f.classes), "default": f.classes[-1], "source": "file"}
                      for n, f in self.files.items()]

    def _classes(self, name: str, store: str) -> list[str]:
        if name in self.heads:
            return list(self.heads[name].classes)
        if name in self.files:
            return self.files[name].classes
        raise UnknownKeyError(f"no head or predictions named {name!r} are served for store {store!r}; "
                              f"GET /api/{store}/heads lists them")

    def _default(self, name: str) -> int:
        head = self.heads.get(name)
        if head is not None and head.positive is not None:
            return head.positive
        return len(self.heads[name].classes if head is not None else self.files[name].classes) - 1

    def class_index(self, name: str, cls: str | None, store: str) -> int:
        classes = self._classes(name, store)
        if cls is None:
            return self._default(name)
        if cls not in classes:
            raise UnknownKeyError(f"class {cls!r} is not one of {name!r}'s classes {classes}")
        return classes.index(cls)

    def values(self, name: str, cls: str | None, slide: str, coords: np.ndarray, emb: np.ndarray,
               store: str) -> tuple[np.ndarray, np.ndarray]:
        """(coords (n, 2), P(cls) (n,)) on ``slide``: a head's on the slide's tiles (``coords``,
        ``emb`` (n, dim)), a file's where its rows lie."""
        c = self.class_index(name, cls, store)
        if name in self.files:
            xy, prob = self.files[name].slide(slide)
            return xy, prob[:, c]
        return coords, self.probabilities(name, slide, emb)[:, c]

    def probabilities(self, name: str, slide: str, emb: np.ndarray) -> np.ndarray:
        """(n, classes) float32 probabilities of the head ``name`` for a slide's ``emb`` (n, dim)."""
        head = self.heads[name]
        with self._lock:
            prob = self._probs.get((name, slide))
            if prob is None:
                prob = self._probs[(name, slide)] = head.predict_proba(np.asarray(emb, np.float32))
                while len(self._probs) > _PROBS:
                    self._probs.popitem(last=False)
            self._probs.move_to_end((name, slide))
            return prob

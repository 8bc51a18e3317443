"""The thin layer between a store and the array-level head code.

Labels come from a store task (``store.task_table``) or from a CSV / mapping keyed by tile key;
embeddings are gathered once into memory; slide-level work gets a ``Dataset`` of per-slide bags.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from ..augment import ViewBank
from ..errors import LabelsError
from .train import check_features

__all__ = ["LabelledSet", "read_labels_csv", "labelled_set", "gather_features", "view_bank",
           "SlideBagDataset"]


@dataclass(frozen=True)
class LabelledSet:
    ids: np.ndarray                     # (n,) int64 store ids of the labelled tiles
    keys: np.ndarray                    # (n,) object tile keys
    labels: np.ndarray                  # (n,) object label strings
    split: np.ndarray | None = None     # (n,) object train/valid/test, when the labels carry one
    columns: dict[str, np.ndarray | None] = field(default_factory=dict)  # grouping columns by name

    def __len__(self) -> int:
        return int(self.ids.size)


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Columns of a labels CSV: ``key`` (or ``path``) and ``label`` required; ``split``, ``slide``,
    ``patient``... kept as extra columns. Each column is (n,) object."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except FileNotFoundError:
        raise LabelsError(f"labels file {str(path)!r} does not exist") from None
    key_col = "key" if "key" in header else "path" if "path" in header else None
    if key_col is None or "label" not in header:
        raise LabelsError(f"labels file {str(path)!r} needs columns key (or path) and label; "
                          f"it has {header}")
    cols = {h: np.array([(r.get(h) or "").strip() for r in rows], dtype=object) for h in header}
    cols["key"] = cols.pop(key_col)
    empty = np.flatnonzero(cols["label"] == "")
    if empty.size:
        raise LabelsError(f"labels file {str(path)!r} has {empty.size} rows without a label "
                          f"(first key: {cols['key'][empty[0]]!r}); fill or drop them")
    return cols


def _lookup_ids(store: Any, keys: np.ndarray) -> np.ndarray:
    """Store ids of ``keys`` (n,) int64, -1 where the store has no such key."""
    lookup = getattr(store, "lookup_ids", None)
    if callable(lookup):
        found = lookup(list(keys))
        return np.array([-1 if i is None else int(i) for i in found], dtype=np.int64)
    index: dict[str, int] = {}
    for ids, _ in store.scan(65536):            # fallback: one pass over the key column
        meta = store.metadata(ids, columns=("key",))
        index.update(zip((str(k) for k in meta["key"]), (int(i) for i in ids)))
    return np.array([index.get(str(k), -1) for k in keys], dtype=np.int64)


def _store_slides(store: Any, ids: np.ndarray) -> np.ndarray | None:
    try:
        slides = store.metadata(ids, columns=("slide",)).get("slide")
    except (KeyError, ValueError):
        return None
    if slides is None:
        return None
    slides = np.asarray(slides, dtype=object)
    return None if all(s is None or s == "" for s in slides) else slides


def labelled_set(store: Any, *, task: str | None = None,
                 labels: Mapping[str, Any] | str | os.PathLike[str] | None = None) -> LabelledSet:
    """The labelled tiles for a store task, or for ``labels``: a ``{key: label}`` mapping, a
    column dict from ``read_labels_csv``, or a CSV path. Unknown keys are refused in one line."""
    if (task is None) == (labels is None):
        raise LabelsError("give exactly one of a store task (--task NAME) or a labels file (--labels CSV)")
    columns: dict[str, np.ndarray | None] = {}
    if task is not None:
        t = store.task_table(task)
        ids = np.asarray(t["ids"], dtype=np.int64)
        keys = np.asarray(t["keys"], dtype=object)
        lab = np.array([None if v is None else str(v) for v in t["label"]], dtype=object)
        split = None if t.get("split") is None else np.asarray(t["split"], dtype=object)
        if t.get("group") is not None:
            columns["group"] = np.asarray(t["group"], dtype=object)
        if ids.size == 0:
            raise LabelsError(f"task {task!r} has no labelled tiles in store {str(store.path)!r}")
    else:
        cols = read_labels_csv(labels) if isinstance(labels, (str, os.PathLike)) else labels
        if "key" in cols and "label" in cols and not isinstance(cols["key"], str):
            table = {k: np.asarray(v, dtype=object) for k, v in cols.items()}
        else:
            table = {"key": np.array(list(cols.keys()), dtype=object),
                     "label": np.array([str(v) for v in cols.values()], dtype=object)}
        keys, lab = table.pop("key"), table.pop("label")
        split = table.pop("split", None)
        columns.update(table)
        uniq, count = np.unique(keys.astype(str), return_counts=True)
        if (count > 1).any():
            raise LabelsError(f"label key {uniq[count > 1][0]!r} appears {count.max()} times; one label per tile")
        ids = _lookup_ids(store, keys)
        missing = np.flatnonzero(ids < 0)
        if missing.size:
            raise LabelsError(f"{missing.size} of {keys.size} label keys are not in store "
                              f"{str(store.path)!r} (first: {keys[missing[0]]!r}); check they are the "
                              f"store's tile keys")
    keep = np.array([v is not None and v != "" for v in lab], dtype=bool)
    ids, keys, lab = ids[keep], keys[keep], lab[keep]
    split = split[keep] if split is not None else None
    columns = {k: (v[keep] if v is not None else None) for k, v in columns.items()}
    if "slide" not in columns:
        columns["slide"] = _store_slides(store, ids)
    return LabelledSet(ids, keys, lab, split, columns)


def gather_features(store: Any, ids: np.ndarray) -> np.ndarray:
    """The embeddings of ``ids`` gathered once: (n, dim) in the store's dtype; NaNs refused."""
    return check_features(np.asarray(store.gather(np.asarray(ids, dtype=np.int64))),
                          f"embeddings in store {str(getattr(store, 'path', ''))!r}")


def view_bank(store: Any, ids: np.ndarray) -> ViewBank | None:
    """The stored views of the tiles ``ids`` (None when the store has no view bank)."""
    view_ids, _view_num, view_emb = store.views()
    if np.asarray(view_ids).size == 0:
        return None
    bank = ViewBank.build(ids, view_ids, view_emb)
    if bank.emb.shape[0]:
        check_features(bank.emb, "view embeddings")
    return bank


class SlideBagDataset(Dataset):  # type: ignore[type-arg]
    """One item per slide: ``{"emb": (n, dim) float32, "coords": (n, 2) int64, "ids": (n,) int64,
    "label": int64 scalar (-1 when unlabelled), "slide": str}``, read from the store on access.

    Labels: ``labels`` maps slide name -> label; or ``task`` is a store task whose keys are slide
    names, or whose tile labels agree within each slide; neither = unlabelled bags.
    Use ``batch_size=1`` (bags differ in length) or a collate function of your own.
    """

    def __init__(self, store: Any, task: str | None = None, labels: Mapping[str, Any] | None = None) -> None:
        self.store = store
        names = [str(s) for s in store.slides()]
        if labels is not None and task is not None:
            raise LabelsError("give a task or a slide->label mapping, not both")
        slide_label: dict[str, str] = {}
        if labels is not None:
            unknown = sorted(set(map(str, labels)) - set(names))
            if unknown:
                raise LabelsError(f"{len(unknown)} labelled slides are not in store {str(store.path)!r} "
                                  f"(first: {unknown[0]!r})")
            slide_label = {str(k): str(v) for k, v in labels.items()}
        elif task is not None:
            slide_label = self._task_labels(store, task, set(names))
        self.slides = [s for s in names if s in slide_label] if slide_label else names
        self.classes = sorted(set(slide_label.values()))
        index = {c: i for i, c in enumerate(self.classes)}
        self.targets = np.array([index[slide_label[s]] if slide_label else -1 for s in self.slides],
                                dtype=np.int64)

    @staticmethod
    def _task_labels(store: Any, task: str, names: set[str]) -> dict[str, str]:
        t = store.task_table(task)
        keys = [str(k) for k in t["keys"]]
        if keys and all(k in names for k in keys):
            return {k: str(v) for k, v in zip(keys, t["label"])}
        slides = store.metadata(np.asarray(t["ids"], dtype=np.int64), columns=("slide",))["slide"]
        out: dict[str, str] = {}
        for s, v in zip(slides, t["label"]):
            if s is None or v is None:
                continue
            if out.setdefault(str(s), str(v)) != str(v):
                raise LabelsError(f"slide {s!r} has tiles labelled {out[str(s)]!r} and {v!r} in task "
                                  f"{task!r}; give slide labels explicitly")
        return out

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.slides[i]
        bag = self.store.slide(name)
        return {"emb": torch.from_numpy(np.array(bag.emb, dtype=np.float32)),     # copies: the
                "coords": torch.from_numpy(np.array(bag.coords, dtype=np.int64)),  # store's memmaps
                "ids": torch.from_numpy(np.array(bag.ids, dtype=np.int64)),        # are read-only
                "label": torch.tensor(int(self.targets[i])), "slide": name}

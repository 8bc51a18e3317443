"""The thin layer between a store and the array-level head code.

Labels come from a store task (``store.task_table``) or from a CSV (read by the store's
``read_labels_csv``) / mapping keyed by tile key; embeddings are gathered once into memory
when they fit the memory budget (else ``heads.stream`` reads them as training goes);
slide-level work gets a ``Dataset`` of per-slide bags, each read from the store on access.

Functions that need only what ``StoreLike`` declares take one; those that also read tasks,
views or slides (``task_table``, ``views``, ``slides``, ``slide``: not in the protocol yet) take
``Any`` and use nothing else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import ViewBank
from ..errors import LabelsError, UnknownKeyError
from ..store.labels import read_labels_csv
from ..store.protocol import StoreLike
from .train import check_features

__all__ = ["LabelledSet", "labelled_set", "gather_features", "view_bank", "SlideBagDataset"]


@dataclass(frozen=True)
class LabelledSet:
    ids: np.ndarray                     # (n,) int64 store ids of the labelled tiles
    keys: np.ndarray                    # (n,) object tile keys
    labels: np.ndarray                  # (n,) object label strings
    split: np.ndarray | None = None     # (n,) object train/valid/test, when the labels carry one
    columns: dict[str, np.ndarray | None] = field(default_factory=dict)  # grouping columns by name

    def __len__(self) -> int:
        return int(self.ids.size)

    def group_column(self, name: str | None) -> np.ndarray | None:
        """The grouping column ``name``; a task's single group column (patient, case) answers to
        any name the labels lack, so ``group:patient`` works on a task imported with ``group``."""
        if name is None:
            return None
        if self.columns.get(name) is not None:
            return self.columns[name]
        return self.columns.get("group") if name != "slide" else None


def _lookup_ids(store: StoreLike, keys: np.ndarray) -> np.ndarray:
    """Store ids of ``keys`` (n,) int64; unknown keys become one LabelsError line."""
    try:
        return np.asarray(store.ids([str(k) for k in keys]), dtype=np.int64)
    except UnknownKeyError as e:
        raise LabelsError(f"labels name tiles the store does not hold: {e}; check the keys are the "
                          f"store's tile keys (paths relative to the extracted folder or CSV)") from None


def _store_slides(store: StoreLike, ids: np.ndarray) -> np.ndarray | None:
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
    """The labelled tiles of a store task (``task=None``: the labels recorded at extraction), or
    of ``labels``: a ``{key: label}`` mapping, a column dict from ``read_labels_csv``, or a CSV
    path. Unknown keys are refused in one line. (``store``: Any, it reads ``task_table``.)"""
    if task is not None and labels is not None:
        raise LabelsError("give a store task (--task NAME) or a labels file (--labels CSV), not both")
    every = _from_task(store, task) if labels is None else _from_labels(store, labels)
    keep = np.array([v is not None and v != "" for v in every.labels], dtype=bool)
    columns = {k: (v[keep] if v is not None else None) for k, v in every.columns.items()}
    ids = every.ids[keep]
    if "slide" not in columns:
        columns["slide"] = _store_slides(store, ids)
    return LabelledSet(ids, every.keys[keep], every.labels[keep],
                       every.split[keep] if every.split is not None else None, columns)


def _from_task(store: Any, task: str | None) -> LabelledSet:
    """Every row of a store task, unlabelled ones included (``labelled_set`` drops those)."""
    t = store.task_table(task)
    ids = np.asarray(t["ids"], dtype=np.int64)
    if ids.size == 0:
        what = f"task {task!r}" if task is not None else "the extraction labels"
        raise LabelsError(f"{what} label no tiles in store {str(store.path)!r}; import labels "
                          f"with a task or give --labels CSV")
    lab = np.array([None if v is None else str(v) for v in t["label"]], dtype=object)
    split = None if t.get("split") is None else np.asarray(t["split"], dtype=object)
    columns: dict[str, np.ndarray | None] = {}
    if t.get("group") is not None:
        columns["group"] = np.asarray(t["group"], dtype=object)
    return LabelledSet(ids, np.asarray(t["keys"], dtype=object), lab, split, columns)


def _from_labels(store: StoreLike, labels: Mapping[str, Any] | str | os.PathLike[str]) -> LabelledSet:
    """Every row of a labels CSV, column dict or ``{key: label}`` mapping, with its store ids."""
    cols = read_labels_csv(labels) if isinstance(labels, (str, os.PathLike)) else labels
    if "key" in cols and "label" in cols and not isinstance(cols["key"], str):
        table = {k: np.asarray(v, dtype=object) for k, v in cols.items()}
    else:
        table = {"key": np.array(list(cols.keys()), dtype=object),
                 "label": np.array([str(v) for v in cols.values()], dtype=object)}
    keys, lab = table.pop("key"), table.pop("label")
    split = table.pop("split", None)
    uniq, count = np.unique(keys.astype(str), return_counts=True)
    if (count > 1).any():
        raise LabelsError(f"label key {uniq[count > 1][0]!r} appears {count.max()} times; one label per tile")
    columns: dict[str, np.ndarray | None] = dict(table)
    return LabelledSet(_lookup_ids(store, keys), keys, lab, split, columns)


def gather_features(store: StoreLike, ids: np.ndarray) -> np.ndarray:
    """The embeddings of ``ids`` gathered once: (n, dim) in the store's dtype; NaNs refused."""
    return check_features(np.asarray(store.gather(np.asarray(ids, dtype=np.int64))),
                          f"embeddings in store {str(store.path)!r}")


def view_bank(store: Any, ids: np.ndarray) -> ViewBank | None:
    """The stored views of the tiles ``ids``, gathered once (None when the store has none).
    (``store``: Any, it reads ``views()``.)

    Only the views of ``ids`` are read: ``store.views()`` gives each view's base tile id
    (``.ids``) and reads view rows with ``.gather(j)``; a plain ``(view_ids, view_num, view_emb)``
    tuple works too.
    """
    bank = store.views()
    if isinstance(bank, tuple):
        view_ids, _num, view_emb = bank
        read = lambda j: np.asarray(view_emb[j])  # noqa: E731
    else:
        view_ids, read = bank.ids, bank.gather
    view_ids = np.asarray(view_ids, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    j = np.flatnonzero(np.isin(view_ids, ids))
    if j.size == 0:
        return None
    out = ViewBank.build(ids, view_ids[j], np.asarray(read(j)))
    check_features(out.emb, "view embeddings")
    return out


class SlideBagDataset(Dataset):
    """One item per slide: ``{"emb": (n, dim) float32, "coords": (n, 2) int64, "ids": (n,) int64,
    "label": int64 scalar (-1 when unlabelled), "slide": str}``, read from the store on access.

    Labels: ``labels`` maps slide name -> label; or ``task`` is a store task whose keys are slide
    names, or whose tile labels agree within each slide; neither = unlabelled bags.
    Use ``batch_size=1`` (bags differ in length) or a collate function of your own.
    (``store``: Any, it reads ``slides``, ``slide`` and ``task_table``.)
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

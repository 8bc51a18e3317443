"""Labels CSVs: the one reader, and importing labels as a named task.

Columns: ``key`` (or ``path``, the same value), ``label``, optional ``split`` and ``group``
(patient/case), and any other grouping column (``slide``, ``patient``...), which the heads keep.
All keys must be in the store; nothing is written unless the whole file is good.

An import is journaled (``{"op": "labels", "task", "record", "rows": [[key, label, split,
group], ...]}``, appended inside its transaction, see :mod:`.journal`), so a catalog rebuilt
from the shards can get the task back even when the old catalog is unreadable; the last
record of a task wins (an import replaces the task).
"""
from __future__ import annotations

import csv
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import LabelsError
from . import journal
from .catalog import open_catalog, _j
from .layout import Layout

__all__ = ["import_labels", "read_labels_csv"]

SCAN_MIN = 4096   # imports of this many keys look them up in one pass over the shards (reader.SCAN_MIN)


def read_labels_csv(csv_path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Columns of a labels CSV by name, each a list of ``n`` stripped strings (``""`` where a
    cell is empty): ``key`` (from the ``key`` or ``path`` column), ``label``, and every other
    column as it is named (``split``, ``group``, ``slide``...). Refuses, in one line, a missing
    file, a missing key or label column, an empty key or label, and a file without rows."""
    p = Path(csv_path)
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in (reader.fieldnames or [])]
            raw = list(reader)
    except FileNotFoundError:
        raise LabelsError(f"labels file {p} does not exist") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise LabelsError(f"labels file {p} is not a readable CSV ({e})") from None
    keycol = "key" if "key" in header else "path" if "path" in header else None
    if keycol is None or "label" not in header:
        raise LabelsError(f"labels file {p} needs columns key (or path) and label; "
                          f"found {header or 'no header'}")
    rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in raw]  # k None: extra cells
    cols = {h: [r.get(h, "") for r in rows] for h in header if h}
    cols["key"] = cols.pop(keycol)
    for name, col in ((keycol, "key"), ("label", "label")):
        empty = [i for i, v in enumerate(cols[col]) if not v]
        if empty:
            raise LabelsError(f"labels file {p} has {len(empty)} row(s) with an empty {name} (first: "
                              f"line {empty[0] + 2}); fill or drop them")
    if not rows:
        raise LabelsError(f"labels file {p} has a header but no rows")
    return cols


def import_labels(store_path: Path | str, csv_path: Path | str | None, task: str, *,
                  rows: list[dict[str, Any]] | None = None, on_unknown: str = "error") -> dict[str, Any]:
    """Import labels as ``task`` (replacing a task of the same name). Returns the task record.

    ``rows``: dicts with key, label, split, group (None when absent) instead of ``csv_path``;
    ``on_unknown``: "error" (default: nothing written) or "skip" keys the store lacks.
    """
    if rows is None:
        if csv_path is None:
            raise LabelsError("import_labels needs a labels CSV or rows; got neither")
        rows = _task_rows(read_labels_csv(csv_path))
    if not task or "\x00" in task:
        raise LabelsError(f"task name must be a non-empty string, got {task!r}")
    seen: set[str] = set()
    for r in rows:
        if r["key"] in seen:
            raise LabelsError(f"{csv_path or 'labels'}: key {r['key']!r} appears twice")
        seen.add(r["key"])
    lay = Layout(Path(store_path))
    cat = open_catalog(lay.root)
    keys: list[str] = [r["key"] for r in rows]
    if len(keys) >= SCAN_MIN:   # many keys: one vectorised pass over the shards' key column
        from .reader import Store
        found: list[Any] = [None if i < 0 else i for i in Store(lay.root).find_ids(keys).tolist()]
    else:
        found = cat.read(lambda t: cat.lookup_ids(t, keys))
    unknown = [r["key"] for r, i in zip(rows, found) if i is None]
    if unknown and on_unknown == "error":
        raise LabelsError(f"{csv_path or 'labels'}: {len(unknown)} of {len(rows)} keys are not in "
                          f"{store_path}, first: {unknown[0]!r} (keys are paths relative to the "
                          "extracted folder or CSV)")
    rows = [r for r, i in zip(rows, found) if i is not None]
    counts = Counter(r["label"] for r in rows)
    record = {"n": len(rows), "classes": dict(sorted(counts.items())),
              "has_split": any(r["split"] for r in rows), "has_group": any(r["group"] for r in rows),
              "source": str(csv_path) if csv_path else None, "time": time.time(),
              "skipped_unknown": len(unknown)}

    prefix = task.encode() + b"\x00"
    enc: dict[tuple[Any, ...], bytes] = {}   # few distinct [label, split, group]: encode each once
    for r in rows:
        v = (r["label"], r["split"], r["group"])
        if v not in enc:
            enc[v] = _j(list(v))
    items = sorted((prefix + r["key"].encode(), enc[(r["label"], r["split"], r["group"])]) for r in rows)

    def txn(t: Any) -> None:
        db = cat.db["labels"]
        cur = t.cursor(db=db)
        if cur.set_range(prefix):   # the task's old labels go (delete moves to the next record)
            while cur.key().startswith(prefix) and cur.delete():
                pass
        cur.putmulti(items, append=False)
        cat.put_json(t, "tasks", task, record)
        journal.append(lay.root, {"op": "labels", "task": task, "record": record, "time": record["time"],
                                  "rows": [[r["key"], r["label"], r["split"], r["group"]] for r in rows]})
    cat.write(txn)
    return record


def _task_rows(cols: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The CSV's columns as task rows: key, label, split, group (None where empty or absent)."""
    n = len(cols["key"])
    split, group = cols.get("split", [""] * n), cols.get("group", [""] * n)
    return [{"key": k, "label": lab, "split": s or None, "group": g or None}
            for k, lab, s, g in zip(cols["key"], cols["label"], split, group)]

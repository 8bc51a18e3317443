"""Importing labels from CSV as a named task.

Columns: ``key`` (or ``path``, the same value), ``label``, optional ``split`` and ``group``
(patient/case). All keys must be in the store; nothing is written unless the whole file is good.
"""
from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import LabelsError
from .catalog import label_key, open_catalog, _j
from .layout import Layout

__all__ = ["import_labels", "read_labels_csv"]


def read_labels_csv(csv_path: Path | str) -> list[dict[str, str | None]]:
    """Rows of a labels CSV as dicts with key, label, split, group (None when absent)."""
    p = Path(csv_path)
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            raw = list(reader)
    except FileNotFoundError:
        raise LabelsError(f"labels file {p} does not exist") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise LabelsError(f"labels file {p} is not a readable CSV ({e})") from None
    keycol = "key" if "key" in cols else "path" if "path" in cols else None
    if keycol is None or "label" not in cols:
        raise LabelsError(f"labels file {p} needs columns key (or path) and label; "
                          f"found {cols or 'no header'}")
    rows = []
    for i, r in enumerate(raw, start=2):
        r = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k}
        if not r.get(keycol) or r.get("label") in (None, ""):
            raise LabelsError(f"labels file {p} line {i}: empty {keycol if not r.get(keycol) else 'label'}")
        rows.append({"key": r[keycol], "label": r["label"],
                     "split": r.get("split") or None, "group": r.get("group") or None})
    if not rows:
        raise LabelsError(f"labels file {p} has a header but no rows")
    return rows


def import_labels(store_path: Path | str, csv_path: Path | str | None, task: str, *,
                  rows: list[dict[str, Any]] | None = None, on_unknown: str = "error") -> dict[str, Any]:
    """Import labels as ``task`` (replacing a task of the same name). Returns the task record.

    ``on_unknown``: "error" (default: nothing written) or "skip" keys the store lacks.
    """
    if rows is None:
        assert csv_path is not None
        parsed: list[dict[str, Any]] = read_labels_csv(csv_path)
        rows = parsed
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

    def txn(t: Any) -> None:
        db = cat.db["labels"]
        prefix = task.encode() + b"\x00"
        old = [k for k, _ in cat.items(t, "labels", prefix)]
        for k in old:
            t.delete(k, db=db)
        for r in rows:
            t.put(label_key(task, r["key"]), _j([r["label"], r["split"], r["group"]]), db=db)
        cat.put_json(t, "tasks", task, record)
    cat.write(txn)
    return record

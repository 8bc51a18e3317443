"""The work a run has left: the units not yet in the store, and the units embedded before the
store had a view recipe, whose views are still to add.

``plan_work`` is pure (units and what the store recorded in, work items out), ``read_work`` reads
the store and hashes the slides it needs and then calls it; it also checks the finished files
units now read from another folder than the one they were embedded from (``fingerprint``). Every process of a run computes the
same list, so a claim is an index into it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..store import open_store, units_with_views
from ..store.layout import Layout
from .sources import Discovery, Unit

__all__ = ["VIEWS", "WorkItem", "WorkPlan", "plan_work", "read_work"]

VIEWS = "views:"  # prefix of the unit that adds views to a unit embedded without them


@dataclass(frozen=True)
class WorkItem:
    unit: Unit                 # the source unit
    views_only: bool = False   # only add the views of tiles embedded by an earlier run

    @property
    def name(self) -> str:
        """The catalog name of this work: the unit's id, or ``views:<id>``."""
        return VIEWS + self.unit.id if self.views_only else self.unit.id


@dataclass(frozen=True)
class WorkPlan:
    items: list[WorkItem]             # largest first (balanced claiming)
    skipped: int = 0                  # units done in an earlier run
    changed: tuple[tuple[str, str], ...] = ()   # (unit, reason): slides changed since embedded
    conflicting: tuple[str, ...] = ()  # keys of finished units that other files now claim

    @property
    def n_files(self) -> int:
        return sum(len(it.unit.files) for it in self.items)


def plan_work(units: Sequence[Unit], done: Mapping[str, Mapping[str, Any]],
              with_views: set[str] | frozenset[str], identities: Mapping[str, Any], *,
              views: bool) -> WorkPlan:
    """What is left of ``units``, given ``done`` (finished unit -> its record), ``with_views``
    (finished units whose views are stored) and the slides' ``identities`` now (unit -> the
    `slide_identity` of its file). ``views``: the run makes views. Pure."""
    items: list[WorkItem] = []
    skipped = 0
    changed: list[tuple[str, str]] = []
    for u in units:
        rec = done.get(u.id)
        if rec is None:
            items.append(WorkItem(u))
            continue
        skipped += 1
        if views and rec.get("shard") and u.id not in with_views and VIEWS + u.id not in done:
            items.append(WorkItem(u, views_only=True))
        if u.kind == "slide" and rec.get("identity") and identities.get(u.id) != rec["identity"]:
            changed.append((u.id, f"slide {u.slide_id} changed since it was embedded (size or content "
                                  "hash differs); delete its tiles (embedstore delete --slide) and re-run"))
    items.sort(key=lambda it: -it.unit.weight)   # stable: ties keep the units' order
    return WorkPlan(items, skipped, tuple(changed))


def read_work(disc: Discovery, store: str | os.PathLike[str], *, views: bool,
              lock: bool = True) -> WorkPlan:
    """`plan_work` over what the store at ``store`` (if any) holds now."""
    done: dict[str, dict[str, Any]] = {}
    with_views: set[str] = set()
    if Layout(Path(store)).meta.exists():
        done = open_store(store, lock=lock).units()
        if views:
            with_views = units_with_views(store, lock=lock)
    identities: dict[str, Any] = {}
    for u in disc.units:
        if u.kind == "slide" and done.get(u.id, {}).get("identity"):
            from .wsi import slide_identity
            try:
                identities[u.id] = slide_identity(u.slide_path)
            except OSError as e:
                identities[u.id] = {"error": str(e)}
    plan = plan_work(disc.units, done, with_views, identities, views=views)
    moved: list[tuple[str, str]] = []
    conflicting: list[str] = []
    for u in disc.units:
        rec = done.get(u.id)
        if u.kind == "files" and rec and rec.get("root") and rec.get("files"):
            from .fingerprint import moved_conflicts
            for key, reason in moved_conflicts(u.files, u.source, rec["root"], rec["files"]):
                moved.append((f"{u.id}|{key}", reason))
                conflicting.append(key)
    if not moved:
        return plan
    return replace(plan, changed=plan.changed + tuple(moved), conflicting=tuple(conflicting))

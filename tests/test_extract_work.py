"""Extraction's planning and bookkeeping without a model: what is left of a run (pure), the
pipeline's commits (with a recording fake writer), the store's progress functions on a tiny real
store, and slide pictures published whole."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstore.extract.config import ExtractResult
from embedstore.extract.dataset import TileSpec
from embedstore.extract.pending import VIEWS, WorkItem, plan_work
from embedstore.extract.pipeline import Pipeline
from embedstore.extract.sources import FileTile, Unit
from embedstore.extract.tiling import Planned, PlannedUnit
from embedstore.store import lookup_ids, units_with_views

DIM = 4


def _files(i: int, n: int = 2, weight: int | None = None) -> Unit:
    tiles = [FileTile(f"/src/{i}_{j}.png", f"{i}_{j}.png") for j in range(n)]
    return Unit(id=f"files:{i}", kind="files", source="/src", weight=n if weight is None else weight,
                files=tiles)


def _slide(i: int) -> Unit:
    return Unit(id=f"slide:s{i}.svs", kind="slide", source="/src", weight=10, slide_path=f"/src/s{i}.svs",
                slide_id=f"s{i}.svs")


# --------------------------------------------------------------------------- plan_work (pure)

def test_plan_work_skips_done_units_and_puts_the_largest_first() -> None:
    units = [_files(0, weight=1), _files(1, weight=5), _files(2, weight=1), _files(3, weight=5)]
    plan = plan_work(units, {"files:2": {"shard": "a"}}, set(), {}, views=False)
    assert [it.unit.id for it in plan.items] == ["files:1", "files:3", "files:0"]  # ties keep order
    assert plan.skipped == 1 and plan.changed == ()
    assert not any(it.views_only for it in plan.items)


def test_plan_work_adds_views_only_where_they_are_missing() -> None:
    units = [_files(0), _files(1), _files(2), _files(3)]
    done = {"files:0": {"shard": "a"}, "files:1": {"shard": "b"}, "files:2": {"shard": "c"},
            VIEWS + "files:2": {"shard": "v"}, "files:3": {}}        # files:3 committed no rows
    plan = plan_work(units, done, {"files:1"}, {}, views=True)
    assert [(it.name, it.views_only) for it in plan.items] == [(VIEWS + "files:0", True)]
    assert plan.skipped == 4
    assert plan_work(units, done, {"files:1"}, {}, views=False).items == []


def test_plan_work_reports_slides_changed_since_they_were_embedded() -> None:
    units = [_slide(0), _slide(1), _slide(2)]
    ident = {"size": 1, "sha256_head_tail": "x"}
    done = {u.id: {"shard": "a", "identity": ident} for u in units}
    now = {"slide:s0.svs": ident, "slide:s1.svs": {"size": 2, "sha256_head_tail": "y"},
           "slide:s2.svs": {"error": "gone"}}
    plan = plan_work(units, done, set(), now, views=False)
    assert plan.items == [] and plan.skipped == 3
    assert [u for u, _ in plan.changed] == ["slide:s1.svs", "slide:s2.svs"]
    assert "s1.svs changed since it was embedded" in plan.changed[0][1]


# --------------------------------------------------------------------------- the pipeline

class _Writer:
    def __init__(self) -> None:
        self.rows: list[tuple[str, list[str], np.ndarray | None]] = []
        self.ended: list[tuple[str, bool]] = []
        self.views: list[tuple[str | None, list[int], list[str], tuple[int, ...]]] = []
        self.errors: list[tuple[str, str]] = []

    def add(self, emb: np.ndarray, keys: list[str], *, unit: str, views: Any = None, **_: Any) -> None:
        assert emb.shape == (len(keys), DIM)
        self.rows.append((unit, list(keys), views))

    def end_unit(self, unit: str, *, done: bool = True, info: Any = None) -> None:
        self.ended.append((unit, done))

    def add_views(self, ids: np.ndarray, keys: list[str], views: np.ndarray, *, unit: str | None) -> None:
        self.views.append((unit, ids.tolist(), list(keys), views.shape))

    def add_error(self, unit: str, reason: str) -> None:
        self.errors.append((unit, reason))


class _Planner:
    """Plans every file of an item; ``bad`` items fail to plan."""

    def __init__(self, items: list[WorkItem], bad: frozenset[int] = frozenset()) -> None:
        self.items, self.bad = items, bad

    def plan_timed(self, index: int, item: WorkItem) -> Planned:
        if index in self.bad:
            return Planned(index, None, "cannot read it", 0.5)
        return Planned(index, PlannedUnit([TileSpec(index, t.key, t.path) for t in item.unit.files],
                                          skipped=1), None, 0.25)

    def lookup(self, keys: list[str]) -> list[int | None]:
        return [100 + i for i in range(len(keys))]


def _pipeline(items: list[WorkItem], batch_size: int,
              bad: frozenset[int] = frozenset()) -> tuple[Pipeline, _Writer]:
    order = iter(range(len(items)))
    w = _Writer()
    pipe = Pipeline(items, _Planner(items, bad), w, ExtractResult(stages={"plan": 0.0}),
                    batch_size=batch_size, claim=lambda: next(order, None),
                    tile_meta={"tile_size": 8, "mpp": None})
    return pipe, w


def _run(pipe: Pipeline, k: int = 0, fail: frozenset[str] = frozenset()) -> list[list[TileSpec]]:
    """What the model loop does, with embeddings ``(n, 1 + k, DIM)`` and the keys in ``fail``
    coming back from the workers as unreadable."""
    batches = list(pipe.batches())
    for specs in batches:
        bad = [(s, "broken") for s in specs if s.key in fail]
        ok = [s for s in specs if s.key not in fail]
        pipe.tiles_failed(bad)
        if ok:
            pipe.write(ok, np.zeros((len(ok), 1 + k, DIM), np.float32))
        pipe.landed(ok + [s for s, _ in bad])
    return batches


def test_pipeline_batches_span_items_and_each_item_commits_when_its_last_tile_lands() -> None:
    items = [WorkItem(_files(i, n=3)) for i in range(3)]
    pipe, w = _pipeline(items, batch_size=4)
    batches = _run(pipe)
    assert [len(b) for b in batches] == [4, 4, 1]
    assert [u for u, _, _ in w.rows] == ["files:0", "files:1", "files:1", "files:2", "files:2"]
    assert w.ended == [("files:0", True), ("files:1", True), ("files:2", True)]
    res = pipe.res
    assert (res.tiles_written, res.tiles_skipped, res.units_done, res.errors) == (9, 3, 3, [])
    assert res.stages["plan"] == pytest.approx(0.75)
    assert pipe.remaining == {}


def test_a_failed_tile_or_plan_leaves_its_unit_not_done() -> None:
    items = [WorkItem(_files(i)) for i in range(3)]
    pipe, w = _pipeline(items, batch_size=3, bad=frozenset({2}))
    _run(pipe, fail=frozenset({"1_0.png"}))
    assert w.ended == [("files:0", True), ("files:1", False)]   # files:2 never planned
    assert pipe.res.units_done == 1
    assert w.errors == pipe.res.errors == [("files:2", "cannot read it"), ("files:1|1_0.png", "broken")]


def test_views_only_items_become_one_add_views_each() -> None:
    items = [WorkItem(_files(0, n=3)), WorkItem(_files(1, n=2), views_only=True)]
    pipe, w = _pipeline(items, batch_size=2)
    _run(pipe, k=2)
    assert [(u, keys, v.shape) for u, keys, v in w.rows] == [("files:0", ["0_0.png", "0_1.png"], (2, 2, DIM)),
                                                            ("files:0", ["0_2.png"], (1, 2, DIM))]
    assert w.views == [(VIEWS + "files:1", [100, 101], ["1_0.png", "1_1.png"], (2, 2, DIM))]
    assert w.ended == [("files:0", True)]
    assert (pipe.res.tiles_written, pipe.res.views_added, pipe.res.units_done) == (3, 2, 2)


def test_claiming_skips_units_another_run_holds_and_never_claims_views_only_items() -> None:
    from embedstore.extract.pending import WorkPlan
    from embedstore.extract.runner import _claiming

    class _Claims:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def claim(self, unit: str) -> bool:
            self.asked.append(unit)
            return unit != "files:1"          # another live extract holds files:1

    items = [WorkItem(_files(0)), WorkItem(_files(1)), WorkItem(_files(2), views_only=True),
             WorkItem(_files(3))]
    order = iter(range(len(items)))
    w, res = _Claims(), ExtractResult()
    claim = _claiming(lambda: next(order, None), WorkPlan(items), w, res)  # type: ignore[arg-type]
    assert [claim(), claim(), claim(), claim()] == [0, 2, 3, None]
    assert w.asked == ["files:0", "files:1", "files:3"] and res.units_left == 1


# --------------------------------------------------------------------------- store progress

def test_store_progress_lookup_and_units_with_views(tmp_path: Path) -> None:
    from synthetic import unit_data, write_units
    st = tmp_path / "s"
    write_units(st, [0], views=True)
    write_units(st, [1], views=False)
    assert units_with_views(st) == {"u0"}
    keys = unit_data(1)["keys"][:2]
    ids = lookup_ids(st, keys + ["nope"])
    assert ids[2] is None and all(isinstance(i, int) for i in ids[:2])
    from embedstore.store import open_store
    assert open_store(st).ids(keys).tolist() == ids[:2]


# --------------------------------------------------------------------------- slide pictures

def test_slide_plan_pictures_and_grid_are_published_whole(tmp_path: Path) -> None:
    from PIL import Image

    from embedstore.extract.wsi import SlidePlan, TileGrid, plan_grid
    mask = np.zeros((40, 60), bool)
    mask[5:30, 10:50] = True
    thumb = np.full((40, 60, 3), 230, np.uint8)
    grid = plan_grid((600, 400), 0.5, 0.5, 50, mask)
    paths = SlidePlan(grid=grid, thumbnail=thumb, mask=mask, mask_mpp=5.0).save(tmp_path / "m", "a__b")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == \
        ["a__b.grid.json", "a__b.mask.png", "a__b.overlay.png"]               # no partial files left
    with Image.open(paths["mask"]) as m, Image.open(paths["overlay"]) as o:
        assert np.array_equal(np.asarray(m) > 0, mask) and o.size == (60, 40)
    again = TileGrid.load_json(paths["grid"])
    assert np.array_equal(again.x, grid.x) and np.array_equal(again.y, grid.y) and len(again) == len(grid)

"""The auto index is chosen by measurement: the planner (pure), the pick (pure), the speed
prediction (pure), and the measuring chooser on a clustered store — its sample's recall
predicts the full-size recall, it prefers exact codes when memory allows and PQ when only PQ
fits, and every recall it saves is measured on queries the index does not contain."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from embedstore.errors import BudgetError
from embedstore.index import build_index, parse_memory, plan_candidates, search
from embedstore.index.choose import EXACT_MAX_ROWS, SAMPLE_MIN, pick, sample_size
from embedstore.index.measure import predicted_seconds
from test_index import FakeStore, make_store

N = 60_000                     # rows of the clustered store (64-d, 200 clusters)
PREDICTION_TOLERANCE = 0.03    # |sample recall - full-size recall| of the chosen config


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


# ---------------------------------------------------------------- planner, pick, prediction (pure)

def test_candidates_are_every_kind_that_fits() -> None:
    plans = plan_candidates(1_000_000, 768, parse_memory("8G"), 0.95)
    assert [p.kind for p in plans] == ["flat", "hnsw", "ivf-flat", "ivf-sq8", "ivf-pq"]
    assert all(not p.gpu for p in plans)
    assert all(p.memory_bytes + p.train_bytes <= parse_memory("8G") for p in plans)
    pq = plans[-1]
    assert pq.factory == "IVF4096,PQ64np" and pq.k_factors[0] > 1    # re-ranked from the store
    assert {p.nlist for p in plans if p.kind.startswith("ivf")} == {4096}
    tight = plan_candidates(1_000_000, 768, parse_memory("1G"), 0.95)
    assert [p.kind for p in tight] == ["ivf-sq8", "ivf-pq"]           # 768 MB of SQ8 codes fit
    assert [p.kind for p in plan_candidates(1_000_000, 768, parse_memory("300M"))] == ["ivf-pq"]
    assert [p.kind for p in plan_candidates(5_000_000, 64, parse_memory("64G"))][:2] == \
        ["flat", "ivf-flat"]                                           # no CPU HNSW past 2M rows


def test_candidates_small_store_gpu_and_budget_error() -> None:
    assert [p.kind for p in plan_candidates(EXACT_MAX_ROWS - 1, 768, parse_memory("8G"))] == ["flat"]
    gpu = plan_candidates(1_000_000, 768, parse_memory("8G"), gpus=1)
    assert {p.kind for p in gpu if p.gpu} == {"flat", "ivf-flat", "ivf-sq8", "ivf-pq"}  # no GPU HNSW
    assert [p.label for p in gpu if p.gpu][0] == "Flat (gpu)"
    with pytest.raises(BudgetError) as err:
        plan_candidates(1_000_000, 768, parse_memory("20M"))
    assert "\n" not in str(err.value) and "at least" in str(err.value)


def test_sample_size_rule() -> None:
    plans = plan_candidates(1_000_000, 768, parse_memory("8G"))
    assert sample_size(1_000_000, 1000, plans, 768, parse_memory("8G")) == 20 * 4096
    mid = plan_candidates(300_000, 768, parse_memory("8G"))             # nlist 2048
    assert sample_size(300_000, 1000, mid, 768, parse_memory("8G")) == SAMPLE_MIN
    huge = plan_candidates(100_000_000, 64, parse_memory("64G"))
    nlist = max(p.nlist for p in huge)
    assert sample_size(100_000_000, 1000, huge, 64, parse_memory("64G")) == 20 * nlist
    assert sample_size(30_000, 1000, plan_candidates(30_000, 64, 1 << 30), 64, 1 << 30) == 29_000
    assert sample_size(1_000_000, 1000, plans, 768, parse_memory("64M")) == (32 << 20) // (4 * 768)


def test_pick_fastest_meeting_target_ties_to_least_memory() -> None:
    rows = [{"recall": 1.0, "qps": 100.0, "memory_bytes": 50},
            {"recall": 0.97, "qps": 900.0, "memory_bytes": 40},
            {"recall": 0.96, "qps": 880.0, "memory_bytes": 10},    # within 5% of 900, smaller
            {"recall": 0.90, "qps": 5000.0, "memory_bytes": 1}]    # fastest, misses the target
    assert pick(rows, 0.95) == 2
    assert pick(rows[:2], 0.95) == 1
    assert pick(rows, 0.999) == 0
    assert pick(rows[1:], 0.999) == 0                            # none met: highest recall


def test_predicted_seconds_scales_only_the_scan() -> None:
    assert predicted_seconds("flat", 1.0, 0.0, 1_000_000, 100_000) == pytest.approx(10.0)
    assert predicted_seconds("ivf-flat", 1.0, 0.4, 1_000_000, 100_000) == pytest.approx(6.4)
    assert predicted_seconds("hnsw", 1.0, 0.0, 10**6, 10**3) == pytest.approx(2.0)
    assert predicted_seconds("ivf-pq", 1.0, 5.0, 10**6, 10**5) == pytest.approx(1.0)  # clamped
    assert predicted_seconds("flat", 1.0, 0.0, 1000, 1000) == 1.0


# ---------------------------------------------------------------- the measuring chooser

@pytest.fixture(scope="module")
def clustered_store(tmp_path_factory: pytest.TempPathFactory) -> FakeStore:
    return make_store(tmp_path_factory.mktemp("choose"), N, dim=64, n_clusters=200)


@pytest.fixture(scope="module")
def auto_built(clustered_store: FakeStore, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[FakeStore, object, list[int]]:
    """The auto index over a copy of the store, with the index size seen by every query."""
    import embedstore.index.choose as choose_mod
    from embedstore.index.stored import VectorIndex

    store = FakeStore(tmp_path_factory.mktemp("auto"), clustered_store._emb,
                      clustered_store._slides, clustered_store._labels)
    seen: list[int] = []
    real = VectorIndex.query

    def spy(self: VectorIndex, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        seen.append(self.ntotal)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(choose_mod, "SAMPLE_MIN", 20_000)     # a third of the store: a real prediction
        mp.setattr(VectorIndex, "query", spy)
        info = build_index(store, n_queries=500)
    return store, info, seen


def test_sample_recall_predicts_full_size_recall(auto_built: tuple) -> None:
    _, info, _ = auto_built
    assert 20_000 <= info.sample_size < N // 2
    chosen = [c for c in info.candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["label"] == info.factory
    sample, full = chosen[0]["recall"], chosen[0]["full_recall"]
    assert sample >= 0.95 and abs(sample - full) <= PREDICTION_TOLERANCE, (sample, full)
    assert info.recall_met and info.recall_at_10 >= 0.95


def test_auto_prefers_exact_codes_when_memory_allows(auto_built: tuple) -> None:
    store, info, _ = auto_built
    assert info.kind in ("hnsw", "ivf-flat", "ivf-sq8"), info.candidates
    kinds = [c["kind"] for c in info.candidates]
    assert kinds == ["flat", "hnsw", "ivf-flat", "ivf-sq8", "ivf-pq"]
    for c in info.candidates:
        assert c["recall"] > 0 and c["qps"] > 0 and c["memory_bytes"] > 0 and c["build_seconds"] >= 0
        assert {"label", "params", "sample_qps", "tune_seconds", "met"} <= set(c)
    met = [c for c in info.candidates if c["met"]]
    assert max(c["qps"] for c in met) <= 1.06 * next(c["qps"] for c in met if c["chosen"])
    saved = json.loads((store.path / "index" / "index.json").read_text())
    assert saved["candidates"] == info.candidates and saved["sample_size"] == info.sample_size
    q = store._emb[:50].astype(np.float32)
    assert all(len(h.ids) == 10 for h in search(store, vectors=q, k=10))


def test_recall_is_measured_on_queries_the_index_does_not_hold(auto_built: tuple) -> None:
    _, info, seen = auto_built
    assert info.n_covered == N and info.max_id == N - 1 and info.n_queries == 500
    assert seen and max(seen) == N - info.n_queries       # the queries joined only afterwards
    assert min(seen) == info.sample_size                  # sample indexes hold the sample only


def test_auto_takes_pq_when_the_budget_forbids_the_others(clustered_store: FakeStore,
                                                          tmp_path: Path) -> None:
    store = FakeStore(tmp_path / "s", clustered_store._emb, clustered_store._slides,
                      clustered_store._labels)
    info = build_index(store, memory_budget="5M", n_queries=300)
    assert info.kind == "ivf-pq" and info.k_factor > 1 and info.recall_met
    assert "only candidate that fits" in info.reason
    both = build_index(store, memory_budget="9M", n_queries=300)     # SQ8 and PQ fit
    assert [c["kind"] for c in both.candidates] == ["ivf-sq8", "ivf-pq"]


def test_kind_still_forces_one_and_cli_prints_the_table(auto_built: tuple, tmp_path: Path) -> None:
    from embedstore.cli.index import format_info

    store, info, _ = auto_built
    text = format_info(info, store.path)
    assert "candidates" in text and f"{info.sample_size:,}-row sample" in text
    assert all(c["label"] in text for c in info.candidates)
    assert sum(line.lstrip().startswith("*") for line in text.splitlines()) == 1
    small = make_store(tmp_path / "small", 25_000, dim=32, seed=3)
    forced = build_index(small, kind="ivf-sq8", n_queries=200)
    assert forced.kind == "ivf-sq8" and forced.factory.endswith(",SQ8") and forced.candidates == []
    assert "candidates" not in format_info(forced, small.path)

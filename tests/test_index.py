"""embedstore.index: planning (pure), exactness of Flat, recall of approximate kinds, update,
staleness, filters, tombstones and errors — over a small in-memory fake store."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest

from embedstore.errors import (BudgetError, DimensionMismatchError, VectorIndexError,
                               StaleIndexError, UnknownKeyError)
from embedstore.index import (build_index, exact_search, load_index, parse_memory, plan_index,
                              read_index_info, recall_at_k, search, update_index)
from embedstore.index.choose import FLAT_MAX_ROWS

TASK = "tissue"
BIG = 12_000                     # rows of the shared clustered store (64-d, 50 clusters)


class FakeStore:
    """The store API the index reads, over numpy arrays (rows are ids 0..n-1)."""

    def __init__(self, path: Path, emb: np.ndarray, slides: Sequence[str],
                 labels: Sequence[object] | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dtype = emb.dtype.type
        self.dim = emb.shape[1]
        self._emb = emb
        self._slides = np.asarray(slides, dtype=object)
        self._labels = np.asarray(labels if labels is not None else [None] * len(emb), object)
        self._deleted = np.zeros(len(emb), dtype=bool)
        self._keys = [f"{s}/{i}" for i, s in enumerate(self._slides)]
        self._key_to_id = {key: i for i, key in enumerate(self._keys)}

    def __len__(self) -> int:
        return int((~self._deleted).sum())

    @property
    def n_rows_committed(self) -> int:
        return len(self._emb)

    def append(self, emb: np.ndarray, slides: Sequence[str], labels: Sequence[object]) -> np.ndarray:
        start = len(self._emb)
        new = FakeStore(self.path, emb.astype(self._emb.dtype), slides, labels)
        self._emb = np.concatenate([self._emb, new._emb])
        self._slides = np.concatenate([self._slides, new._slides])
        self._labels = np.concatenate([self._labels, new._labels])
        self._deleted = np.concatenate([self._deleted, new._deleted])
        for i, s in enumerate(new._slides):
            key = f"{s}/{start + i}"
            self._keys.append(key)
            self._key_to_id[key] = start + i
        return np.arange(start, len(self._emb), dtype=np.int64)

    def delete(self, ids: np.ndarray) -> None:
        self._deleted[ids] = True

    def scan(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(self._emb), batch_size):
            ids = np.arange(s, min(s + batch_size, len(self._emb)), dtype=np.int64)
            ids = ids[~self._deleted[ids]]
            yield ids, self._emb[ids]

    def all_ids(self) -> np.ndarray:
        return np.nonzero(~self._deleted)[0].astype(np.int64)

    def _live(self, ids: np.ndarray) -> np.ndarray:
        """Like the real store: deleted or unknown ids raise UnknownKeyError."""
        ids = np.asarray(ids, dtype=np.int64)
        bad = (ids < 0) | (ids >= len(self._emb))
        bad[~bad] = self._deleted[ids[~bad]]
        if bad.any():
            raise UnknownKeyError(f"{int(bad.sum())} id(s) deleted or never committed")
        return ids

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self._emb[self._live(ids)]

    def ids(self, keys: Sequence[str]) -> np.ndarray:
        """Like the real store: a deleted key is unknown."""
        found = [self._key_to_id.get(key) for key in keys]
        for key, i in zip(keys, found):
            if i is None or self._deleted[i]:
                raise UnknownKeyError(f"unknown tile key {key!r}")
        return np.array(found, dtype=np.int64)

    def keys_of(self, ids: np.ndarray) -> list[str]:
        return [self._keys[i] for i in self._live(ids)]

    def metadata(self, ids: np.ndarray, columns: Sequence[str] = ("key", "slide", "x", "y", "label")
                 ) -> dict[str, np.ndarray]:
        ids = self._live(ids)
        cols = {"key": np.array(self.keys_of(ids), dtype=object), "slide": self._slides[ids],
                "x": ids * 224, "y": ids * 0, "label": self._labels[ids]}
        return {name: cols[name] for name in columns}

    def labels(self, keys: Sequence[str], task: str | None = None) -> np.ndarray:
        return self._labels[self.ids(keys)]

    def is_deleted(self, ids: np.ndarray) -> np.ndarray:
        return self._deleted[np.asarray(ids, dtype=np.int64)]


class StoreWithoutIsDeleted(FakeStore):
    """Tombstones visible only through all_ids() (the real store's reader today)."""

    is_deleted = None  # type: ignore[assignment]


def clustered(n: int, dim: int, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded clustered float16 vectors (cluster centre + low-rank spread + noise), cluster ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    basis = rng.normal(size=(8, dim)) / np.sqrt(8)
    z = rng.integers(0, n_clusters, size=n)
    emb = centres[z] + 0.7 * rng.normal(size=(n, 8)) @ basis + 0.25 * rng.normal(size=(n, dim))
    return emb.astype(np.float16), z


def make_store(path: Path, n: int, dim: int = 64, seed: int = 0, n_clusters: int = 50) -> FakeStore:
    emb, z = clustered(n, dim, n_clusters, seed)
    rng = np.random.default_rng(seed + 7)
    slides = [f"slide{(c * 3 + r) % 40:02d}" for c, r in zip(z, rng.integers(0, 3, n))]
    labels = np.array(["tumor", "stroma", "normal"], dtype=object)[z % 3]
    return FakeStore(path, emb, slides, labels)


def brute_force(store: FakeStore, q: np.ndarray, k: int, live_only: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: cosine scores over live rows, best first (stable on ties)."""
    x = store._emb.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = np.asarray(q, np.float32)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ x.T
    if live_only:
        scores[:, store._deleted] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def assert_same_ranking(ids: np.ndarray, scores: np.ndarray, ref_ids: np.ndarray,
                        ref_scores: np.ndarray) -> None:
    """Same ids in the same order, except where neighbouring reference scores tie."""
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    differ = ids != ref_ids
    assert np.all(np.abs(scores[differ] - ref_scores[differ]) < 1e-5), "ranking differs beyond ties"
    assert differ.mean() < 0.01


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> FakeStore:
    return make_store(tmp_path_factory.mktemp("big"), BIG)


# ---------------------------------------------------------------- planning (pure, no disk)

@pytest.mark.parametrize("n", [1_000, 50_000, FLAT_MAX_ROWS - 1])
def test_plan_picks_flat_below_threshold(n: int) -> None:
    plan = plan_index(n, 768, parse_memory("8G"), 0.95)
    assert plan.kind == "flat" and plan.factory == "Flat" and plan.train_size == 0


@pytest.mark.parametrize("n,target", [(FLAT_MAX_ROWS, 0.95), (1_000_000, 0.95),
                                      (1_000_000, 0.9), (1_000_000, 0.995), (5_000_000, 0.9)])
def test_plan_picks_approximate_above_threshold(n: int, target: float) -> None:
    plan = plan_index(n, 768, parse_memory("8G"), target)
    assert plan.kind != "flat"
    assert plan.memory_bytes + plan.train_bytes <= parse_memory("8G")
    if plan.kind == "ivf-pq":
        assert plan.rerank_k >= 10 and plan.nlist > 0 and 768 % plan.m == 0
    if target >= 0.99:
        assert plan.kind == "ivf-flat"


def test_plan_for_one_million_matches_autofaiss_shape() -> None:
    plan = plan_index(1_000_000, 768, parse_memory("8G"), 0.95)
    assert plan.factory == "IVF4096,PQ64np" and plan.rerank_k == 100
    assert plan.memory_bytes < 200 * 2**20           # codes + ids + centroids, not the vectors
    assert plan.train_size <= 1 << 18                 # sampled, never the whole matrix


def test_plan_respects_budget_by_shrinking() -> None:
    roomy = plan_index(1_000_000, 768, parse_memory("8G"), 0.95)
    tight = plan_index(1_000_000, 768, parse_memory("200M"), 0.95)
    assert tight.memory_bytes + tight.train_bytes <= parse_memory("200M")
    assert (tight.m, tight.train_size) < (roomy.m, roomy.train_size)
    # flat does not fit 100 MB for 99k x 768 float32, so auto falls back to a compressed index
    assert plan_index(99_000, 768, parse_memory("100M"), 0.95).kind == "ivf-pq"


def test_plan_budget_error_is_one_line_with_minimum() -> None:
    with pytest.raises(BudgetError) as err:
        plan_index(1_000_000, 768, parse_memory("20M"), 0.95)
    msg = str(err.value)
    assert "\n" not in msg and "at least" in msg and "20.0 MB" in msg
    with pytest.raises(BudgetError, match="kind=hnsw"):
        plan_index(1_000_000, 768, parse_memory("1G"), 0.95, kind="hnsw")


def test_plan_odd_dim_uses_opq_and_bad_inputs() -> None:
    plan = plan_index(500_000, 100, parse_memory("8G"), 0.95, kind="ivf-pq")
    assert plan.factory.startswith("OPQ8_96,IVF2048,PQ8")
    huge = plan_index(400_000_000, 768, parse_memory("64G"), 0.95)
    assert huge.factory.startswith("IVF65536_HNSW32,")   # graph quantizer only for huge nlist
    with pytest.raises(VectorIndexError, match="unknown index kind"):
        plan_index(10, 8, 1 << 30, 0.95, kind="annoy")
    with pytest.raises(VectorIndexError, match="cannot read memory budget"):
        parse_memory("lots")
    assert parse_memory("1.5G") == int(1.5 * 2**30) and parse_memory("512MiB") == 512 * 2**20


def test_two_level_centroids_cover_the_data() -> None:
    from embedstore.index._kmeans import _split, two_level_centroids

    counts = _split(np.array([500, 0, 3, 97]), 64)
    assert counts.sum() == 64 and counts[1] == 0 and counts[2] <= 3
    emb, _ = clustered(8_000, 32, 40, seed=14)
    x = emb.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cent = two_level_centroids(x, 256, seed=0)
    assert cent.shape == (256, 32) and np.allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-5)
    lists = np.argmax(x @ cent.T, axis=1)
    sizes = np.bincount(lists, minlength=256)
    assert (sizes > 0).mean() > 0.9 and sizes.max() < 10 * len(x) / 256


def test_tune_stops_at_first_setting_meeting_target() -> None:
    from embedstore.index.recall import tune

    plan = plan_index(1_000_000, 768, parse_memory("8G"), 0.95)
    truth = np.arange(50 * 10).reshape(50, 10)
    calls: list[dict] = []

    def run(q: np.ndarray, k: int, params: dict) -> np.ndarray:
        calls.append(params)
        # recall grows with nprobe and with re-rank depth; flat for the first two settings
        hits = min(10, max(2, params["nprobe"].bit_length()) + params["k_factor"] // 10)
        found = truth.copy()
        found[:, hits:] = -1
        return found

    tuned = tune(run, plan, np.zeros((50, 768), np.float32), truth, 0.95)
    assert tuned.met and tuned.recall == 1.0
    for k_factor, first_met in zip(plan.k_factors, (512, 256, 128, 32)):
        swept = [c["nprobe"] for c in tuned.curve if c["k_factor"] == k_factor]
        assert not swept or swept[-1] == first_met      # each sweep stops at its first success
    winners = [c for c in tuned.curve if c["recall"] >= 0.95]
    assert tuned.qps == max(c["qps"] for c in winners)


# ---------------------------------------------------------------- exact search

def test_exact_search_streams_and_matches_numpy(big: FakeStore) -> None:
    q = np.random.default_rng(1).normal(size=(25, big.dim)).astype(np.float32)
    scores, ids = exact_search(big, q, k=10, batch_size=1_000)   # 20 batches merged by heap
    ref_scores, ref_ids = brute_force(big, q, 10)
    assert_same_ranking(ids, scores, ref_ids, ref_scores)
    assert recall_at_k(ids, ref_ids) == 1.0


def test_flat_index_equals_numpy_brute_force(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", 6_000, dim=32, seed=3)
    assert search(store, ids=[5])[0].method.startswith("exact scan (no index")
    info = build_index(store)                          # auto -> flat below 100k rows
    assert info.kind == "flat" and info.recall_at_10 == 1.0 and info.n_covered == 6_000
    q = np.random.default_rng(2).normal(size=(40, 32)).astype(np.float32)
    hits = search(store, vectors=q, k=10)
    ref_scores, ref_ids = brute_force(store, q, 10)
    assert_same_ranking(np.stack([h.ids for h in hits]), np.stack([h.scores for h in hits]),
                        ref_ids, ref_scores)
    assert all(h.method.startswith("index Flat") for h in hits)
    assert hits[0].scores.dtype == np.float32 and hits[0].ids.dtype == np.int64
    assert hits[0].keys == store.keys_of(hits[0].ids)
    assert list(hits[0].meta["slide"]) == [k.split("/")[0] for k in hits[0].keys]


# ---------------------------------------------------------------- approximate kinds

@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat", "ivf-pq", "ivf-pq two-level"])
def test_approximate_kind_reaches_reported_recall(big: FakeStore, tmp_path: Path, kind: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if kind.endswith("two-level"):   # the path 1M-row stores take (nlist >= 1024)
        import embedstore.index.build as build_mod
        monkeypatch.setattr(build_mod, "TWO_LEVEL_MIN_LISTS", 64)
        kind = kind.split()[0]
    store = FakeStore(tmp_path / kind, big._emb, big._slides, big._labels)
    info = build_index(store, kind=kind, target_recall=0.95, n_queries=300)
    assert info.kind == kind and info.recall_met and info.recall_at_10 >= 0.95
    assert info.curve and info.qps > 0
    saved = json.loads((store.path / "index" / "index.json").read_text())
    assert saved["recall_at_10"] == info.recall_at_10 and saved["params"] == info.params
    assert saved["n_rows_committed"] == BIG and (store.path / "index" / info.file).exists()
    if kind == "ivf-pq":
        assert info.k_factor > 1                       # PQ alone is re-ranked exactly
        assert info.curve[0]["recall"] < info.recall_at_10
    # independent check on other queries: perturbed stored vectors, numpy ground truth
    rng = np.random.default_rng(11)
    q = big._emb[rng.choice(BIG, 300, replace=False)].astype(np.float32)
    q += 0.05 * rng.normal(size=q.shape).astype(np.float32)
    hits = search(store, vectors=q, k=10)
    _, ref_ids = brute_force(store, q, 10)
    measured = recall_at_k(np.stack([h.ids for h in hits]), ref_ids)
    assert measured >= info.recall_at_10 - 0.03, (measured, info.recall_at_10)


def test_query_by_key_finds_itself_first_unless_excluded(big: FakeStore, tmp_path: Path) -> None:
    store = FakeStore(tmp_path / "s", big._emb, big._slides, big._labels)
    build_index(store, kind="ivf-pq", n_queries=200)
    keys = store.keys_of(np.arange(0, BIG, 997))
    for hit, key in zip(search(store, keys=keys, k=5), keys):
        assert hit.keys[0] == key and abs(hit.scores[0] - 1.0) < 1e-3 and len(hit.ids) == 5
        assert np.all(np.diff(hit.scores) <= 1e-6)
    for hit, key in zip(search(store, keys=keys, k=5, exclude_self=True), keys):
        assert key not in hit.keys and len(hit.ids) == 5
    with pytest.raises(UnknownKeyError):
        search(store, keys=["nope/1"])


# ---------------------------------------------------------------- update and staleness

@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_update_adds_new_rows_without_retraining(tmp_path: Path, kind: str) -> None:
    store = make_store(tmp_path / "s", 5_000, seed=4)
    info = build_index(store, kind=kind, n_queries=200)
    new_emb, _ = clustered(300, 64, 5, seed=99)       # new clusters the index has not seen
    new_ids = store.append(new_emb, ["newslide"] * 300, ["tumor"] * 300)
    with pytest.raises(StaleIndexError, match=r"covers 5,000 of 5,300 rows; run `embedstore index"):
        search(store, ids=[0])
    with pytest.raises(StaleIndexError):
        load_index(store)
    updated = update_index(store)
    assert updated.n_covered == 5_300 and updated.max_id == 5_299 and updated.n_added == 300
    assert updated.factory == info.factory and updated.params == info.params
    hits = search(store, ids=new_ids[::50], k=3)
    assert [h.ids[0] for h in hits] == list(new_ids[::50])
    assert all(set(h.meta["slide"]) == {"newslide"} for h in hits)
    assert update_index(store).n_covered == 5_300     # nothing new: a no-op
    assert len(list((store.path / "index").glob("*.faiss"))) == 1


# ---------------------------------------------------------------- filters and tombstones

@pytest.fixture(scope="module")
def pq_store(big: FakeStore, tmp_path_factory: pytest.TempPathFactory) -> FakeStore:
    store = FakeStore(tmp_path_factory.mktemp("pq"), big._emb, big._slides, big._labels)
    build_index(store, kind="ivf-pq", n_queries=200)
    return store


@pytest.mark.parametrize("with_index", [True, False])
def test_exclude_same_slide_never_returns_same_slide(pq_store: FakeStore,
                                                     with_index: bool) -> None:
    qids = np.arange(3, BIG, 401)
    hits = search(pq_store, ids=qids, k=10, exclude_same_slide=True, exact=not with_index)
    for hit, qid in zip(hits, qids):
        assert len(hit.ids) == 10 and qid not in hit.ids
        assert pq_store._slides[qid] not in set(hit.meta["slide"])
    plain = search(pq_store, ids=qids, k=10)           # same-slide neighbours do exist
    assert any(pq_store._slides[q] in set(h.meta["slide"][1:]) for h, q in zip(plain, qids))


def test_label_and_slide_filters(pq_store: FakeStore) -> None:
    q = pq_store._emb[:30].astype(np.float32)
    for hit in search(pq_store, vectors=q, k=10, label="tumor", task=TASK):
        assert len(hit.ids) == 10 and set(hit.meta["label"]) == {"tumor"}
    wanted = {"slide07", "slide21"}
    for hit in search(pq_store, vectors=q, k=10, slides=wanted):
        assert len(hit.ids) == 10 and set(hit.meta["slide"]) <= wanted
    with pytest.raises(VectorIndexError, match="exclude_same_slide needs queries given by id"):
        search(pq_store, vectors=q, exclude_same_slide=True)


def test_selective_filter_falls_back_to_exact(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", 8_000, seed=5)
    rare = np.array([17, 4_000, 7_999])
    store._labels[rare] = "mitosis"
    build_index(store, kind="ivf-flat", n_queries=100)
    hit = search(store, vectors=store._emb[:1].astype(np.float32), k=10, label="mitosis")[0]
    assert sorted(hit.ids.tolist()) == rare.tolist()   # all there are, fewer than k
    assert "exact scan" in hit.method or "IVF" in hit.method


@pytest.mark.parametrize("kind,is_deleted_api", [("flat", True), ("ivf-pq", True), (None, True),
                                                 ("ivf-pq", False), ("hnsw", False)])
def test_deleted_ids_never_returned(tmp_path: Path, kind: str | None,
                                    is_deleted_api: bool) -> None:
    store = make_store(tmp_path / "s", 6_000, seed=6)
    if not is_deleted_api:
        store.__class__ = StoreWithoutIsDeleted
    if kind:
        build_index(store, kind=kind, n_queries=100)
    q = store._emb[:20].astype(np.float32)
    _, before = brute_force(store, q, 10)
    gone = np.unique(before[:, :5])                    # the best neighbours disappear
    store.delete(gone)
    hits = search(store, vectors=q, k=10)
    for hit in hits:
        assert len(hit.ids) == 10 and not np.isin(hit.ids, gone).any()
    _, ref_ids = brute_force(store, q, 10)
    assert recall_at_k(np.stack([h.ids for h in hits]), ref_ids) >= 0.9


# ---------------------------------------------------------------- errors and files

def test_errors_are_one_line(tmp_path: Path, big: FakeStore) -> None:
    store = make_store(tmp_path / "s", 500, seed=8)
    with pytest.raises(DimensionMismatchError, match="dim 63 .* dim 64") as err:
        search(store, vectors=np.ones(63, np.float32))
    assert "\n" not in str(err.value)
    empty = FakeStore(tmp_path / "empty", np.zeros((0, 64), np.float16), [])
    with pytest.raises(VectorIndexError, match="holds no rows"):
        build_index(empty)
    with pytest.raises(VectorIndexError, match="holds no rows"):
        search(empty, vectors=np.ones(64, np.float32))
    with pytest.raises(BudgetError, match="at least"):
        build_index(store, memory_budget="10K")
    with pytest.raises(VectorIndexError, match="no index in"):
        load_index(store)
    with pytest.raises(VectorIndexError, match="unknown metric"):
        build_index(store, metric="l2")


def test_gpu_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    store = make_store(tmp_path / "s", 500, seed=9)
    with pytest.raises(VectorIndexError, match="faiss sees no GPU"):
        build_index(store, gpu=True)


def test_rebuild_replaces_files_and_drops_partials(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", 2_000, seed=10)
    (store.path / "index").mkdir()
    (store.path / "index" / "index-dead.faiss.partial").write_bytes(b"crash leftovers")
    first = build_index(store)
    second = build_index(store, kind="hnsw", n_queries=100)
    files = sorted(p.name for p in (store.path / "index").iterdir())
    assert files == sorted([second.file, "index.json"]) and first.file != second.file
    assert read_index_info(store) == second


# ---------------------------------------------------------------- index.json and faiss files are untrusted

def _rewrite_info(store: FakeStore, **changes: object) -> dict:
    path = store.path / "index" / "index.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))
    return meta


@pytest.fixture()
def faiss_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path handed to faiss.read_index during the test."""
    import faiss

    seen: list[str] = []
    real = faiss.read_index

    def read(path: str, *args: object) -> object:
        seen.append(str(path))
        return real(path, *args)

    monkeypatch.setattr(faiss, "read_index", read)
    return seen


@pytest.mark.parametrize("name", ["../outside.faiss", "/tmp/outside.faiss", "sub/index-0123456789ab.faiss",
                                  "index-0123456789ab.faiss/../../outside.faiss", "..", "", "index.faiss",
                                  "index-0123456789ab.faiss\\x"])
def test_index_json_cannot_point_faiss_outside_the_index_dir(tmp_path: Path, faiss_reads: list[str],
                                                               name: str) -> None:
    store = make_store(tmp_path / "s", 500, seed=14)
    info = build_index(store)
    (tmp_path / "s" / "outside.faiss").write_bytes((store.path / "index" / info.file).read_bytes())
    _rewrite_info(store, file=name)
    with pytest.raises(VectorIndexError, match="not a plain index-<token>.faiss name") as err:
        load_index(store)
    assert "\n" not in str(err.value) and "embedstore index" in str(err.value)
    with pytest.raises(VectorIndexError, match="refusing to read it"):
        search(store, vectors=store._emb[:1].astype(np.float32))
    assert faiss_reads == []                 # faiss never saw the path index.json named


def test_index_file_that_is_a_link_is_refused(tmp_path: Path, faiss_reads: list[str]) -> None:
    store = make_store(tmp_path / "s", 500, seed=15)
    info = build_index(store)
    outside = tmp_path / "elsewhere.faiss"
    (store.path / "index" / info.file).rename(outside)
    (store.path / "index" / info.file).symlink_to(outside)
    with pytest.raises(VectorIndexError, match="is a link"):
        load_index(store)
    assert faiss_reads == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "garbage-recorded-size"])
def test_damaged_faiss_file_is_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    store = make_store(tmp_path / "s", 500, seed=16)
    info = build_index(store)
    path = store.path / "index" / info.file
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "garbage": rng.bytes(4096),
                      "garbage-recorded-size": rng.bytes(len(data))}[damage])
    if damage == "garbage":
        _rewrite_info(store, memory_bytes=0)              # an index.json without a size
    with pytest.raises(VectorIndexError) as err:
        search(store, vectors=store._emb[:1].astype(np.float32))
    msg = str(err.value)
    assert "\n" not in msg and info.file in msg and f"embedstore index {store.path}" in msg, msg


@pytest.mark.parametrize("changes", [{"dim": "64"}, {"n_covered": None}, {"params": []},
                                     {"file": 7}, {"recall_at_10": "high"}])
def test_index_json_with_wrong_types_is_one_line(tmp_path: Path, changes: dict) -> None:
    store = make_store(tmp_path / "s", 500, seed=17)
    build_index(store)
    _rewrite_info(store, **changes)
    with pytest.raises(VectorIndexError, match=f"unreadable .*index.json: field '{next(iter(changes))}'"):
        read_index_info(store)
    (store.path / "index" / "index.json").write_text("[1, 2]")
    with pytest.raises(VectorIndexError, match="unreadable .*not an object"):
        load_index(store)


def test_faiss_file_of_another_dim_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", 500, seed=18)
    info = build_index(store)
    other = make_store(tmp_path / "o", 500, dim=32, seed=18)
    other_info = build_index(other)
    (store.path / "index" / info.file).write_bytes((other.path / "index" / other_info.file).read_bytes())
    _rewrite_info(store, memory_bytes=other_info.memory_bytes)
    with pytest.raises(VectorIndexError, match="of dim 32 but index.json says 500 of dim 64"):
        load_index(store)


# ---------------------------------------------------------------- CLI bodies

def test_cli_bodies_print_text_and_json(tmp_path: Path) -> None:
    from embedstore.cli.index import format_info, format_results, results_json
    from embedstore.index.jobs import index_command, search_command

    store = make_store(tmp_path / "s", 1_500, seed=12)
    text = format_info(index_command(store), store.path)
    assert "Flat" in text and "recall@10" in text and "1,500" in text
    key = store.keys_of(np.array([42]))[0]
    run = search_command(store, key=key, k=3, exclude_same_slide=True)
    table = format_results(run.hits, run.queries)
    assert key not in table.splitlines()[2] and "index Flat" in table
    vec = tmp_path / "q.npy"
    np.save(vec, store._emb[:2].astype(np.float32))
    run = search_command(store, vector_file=vec, k=4, label="tumor", gallery=tmp_path / "g.png")
    out = json.loads(json.dumps(results_json(run.hits, run.queries)))
    assert len(out) == 2 and all(len(q["neighbours"]) == 4 for q in out)
    assert {n["label"] for q in out for n in q["neighbours"]} == {"tumor"}
    assert (tmp_path / "g.png").stat().st_size > 0
    with pytest.raises(VectorIndexError, match="exactly one"):
        search_command(store, k=3)


# ---------------------------------------------------------------- the real store

def test_real_store_build_search_delete_grow(tmp_path: Path) -> None:
    store_mod = pytest.importorskip("embedstore.store")
    emb, z = clustered(3_000, 32, 20, seed=13)
    slides = np.array([f"s{c % 7}" for c in z], dtype=object)
    labels = np.array(["tumor", "normal"], dtype=object)[z % 2]
    path = tmp_path / "store"

    def write(lo: int, hi: int) -> None:
        with store_mod.StoreWriter(path, store_mod.StoreMeta(dim=32, dtype="float16"),
                                   rows_per_shard=1_000) as w:
            for s in range(lo, hi, 500):
                e = min(hi, s + 500)
                w.add(emb[s:e], [f"{slides[i]}/{i}" for i in range(s, e)], unit=f"u{s}",
                      slide=list(slides[s:e]), x=list(range(s, e)), y=0, label=list(labels[s:e]))
                w.end_unit(f"u{s}")

    write(0, 2_500)
    store = store_mod.open_store(path)
    info = build_index(store, kind="ivf-pq", n_queries=200)
    assert info.n_covered == 2_500 and info.recall_met
    key = "s3/" + str(int(np.nonzero(slides == "s3")[0][0]))
    hit = search(store, keys=[key], k=5)[0]
    assert hit.keys[0] == key and hit.meta["slide"][0] == "s3"
    other = search(store, keys=[key], k=5, exclude_same_slide=True, label="tumor")[0]
    assert "s3" not in set(other.meta["slide"]) and set(other.meta["label"]) == {"tumor"}
    gone = hit.keys[1:3]
    store_mod.delete(path, keys=gone)
    store = store_mod.open_store(path)
    assert not set(gone) & set(search(store, keys=[key], k=10)[0].keys)
    write(2_500, 3_000)
    store = store_mod.open_store(path)
    with pytest.raises(StaleIndexError, match="2,500 of 3,000"):
        search(store, keys=[key])
    assert update_index(store).n_covered == 3_000
    assert search(store, keys=[f"{slides[2999]}/2999"], k=1)[0].ids[0] == 2_999

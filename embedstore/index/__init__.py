"""FAISS index over a store: plan (pure), build/update, measure recall, search with filters.

    info = build_index(store)       # auto: candidates measured on a sample, 8G, recall@10 >= 0.95
    hits = search(store, keys=["slide1/0_0"], k=10, exclude_same_slide=True)

FAISS ids are the store's tile ids; the index lives in ``store.path / "index"``.
"""
from __future__ import annotations

from embedstore.index.build import build_index, update_index
from embedstore.index.choose import IndexPlan, parse_memory, plan_candidates, plan_index
from embedstore.index.recall import exact_search, recall_at_k
from embedstore.index.search import SearchResult, search
from embedstore.index.stored import IndexInfo, VectorIndex, load_index, read_index_info

__all__ = [
    "build_index", "update_index", "load_index", "read_index_info", "search", "exact_search",
    "plan_index", "plan_candidates", "parse_memory", "recall_at_k", "IndexPlan", "IndexInfo", "SearchResult",
    "VectorIndex",
]

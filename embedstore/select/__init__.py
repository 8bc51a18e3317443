"""Backbone selection by a proxy task: kNN over each candidate's embeddings of a labelled set.

``proxy``: the configuration, the proxy set and the run; ``folds``: grouped, stratified folds;
``knn``: the kNN classifier and its fold scores; ``stream``: the same fold scores over rows read
from the store past the memory budget; ``ranking``: the ranked result and its statistics.
"""
from __future__ import annotations

from .folds import plan_folds
from .knn import KnnClassifier, KnnConfig, fold_scores
from .proxy import ProxySet, SelectConfig, read_proxy, select_backbones
from .ranking import Candidate, SelectionResult, seed_noise_notes, spearman

__all__ = ["SelectConfig", "ProxySet", "read_proxy", "plan_folds", "select_backbones",
           "KnnConfig", "KnnClassifier", "fold_scores", "SelectionResult", "Candidate", "spearman",
           "seed_noise_notes"]

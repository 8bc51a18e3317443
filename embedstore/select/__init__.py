"""Backbone selection by a proxy task: kNN over each candidate's embeddings of a labelled set."""
from __future__ import annotations

from .knn import KnnConfig, fold_scores
from .proxy import SelectConfig, SelectionResult, select_backbones

__all__ = ["KnnConfig", "fold_scores", "SelectConfig", "SelectionResult", "select_backbones"]

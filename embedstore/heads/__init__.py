"""Classification heads over stored embeddings: train in seconds, tune, save, predict.

Array level (no store needed): ``train_head``, ``evaluate``, ``run_seeds``, ``cross_validate``,
``sweep``. Store level: ``labelled_set``, ``gather_features``, ``view_bank``, ``SlideBagDataset``,
``predict_store``; past a memory budget, ``LazyRows`` / ``LazyViews`` (``heads.stream``) stand in
for the gathered arrays and ``train_head`` reads them as it trains. On disk: ``save_head`` / ``load_head``.
"""
from __future__ import annotations

from .data import LabelledSet, SlideBagDataset, gather_features, labelled_set, view_bank
from .crossval import SeedReport, cross_validate, run_seeds
from .models import HeadConfig
from .persist import check_fingerprint, load_head, save_head
from ..plots import render_heatmap
from .predict import HeatmapSpec, predict_store
from .stream import LazyRows, LazyViews
from .tuning import DEFAULT_SPACE, SweepResult, sweep
from .train import TrainedHead, evaluate, train_head

__all__ = [
    "HeadConfig", "TrainedHead", "train_head", "evaluate", "run_seeds", "cross_validate",
    "SeedReport", "sweep", "SweepResult", "DEFAULT_SPACE", "save_head", "load_head",
    "check_fingerprint", "predict_store", "HeatmapSpec", "render_heatmap", "LabelledSet",
    "labelled_set", "gather_features", "view_bank", "SlideBagDataset", "LazyRows", "LazyViews",
]

"""The classic baselines (most popular, item-kNN, EASE, SASRec+) on the same split and metric code as `evaluate`."""

from onerec.baselines.ease import EASEConfig, ease_weights
from onerec.baselines.itemknn import ItemKNNConfig, itemknn_similarity
from onerec.baselines.popular import popularity_scores
from onerec.baselines.protocol import HeldOut, TrainMatrix, evaluate_scorer, held_out, top_k, train_matrix
from onerec.baselines.suite import NAMES, BaselinesConfig, run_baselines

__all__ = [
    "NAMES",
    "BaselinesConfig",
    "EASEConfig",
    "HeldOut",
    "ItemKNNConfig",
    "TrainMatrix",
    "ease_weights",
    "evaluate_scorer",
    "held_out",
    "itemknn_similarity",
    "popularity_scores",
    "run_baselines",
    "top_k",
    "train_matrix",
]

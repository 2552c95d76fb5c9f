"""Ranking metrics (CMC, mAP, mINP), distances and k-reciprocal re-ranking, usable on their own."""

from cgpn.metrics.rank import RankResult, evaluate, evaluate_features, pairwise_distance
from cgpn.metrics.rerank import rerank

__all__ = ["RankResult", "evaluate", "evaluate_features", "pairwise_distance", "rerank"]

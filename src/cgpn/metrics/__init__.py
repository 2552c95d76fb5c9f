"""Ranking metrics (CMC, mAP, mINP) and distances, usable on their own."""

from cgpn.metrics.rank import RankResult, evaluate, pairwise_distance

__all__ = ["RankResult", "evaluate", "pairwise_distance"]

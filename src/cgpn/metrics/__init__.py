"""Ranking metrics (CMC, mAP, mINP) and distances, usable on their own.

Re-ranking lives in ``cgpn.metrics.rerank`` (``from cgpn.metrics.rerank import rerank``); it is not
re-exported here so that the name keeps meaning the module.
"""

from cgpn.metrics.rank import RankResult, evaluate, evaluate_features, pairwise_distance

__all__ = ["RankResult", "evaluate", "evaluate_features", "pairwise_distance"]

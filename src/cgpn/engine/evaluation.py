"""Evaluate a model on a data set's query and gallery: features, distances, CMC / mAP / mINP."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cgpn.config import Config
from cgpn.data.datasets.base import ReidDataset
from cgpn.data.loader import build_test_loader
from cgpn.engine.inference import extract_features
from cgpn.metrics.rank import RankResult, evaluate, evaluate_features, pairwise_distance

__all__ = ["SPLIT_NAMES", "TestFeatures", "evaluate_model", "rank_test_features", "ranking_distances", "test_features"]


@dataclass
class TestFeatures:
    """Query and gallery features with their identities and cameras."""

    qf: torch.Tensor
    gf: torch.Tensor
    q_pids: np.ndarray
    g_pids: np.ndarray
    q_camids: np.ndarray
    g_camids: np.ndarray


def test_features(model: nn.Module, dataset: ReidDataset, cfg: Config, device: torch.device,
                  split: str = "test") -> TestFeatures:
    """Features of the query and gallery images of ``split`` (``test``, or ``val``: the validation split
    held out of the training identities), with their identities and cameras."""
    query, gallery = dataset.split(split)
    qf, q_pids, q_camids = extract_features(model, build_test_loader(query, cfg.data), device,
                                            flip=cfg.test.flip, desc=f"{split} query")
    gf, g_pids, g_camids = extract_features(model, build_test_loader(gallery, cfg.data), device,
                                            flip=cfg.test.flip, desc=f"{split} gallery")
    return TestFeatures(qf, gf, q_pids, g_pids, q_camids, g_camids)


def ranking_distances(t: TestFeatures, cfg: Config) -> torch.Tensor:
    """The (num_query, num_gallery) distances the ranking uses: ``test.distance`` between the features, or
    their k-reciprocal re-ranking (Zhong et al. 2017) when ``test.rerank`` is set (never both in memory)."""
    c = cfg.test
    if not c.rerank:
        return pairwise_distance(t.qf, t.gf, c.distance)
    from cgpn.metrics.rerank import rerank  # scipy.sparse: loaded only when re-ranking

    return rerank(t.qf, t.gf, k1=c.rerank_k1, k2=c.rerank_k2, lambda_value=c.rerank_lambda, metric=c.distance,
                  memory_mb=c.memory_mb)


def rank_test_features(t: TestFeatures, cfg: Config, distmat: torch.Tensor | None = None) -> RankResult:
    """CMC / mAP / mINP of test features under ``cfg.test`` (``distmat``: ``ranking_distances(t, cfg)``
    if already computed)."""
    c = cfg.test
    if distmat is None and not c.rerank:  # blockwise: the whole distance matrix is never held
        return evaluate_features(t.qf, t.gf, t.q_pids, t.g_pids, t.q_camids, t.g_camids, metric=c.distance,
                                 max_rank=c.max_rank, ap_mode=c.ap_mode, memory_mb=c.memory_mb)
    distmat = ranking_distances(t, cfg) if distmat is None else distmat
    return evaluate(distmat, t.q_pids, t.g_pids, t.q_camids, t.g_camids, max_rank=c.max_rank,
                    ap_mode=c.ap_mode, memory_mb=c.memory_mb)


def evaluate_model(model: nn.Module, dataset: ReidDataset, cfg: Config, device: torch.device,
                   split: str = "test") -> RankResult:
    """CMC / mAP / mINP of ``model`` on ``dataset``'s query and gallery of ``split`` under ``cfg.test``."""
    return rank_test_features(test_features(model, dataset, cfg, device, split), cfg)


SPLIT_NAMES = {"test": "test split", "val": "validation split"}  # how reports name where a figure comes from

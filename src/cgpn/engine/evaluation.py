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
from cgpn.metrics.rank import RankResult, evaluate, pairwise_distance

__all__ = ["TestFeatures", "evaluate_model", "test_features"]


@dataclass
class TestFeatures:
    """Query and gallery features with their identities and cameras, and the distances between them."""

    qf: torch.Tensor
    gf: torch.Tensor
    q_pids: np.ndarray
    g_pids: np.ndarray
    q_camids: np.ndarray
    g_camids: np.ndarray
    distmat: torch.Tensor


def test_features(model: nn.Module, dataset: ReidDataset, cfg: Config, device: torch.device) -> TestFeatures:
    """Features of the query and gallery images and their (num_query, num_gallery) distances."""
    qf, q_pids, q_camids = extract_features(model, build_test_loader(dataset.query, cfg.data), device,
                                            flip=cfg.test.flip, desc="query")
    gf, g_pids, g_camids = extract_features(model, build_test_loader(dataset.gallery, cfg.data), device,
                                            flip=cfg.test.flip, desc="gallery")
    distmat = pairwise_distance(qf, gf, cfg.test.distance)
    return TestFeatures(qf, gf, q_pids, g_pids, q_camids, g_camids, distmat)


def evaluate_model(model: nn.Module, dataset: ReidDataset, cfg: Config, device: torch.device) -> RankResult:
    """CMC / mAP / mINP of ``model`` on ``dataset``'s query and gallery under ``cfg.test``."""
    t = test_features(model, dataset, cfg, device)
    return evaluate(t.distmat, t.q_pids, t.g_pids, t.q_camids, t.g_camids, max_rank=cfg.test.max_rank)

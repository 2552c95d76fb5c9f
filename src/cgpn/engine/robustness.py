"""Rank-1 / mAP as the query images are more and more occluded (``cgpn eval --occlude``).

The gallery stays clean (its features are computed once); the queries are occluded by
``cgpn.data.occlusion`` at each rate, deterministically, so two models are compared on the same images.
"""

from __future__ import annotations

import torch
from torch import nn

from cgpn.config import Config
from cgpn.data.datasets.base import ReidDataset
from cgpn.data.loader import build_test_loader
from cgpn.data.occlusion import OccludedImages
from cgpn.data.transforms import build_transforms
from cgpn.engine.evaluation import TestFeatures, rank_test_features
from cgpn.engine.inference import extract_features
from cgpn.metrics.rank import RankResult

__all__ = ["evaluate_occlusion", "occlusion_table"]


def evaluate_occlusion(model: nn.Module, dataset: ReidDataset, cfg: Config, device: torch.device,
                       rates: list[float], split: str = "test") -> dict[float, RankResult]:
    """Evaluation of ``split`` (test or val) at occlusion rate 0 (clean) and at each of ``rates``, keyed by
    rate, in rising order."""
    query, gallery = dataset.split(split)
    gf, g_pids, g_camids = extract_features(model, build_test_loader(gallery, cfg.data), device,
                                            flip=cfg.test.flip, desc="gallery")
    transform = build_transforms(cfg.data, train=False)
    results = {}
    for rate in sorted({0.0, *rates}):
        loader = build_test_loader(OccludedImages(query, transform, rate, seed=cfg.engine.seed), cfg.data)
        qf, q_pids, q_camids = extract_features(model, loader, device, flip=cfg.test.flip,
                                                desc=f"query, occlusion {rate:g}")
        t = TestFeatures(qf, gf, q_pids, g_pids, q_camids, g_camids)
        results[rate] = rank_test_features(t, cfg)  # re-ranked / Market AP when cfg.test says so
    return results


def occlusion_table(results: dict[float, RankResult]) -> str:
    """A text table: one row per rate with Rank-1, mAP and their change from the clean queries."""
    clean = results.get(0.0)
    lines = ["occluded | Rank-1 |   mAP | dRank-1 |  dmAP", "---------+--------+-------+---------+------"]
    for rate, r in results.items():
        d1 = 100 * (r.rank(1) - clean.rank(1)) if clean else float("nan")
        dm = 100 * (r.mAP - clean.mAP) if clean else float("nan")
        lines.append(f"{100 * rate:7.0f}% | {100 * r.rank(1):6.1f} | {100 * r.mAP:5.1f} | {d1:+7.1f} | {dm:+5.1f}")
    return "\n".join(lines)

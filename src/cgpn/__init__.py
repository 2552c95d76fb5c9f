"""cgpn: person re-identification with CGPN (Mao et al., arXiv 2010.07675).

The short API::

    from cgpn import FeatureExtractor, build_model, evaluate, load_config, train
    model = build_model("cgpn", num_classes=751)          # the network of Fig. 2
    result = evaluate(distmat, q_pids, g_pids, q_camids, g_camids)
    print(result.summary())
    feats = FeatureExtractor("runs/demo/last.pt")(["a.jpg", "b.jpg"])   # (2, 3072), unit length
    tracker.embedder = TrackerEmbedder("runs/demo/last.pt")            # deep-sort-realtime; BoxMOT: reid_model=
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> module defining it. Imported on first use, so that ``import cgpn`` (and ``cgpn --help``)
# does not load torch, torchvision, onnx and faiss up front.
_EXPORTS = {
    "CGPN": "cgpn.model",
    "CGPNLoss": "cgpn.losses",
    "CgpnError": "cgpn.errors",
    "Config": "cgpn.config",
    "FeatureExtractor": "cgpn.extractor",
    "GalleryIndex": "cgpn.retrieval",
    "RankResult": "cgpn.metrics.rank",
    "TrackerEmbedder": "cgpn.track.embedder",
    "build_dataset": "cgpn.data.datasets",
    "build_model": "cgpn.model",
    "check_onnx": "cgpn.export",
    "evaluate": "cgpn.metrics.rank",
    "evaluate_model": "cgpn.engine.evaluation",
    "export_onnx": "cgpn.export",
    "generate_synthetic": "cgpn.data.datasets",
    "load_config": "cgpn.config",
    "load_features": "cgpn.retrieval",
    "load_model": "cgpn.engine.checkpoint",
    "pairwise_distance": "cgpn.metrics.rank",
    "save_features": "cgpn.retrieval",
    "train": "cgpn.engine.trainer",
}

if TYPE_CHECKING:
    from cgpn.config import Config, load_config
    from cgpn.data.datasets import build_dataset, generate_synthetic
    from cgpn.engine.checkpoint import load_model
    from cgpn.engine.evaluation import evaluate_model
    from cgpn.engine.trainer import train
    from cgpn.errors import CgpnError
    from cgpn.export import check_onnx, export_onnx
    from cgpn.extractor import FeatureExtractor
    from cgpn.losses import CGPNLoss
    from cgpn.metrics.rank import RankResult, evaluate, pairwise_distance
    from cgpn.model import CGPN, build_model
    from cgpn.retrieval import GalleryIndex, load_features, save_features
    from cgpn.track.embedder import TrackerEmbedder


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cgpn' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "CGPN",
    "CGPNLoss",
    "CgpnError",
    "Config",
    "FeatureExtractor",
    "GalleryIndex",
    "RankResult",
    "TrackerEmbedder",
    "build_dataset",
    "build_model",
    "check_onnx",
    "evaluate",
    "evaluate_model",
    "export_onnx",
    "generate_synthetic",
    "load_config",
    "load_features",
    "load_model",
    "pairwise_distance",
    "save_features",
    "train",
]

"""CUDA paths: bf16/fp16 autocast training and GPU feature extraction, checked against the CPU.

Skipped without a CUDA device (``pytest -m gpu`` on a GPU machine runs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _engine_tiny import tiny_overrides
from cgpn.config import load_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_on_cuda(tiny_synth: Path, tmp_path: Path, precision: str) -> None:
    """Two epochs under autocast: finite losses, fp32 master weights, and a checkpoint whose network gives
    the same features on the CPU as on the GPU (cosine > 0.999 in fp32)."""
    from cgpn.engine.checkpoint import load_model
    from cgpn.engine.trainer import train

    cfg = load_config(None, tiny_overrides(tiny_synth, tmp_path / "run", **{
        "engine.device": "cuda", "engine.precision": precision, "engine.deterministic": "false",
        "engine.eval_at_start": "true", "engine.eval_period": 1}))
    result = train(cfg)
    losses = [v for epoch in result.epoch_losses for v in epoch.values()]
    assert len(result.epoch_losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert sorted(result.evaluations) == [0, 1, 2]
    model, _ = load_model(result.checkpoint)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    images = torch.randn(4, 3, 32, 16)
    with torch.no_grad():
        cpu = model.eval()(images)
        gpu = model.cuda().eval()(images.cuda()).cpu()
    assert F.cosine_similarity(cpu, gpu).min() > 0.999


def test_feature_extractor_on_cuda_matches_cpu(tiny_synth: Path) -> None:
    """FeatureExtractor on the GPU (eager, channels_last, bf16) against fp32 on the CPU: 1 - cosine below 1e-3
    per image. Skipping the flip averaging moves these features by more than that (checked here on the CPU:
    6e-3 to 9e-3 for such untrained networks), bf16 by about 2e-5 (measured with bf16 on an AVX512-BF16 CPU)."""
    from cgpn.extractor import FeatureExtractor, list_images
    from cgpn.model import build_model

    tol = 1e-3
    paths = [str(p) for p in list_images(tiny_synth / "query")][:12]
    model = build_model("cgpn", num_classes=8, backbone="resnet18", pretrained=False).eval()
    cfg = load_config(None, ["data.height=64", "data.width=32"])
    ref = FeatureExtractor(model, device="cpu", backend="eager", config=cfg, progress=False)(paths)
    no_flip = FeatureExtractor(model, device="cpu", backend="eager", config=cfg, progress=False, flip=False)(paths)
    assert (1 - F.cosine_similarity(ref, no_flip)).max() > tol  # the bound catches a path without the mirror
    for backend in ("eager", "channels_last", "bf16"):
        feats = FeatureExtractor(model, device="cuda", backend=backend, config=cfg, progress=False)(paths)
        assert feats.shape == ref.shape == (12, 3072)
        assert (1 - F.cosine_similarity(ref, feats.float().cpu())).max() < tol, backend


def test_tracker_embedder_on_cuda_matches_cpu() -> None:
    """TrackerEmbedder makes the crops on the GPU (uint8 frame uploaded, grid_sample there): same features as
    on the CPU."""
    import numpy as np

    from cgpn.model import build_model
    from cgpn.track.embedder import TrackerEmbedder

    model = build_model("cgpn", num_classes=8, backbone="resnet18", pretrained=False).eval()
    cfg = load_config(None, ["data.height=64", "data.width=32"])
    rng = np.random.default_rng(0)
    frame = np.repeat(np.repeat(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), 4, 0), 4, 1)  # 240 x 320
    boxes = np.array([[10.5, 20, 70, 200], [100, 30.25, 160, 230], [250, 100, 330, 260], [-40, -40, -1, -1]])
    ref = TrackerEmbedder(model, device="cpu", backend="eager", config=cfg)(frame, boxes)
    for backend, tol in (("eager", 1e-3), ("bf16", 2e-2)):
        feats = TrackerEmbedder(model, device="cuda", backend=backend, config=cfg)(frame, boxes)
        assert feats.shape == ref.shape == (4, 3072) and np.isfinite(feats).all()
        assert (1 - (feats * ref).sum(1)).max() < tol, backend

"""ONNX export: the test feature as one graph that runs without PyTorch, checked with onnxruntime. This module
writes and checks files; ``cgpn.runtime`` runs them.

The exported graph is the whole test-time feature of Section 4.2: normalised images (B, 3, H, W) in,
the flip-averaged, L2-normalised 3072-d CGPN feature (B, 3072) out. The batch axis is dynamic; height
and width are fixed to the checkpoint's ``data.height`` x ``data.width`` (the stripe rows of Fig. 2
depend on them).

Example:
    >>> model, cfg = load_model("runs/demo/last.pt")
    >>> export_onnx(model, "model.onnx", cfg.data.height, cfg.data.width)
    >>> check = check_onnx("model.onnx", model, cfg.data.height, cfg.data.width)
    >>> check.max_abs_diff <= 1e-4
    True
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cgpn.config import ONNX_OPSET, ONNX_OPSETS, Config
from cgpn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cgpn.engine.inference import Embedder
from cgpn.errors import ConfigError, DependencyError
from cgpn.files import atomic_path

__all__ = ["TOLERANCE", "OnnxCheck", "check_onnx", "export_onnx", "import_onnxruntime", "write_metadata"]

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest absolute difference accepted between onnxruntime and PyTorch features


def import_onnxruntime():
    """The ``onnxruntime`` module, or a DependencyError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise DependencyError("onnxruntime is not installed (needed to run or check ONNX files); "
                              "install it with: pip install onnxruntime  (or pip install 'cgpn[serve]')") from None
    return onnxruntime


def export_onnx(model: nn.Module, out: str | Path | io.BytesIO, height: int, width: int, flip: bool = True,
                normalize: bool = True, opset: int = ONNX_OPSET) -> str | Path | io.BytesIO:
    """Write the test feature of ``model`` (see ``Embedder``) to ``out`` as ONNX with a dynamic batch axis.

    Args:
        model: a CGPN (any ``nn.Module`` mapping (B, 3, H, W) to (B, D) in eval mode).
        out: file path, or a BytesIO to keep the graph in memory.
        height, width: input size the graph is fixed to (the checkpoint's ``data.height`` / ``data.width``).
        flip, normalize: average with the mirrored image; L2-normalise the result.
        opset: ONNX opset version.
    """
    if opset not in ONNX_OPSETS:
        raise ConfigError(f"--opset must be between {ONNX_OPSETS.start} and {ONNX_OPSETS.stop - 1}, got {opset}")
    was_training, device = model.training, next(model.parameters()).device
    embedder = Embedder(model.eval(), flip=flip, normalize=normalize).cpu()

    def trace(target: str | io.BytesIO) -> None:
        with warnings.catch_warnings():
            # The legacy exporter warns that it is legacy, and that the stripe rows (Python numbers
            # computed from the fixed height) become constants, which is what we want: only the batch is
            # dynamic. Any other warning is shown.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Converting a tensor to a Python",
                                    category=torch.jit.TracerWarning)
            torch.onnx.export(embedder, (torch.randn(2, 3, height, width),), target, dynamo=False,
                              opset_version=opset, input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                              do_constant_folding=True)

    try:
        if isinstance(out, io.BytesIO):
            trace(out)
        else:
            with atomic_path(out) as tmp:  # a kill mid-export leaves no torn file
                trace(str(tmp))
    finally:
        model.train(was_training).to(device)  # the caller's model as it was
    return out


def write_metadata(model_file: str | Path, cfg: Config, flip: bool = True) -> None:
    """Record in the ONNX file what a user of it needs: input size, normalisation, flip, the cgpn config."""
    try:
        import onnx
    except ImportError:
        logger.warning("onnx is not installed: %s carries no metadata (pip install onnx)", model_file)
        return
    proto = onnx.load(str(model_file))
    meta = {"cgpn.height": str(cfg.data.height), "cgpn.width": str(cfg.data.width),
            "cgpn.mean": json.dumps(list(IMAGENET_MEAN)), "cgpn.std": json.dumps(list(IMAGENET_STD)),
            "cgpn.flip": str(flip).lower(), "cgpn.normalized": "true", "cgpn.config": json.dumps(cfg.to_dict())}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(model_file) as tmp:
        onnx.save(proto, str(tmp))


@dataclass
class OnnxCheck:
    """onnxruntime against PyTorch on one random batch."""

    batch_size: int
    max_abs_diff: float
    min_cosine: float
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"onnxruntime vs PyTorch on a random batch of {self.batch_size}: max abs difference "
                f"{self.max_abs_diff:.2e} (limit {self.tolerance:.0e}), min cosine {self.min_cosine:.6f}: {verdict}")


@torch.inference_mode()
def check_onnx(model_file: str | Path | bytes, model: nn.Module, height: int, width: int, batch_size: int = 4,
               flip: bool = True, normalize: bool = True, seed: int = 0) -> OnnxCheck:
    """Run a random (batch_size, 3, height, width) batch through the ONNX file (onnxruntime on the CPU)
    and through PyTorch."""
    if batch_size < 1:
        raise ConfigError(f"--check-batch must be at least 1, got {batch_size}")
    session = import_onnxruntime().InferenceSession(model_file if isinstance(model_file, bytes) else str(model_file),
                                                    providers=["CPUExecutionProvider"])
    images = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))
    was_training, device = model.training, next(model.parameters()).device
    try:
        expected = Embedder(model.eval(), flip=flip, normalize=normalize)(images.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    got = session.run(["features"], {"images": images.numpy()})[0]
    if got.shape != expected.shape:
        return OnnxCheck(batch_size, float("inf"), float("nan"))
    cos = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    return OnnxCheck(batch_size, float(np.abs(got - expected).max()), float(cos.min()))

"""Features out of images with a trained model: files, PIL images, NumPy arrays or tensors in, L2-normalised
test features (3072-d for CGPN, Section 4.2) out, with the checkpoint's own preprocessing.

The network runs through ``cgpn.runtime.Runtime`` (a checkpoint, an ONNX file written by ``cgpn export``, or
a network in memory). On the CPU the default path (``backend="auto"``) is the fastest one whose features match
eager fp32 PyTorch (cosine >= 0.999, same Rank-1; benchmarks/infer_speed.py). On CPUs with bf16 matrix units (AMX,
AVX512-BF16) that is bf16 autocast + channels_last, as for training. On other CPUs it is ONNX Runtime:
1.30x eager fp32 for CGPN-ResNet-50 at 384 x 128 on a 2-core AVX2 CPU, where eager already runs at 73 % of
the CPU's fp32 matrix-multiply rate (channels_last 1.23x; torch.compile 1.34x but 7-42 s to compile in
every process; bf16 autocast 0.14x, emulated). The exported graph of a checkpoint is cached on disk
(``$CGPN_CACHE_DIR`` or ``~/.cache/cgpn``), so only the first use of a checkpoint pays for the export.

Example:
    >>> extractor = FeatureExtractor("runs/demo/last.pt")
    >>> feats = extractor(["a.jpg", "b.jpg"])          # (2, 3072), rows of unit length
    >>> float(feats[0] @ feats[1])                      # cosine similarity
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from cgpn.config import Config
from cgpn.data.datasets.base import IMAGE_SUFFIXES
from cgpn.data.loader import read_image
from cgpn.data.transforms import build_transforms
from cgpn.errors import ConfigError, DatasetError, ImageError
from cgpn.runtime import Runtime, cache_dir

__all__ = ["FeatureExtractor", "ImageInput", "cache_dir", "list_images", "to_pil"]

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted; a DatasetError if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder '{folder}' does not exist (expected a folder of .jpg/.png files)")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DatasetError(f"image folder '{folder}' holds no image (expected files ending in "
                           f"{', '.join(IMAGE_SUFFIXES)}, e.g. 0002_c1s1_000451_00.jpg)")
    return paths


def to_pil(item: ImageInput) -> Image.Image:
    """One image as an RGB PIL image.

    Args:
        item: a file path; a PIL image; a NumPy array (H, W, 3) uint8 RGB; or a tensor (3, H, W), uint8 or
            float in [0, 1] (float values are rounded to 8 bits, as an image file would hold them).
    """
    if isinstance(item, (str, Path)):
        return read_image(str(item))
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ImageError(f"an image tensor must be (3, H, W), got shape {tuple(item.shape)}")
        if item.dtype.is_floating_point:
            low, high = float(item.min()), float(item.max())
            if low < -1e-3 or high > 1 + 1e-3:  # 0-255 values, or an already normalised tensor
                raise ImageError(f"a float image tensor must hold values in [0, 1], got [{low:.3g}, {high:.3g}] "
                                 f"(divide 8-bit values by 255; pass unnormalised images)")
            item = (item.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        elif item.dtype != torch.uint8:
            raise ImageError(f"an image tensor must be uint8 or float in [0, 1], got {item.dtype}")
        item = item.cpu().permute(1, 2, 0).numpy()
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ImageError(f"an image array must be (H, W, 3) uint8 RGB, got shape {item.shape} {item.dtype}")
        return Image.fromarray(np.ascontiguousarray(item), mode="RGB")
    raise ImageError(f"cannot use {type(item).__name__} as an image (expected a path, PIL image, "
                     f"(H, W, 3) uint8 array or (3, H, W) tensor)")


def _as_list(inputs: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A single image, a batch (N, H, W, 3) array / (N, 3, H, W) tensor, or an iterable -> a list of images."""
    if isinstance(inputs, (str, Path, Image.Image)):
        return [inputs]
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return list(inputs) if inputs.ndim == 4 else [inputs]
    return list(inputs)


class FeatureExtractor:
    """A trained network as a function from images to L2-normalised test features.

    Args:
        checkpoint_or_model: a checkpoint written by ``cgpn train`` (path), an ONNX file written by
            ``cgpn export`` (path ending in ``.onnx``; size, normalisation and flip from its metadata), or a
            network in memory.
        device: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: images per forward pass (each also runs mirrored when ``flip``).
        flip: average each feature with that of the mirrored image (Section 4.2); ``None``: the
            checkpoint's ``test.flip`` (on by default), or what the ONNX file was exported with.
        backend: ``auto`` (CPU: ``bf16`` with bf16 matrix units, else ``onnx`` when onnxruntime is
            installed, else ``channels_last``; GPU: ``eager``), ``eager`` (fp32 PyTorch),
            ``channels_last``, ``bf16`` (autocast), ``compile`` (torch.compile) or ``onnx`` (ONNX Runtime);
            see ``cgpn.runtime``.
        config: preprocessing for a network passed in memory (a checkpoint brings its own); defaults
            to ``Config()``, i.e. 384 x 128 with ImageNet normalisation.
        progress: a progress bar; ``None`` shows one for lists longer than a batch on a terminal.

    Example:
        >>> extractor = FeatureExtractor("runs/demo/last.pt", batch_size=32)
        >>> extractor(np.zeros((128, 64, 3), np.uint8)).shape
        torch.Size([1, 3072])
    """

    def __init__(self, checkpoint_or_model: str | Path | nn.Module, device: str = "auto", batch_size: int = 32,
                 flip: bool | None = None, backend: str = "auto", config: Config | None = None,
                 progress: bool | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.runtime = Runtime(checkpoint_or_model, device=device, backend=backend, flip=flip, config=config)
        rt = self.runtime
        self.checkpoint, self.config, self.model, self.device = rt.checkpoint, rt.config, rt.model, rt.device
        self.backend, self.flip, self.feature_dim = rt.backend, rt.flip, rt.feature_dim
        self.batch_size, self.progress = batch_size, progress
        self.transform = build_transforms(rt.config.data, train=False, mean=rt.mean, std=rt.std)

    def preprocess(self, item: ImageInput) -> torch.Tensor:
        """One image -> the normalised (3, height, width) tensor the network takes."""
        return self.transform(to_pil(item))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of a preprocessed batch (B, 3, height, width), L2-normalised, on the CPU."""
        return self.runtime(images)

    def __call__(self, inputs: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Features (N, D) of one image or a list of images (paths, PIL, arrays, tensors; see ``to_pil``)."""
        items = _as_list(inputs)
        out = torch.empty(len(items), self.feature_dim)
        if self.progress is None:  # tqdm's None: a bar only when stderr is a terminal
            disable = None if len(items) > self.batch_size else True
        else:
            disable = not self.progress
        with tqdm(total=len(items), desc="features", unit="img", disable=disable) as bar:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                out[start:start + len(chunk)] = self.features(torch.stack([self.preprocess(x) for x in chunk]))
                bar.update(len(chunk))
        return out

    def __repr__(self) -> str:
        source = self.checkpoint or type(self.model).__name__
        return (f"FeatureExtractor({source}, backend={self.backend}, device={self.device}, "
                f"batch_size={self.batch_size}, flip={self.flip})")


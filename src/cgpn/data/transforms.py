"""Image transforms: resize to the configured size (384 x 128), random flip, ImageNet normalisation.

Random erasing, padding + random crop and colour jitter are available as settings; the paper's recipe
uses flipping only (Section 4.2).
"""

from __future__ import annotations

from torchvision import transforms as T

from cgpn.config import DataConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transforms"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(cfg: DataConfig, train: bool, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD) -> T.Compose:
    """PIL image -> normalised (3, height, width) tensor; random augmentation only when ``train``. ``mean`` /
    ``std`` are those of the network (an ONNX file records its own)."""
    size = (cfg.height, cfg.width)
    steps: list = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR)]
    if train:
        if cfg.flip_prob > 0:
            steps.append(T.RandomHorizontalFlip(cfg.flip_prob))
        if cfg.pad > 0:
            steps += [T.Pad(cfg.pad), T.RandomCrop(size)]
        if cfg.color_jitter:
            steps.append(T.ColorJitter(brightness=0.2, contrast=0.15, saturation=0.1, hue=0.0))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and cfg.random_erasing > 0:
        steps.append(T.RandomErasing(p=cfg.random_erasing, value="random"))
    return T.Compose(steps)

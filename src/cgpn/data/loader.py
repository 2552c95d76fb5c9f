"""Torch datasets and loaders over lists of ``Sample``: images are opened only when a batch needs them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from cgpn.config import DataConfig
from cgpn.data.datasets.base import Sample
from cgpn.data.sampler import PKSampler
from cgpn.data.transforms import build_transforms
from cgpn.errors import ImageError

__all__ = ["ImageDataset", "build_test_loader", "build_train_loader", "read_image"]


def read_image(path: str) -> Image.Image:
    """The RGB image at ``path``, or an ImageError naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageError(f"cannot read image '{path}': {err}") from None


class ImageDataset(Dataset):
    """(image tensor, pid, camid, index) for every sample."""

    def __init__(self, samples: Sequence[Sample], transform: Callable) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        sample = self.samples[index]
        return self.transform(read_image(sample.path)), sample.pid, sample.camid, index


def build_train_loader(samples: Sequence[Sample], cfg: DataConfig, seed: int = 0, rank: int = 0,
                       world_size: int = 1) -> DataLoader:
    """P x K batches of augmented training images."""
    sampler = PKSampler([s.pid for s in samples], cfg.batch_size, cfg.num_instances, cfg.epoch_mode,
                        seed=seed, rank=rank, world_size=world_size)
    return DataLoader(ImageDataset(samples, build_transforms(cfg, train=True)), batch_sampler=sampler,
                      num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=cfg.workers > 0)


def build_test_loader(samples: Sequence[Sample], cfg: DataConfig) -> DataLoader:
    """Test images in order, without augmentation."""
    return DataLoader(ImageDataset(samples, build_transforms(cfg, train=False)), batch_size=cfg.test_batch_size,
                      shuffle=False, num_workers=cfg.workers, pin_memory=torch.cuda.is_available())

"""The training stream as a pure function of (seed, epoch, batch): what makes a resumed run bit-exact.

``PKSampler`` already fixes which images form batch b of epoch e. Here every image of a batch also gets
its own augmentation seed, derived from (seed, epoch, rank, batch, position), and its random flip (or
erasing, crop) is drawn from that seed alone. So a batch is the same whichever worker process loads
it, however many workers there are, and whether the run started at epoch 0 or resumed in the middle
of an epoch, where fresh workers start with fresh random states.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cgpn.config import DataConfig
from cgpn.data.datasets.base import Sample
from cgpn.data.loader import ImageDataset
from cgpn.data.sampler import PKSampler
from cgpn.data.transforms import build_transforms

__all__ = ["SeededBatchSampler", "SeededDataset", "build_seeded_train_loader"]


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """A ``PKSampler`` whose batches are lists of (dataset index, augmentation seed)."""

    def __init__(self, sampler: PKSampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to draw and how many of this rank's batches are already done (resume)."""
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        for b, batch in enumerate(s, start=s.start_batch):
            seeds = np.random.SeedSequence([self.seed, s.epoch, s.rank, b]).generate_state(len(batch), np.uint64)
            yield [(int(i), int(seed) >> 1) for i, seed in zip(batch, seeds)]  # torch seeds are < 2**63


class SeededDataset(Dataset):
    """Wraps a dataset: item ``(index, seed)`` is ``dataset[index]`` with torch's RNG seeded by ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):  # leave the process's own stream untouched
            torch.manual_seed(seed)
            return self.dataset[index]


def build_seeded_train_loader(samples: Sequence[Sample], cfg: DataConfig, seed: int, rank: int = 0,
                              world_size: int = 1) -> DataLoader:
    """P x K batches of augmented training images whose content depends only on (seed, epoch, batch)."""
    sampler = PKSampler([s.pid for s in samples], cfg.batch_size, cfg.num_instances, cfg.epoch_mode,
                        seed=seed, rank=rank, world_size=world_size)
    dataset = SeededDataset(ImageDataset(samples, build_transforms(cfg, train=True)))
    return DataLoader(dataset, batch_sampler=SeededBatchSampler(sampler, seed), num_workers=cfg.workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=cfg.workers > 0,
                      generator=torch.Generator().manual_seed(seed))

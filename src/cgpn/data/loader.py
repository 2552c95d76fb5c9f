"""Torch datasets and loaders over lists of ``Sample``: images are opened only when a batch needs them.

Training batches come from worker processes (``data.workers``) through the P x K sampler, into pinned
memory when a GPU is present. A corrupt training image is skipped and counted when
``data.on_bad_image`` is ``skip`` (another image of the same identity takes its place, so batches keep
their P x K shape) and stops the run when it is ``stop``; at test time it is always an error.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from cgpn.config import CHOICES, DataConfig
from cgpn.data.datasets.base import Sample
from cgpn.data.sampler import PKSampler
from cgpn.data.transforms import build_transforms
from cgpn.errors import ConfigError, ImageError

__all__ = ["BAD_IMAGE_MODES", "ImageDataset", "SeededBatchSampler", "SeededDataset", "build_test_loader",
           "build_train_loader", "read_image", "to_rgb"]

logger = logging.getLogger(__name__)

BAD_IMAGE_MODES = CHOICES["data.on_bad_image"]
_MAX_WORKERS = 64  # slots of the shared skip counter (one per worker process, plus the main process)


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad files


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's modes of 16-bit grey pixels


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit grey keeps its high byte, as PIL itself reduces 16-bit RGB PNGs
    (``convert("RGB")`` would clip every value above 255 to white); 32-bit integer or float pixels have no
    agreed scale and raise ValueError."""
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.format == "PNG"):  # older PIL: 16-bit PNG as I
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels (PIL mode {img.mode}) "
                         f"have no agreed scale to 8 bits; convert the image to 8-bit")
    return img.convert("RGB")


def decode_rgb(path: str) -> Image.Image:
    """The RGB image at ``path``, fully decoded (see ``to_rgb``); one of ``DECODE_ERRORS`` if the file is not
    a readable image."""
    with Image.open(path) as img:
        return to_rgb(img)


def read_image(path: str) -> Image.Image:
    """The RGB image at ``path``, fully decoded, or an ImageError naming the file."""
    try:
        return decode_rgb(path)
    except DECODE_ERRORS as err:
        raise ImageError(f"cannot read image '{path}': {err} (expected a readable JPEG/PNG; "
                         f"run cgpn check-data to list every bad file)") from None


class ImageDataset(Dataset):
    """(image tensor, pid, camid, index) for every sample.

    Args:
        samples: the images.
        transform: PIL image -> tensor.
        on_bad_image: ``stop`` raises ImageError on a corrupt file; ``skip`` returns another image of
            the same identity instead (the next readable one in sample order) and counts the file.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, on_bad_image: str = "stop") -> None:
        if on_bad_image not in BAD_IMAGE_MODES:
            raise ConfigError(f"data.on_bad_image must be skip or stop, got {on_bad_image!r}")
        self.samples, self.transform, self.on_bad_image = list(samples), transform, on_bad_image
        by_pid: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            by_pid[s.pid].append(i)
        self._by_pid = dict(by_pid)
        self._bad: set[int] = set()  # indices known bad in this process
        self._skips = torch.zeros(_MAX_WORKERS + 1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def skipped(self) -> int:
        """How many times a corrupt image was replaced, over all worker processes."""
        return int(self._skips.sum())

    def _load(self, index: int) -> Image.Image:
        if self.on_bad_image == "stop":
            return read_image(self.samples[index].path)
        group = self._by_pid[self.samples[index].pid]
        start = group.index(index)
        for candidate in (group[(start + k) % len(group)] for k in range(len(group))):
            if candidate in self._bad:
                continue
            try:
                return read_image(self.samples[candidate].path)
            except ImageError as err:
                self._bad.add(candidate)
                info = get_worker_info()
                self._skips[0 if info is None else 1 + info.id % _MAX_WORKERS] += 1
                logger.warning("skipped a bad training image: %s", err)
        raise ImageError(f"no readable image of identity {self.samples[index].pid} (e.g. "
                         f"'{self.samples[index].path}'); data.on_bad_image=skip needs one per identity")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        sample = self.samples[index]
        return self.transform(self._load(index)), sample.pid, sample.camid, index


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """A ``PKSampler`` whose batches are lists of (dataset index, augmentation seed).

    Every image of a batch gets its own seed, derived from (seed, epoch, rank, batch, position), and its
    random flip (or erasing, crop) is drawn from that seed alone: a batch is the same whichever worker
    loads it, however many workers there are, and whether the epoch started at its first batch or in
    the middle (a resumed run, whose fresh workers have fresh random states).
    """

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
    """Item ``(index, seed)`` is ``dataset[index]`` drawn with torch's RNG seeded by ``seed``."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> int:
        """Corrupt images replaced so far (see ``ImageDataset.skipped``)."""
        return self.dataset.skipped

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, seed = item
        with torch.random.fork_rng(devices=[]):  # leave the process's own stream untouched
            torch.manual_seed(seed)
            return self.dataset[index]


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_train_loader(samples: Sequence[Sample], cfg: DataConfig, seed: int = 0, rank: int | None = None,
                       world_size: int | None = None) -> DataLoader:
    """P x K batches of augmented training images whose content depends only on (seed, epoch, batch).

    Rank and world size default to the process group's. Call ``loader.batch_sampler.set_epoch(e)``
    before each epoch.
    """
    if rank is None or world_size is None:
        rank, world_size = _distributed()
    sampler = PKSampler([s.pid for s in samples], cfg.batch_size, cfg.num_instances, cfg.epoch_mode,
                        seed=seed, rank=rank, world_size=world_size)
    dataset = SeededDataset(ImageDataset(samples, build_transforms(cfg, train=True), on_bad_image=cfg.on_bad_image))
    return DataLoader(dataset, batch_sampler=SeededBatchSampler(sampler, seed), num_workers=cfg.workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=cfg.workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def build_test_loader(samples: Sequence[Sample] | Dataset, cfg: DataConfig) -> DataLoader:
    """Test images in order, without augmentation; a corrupt file is an error. ``samples`` may also be a
    ready dataset of the same items (e.g. occluded queries)."""
    dataset = samples if isinstance(samples, Dataset) else ImageDataset(
        samples, build_transforms(cfg, train=False), on_bad_image="stop")
    return DataLoader(dataset, batch_size=cfg.test_batch_size, shuffle=False, num_workers=cfg.workers,
                      pin_memory=torch.cuda.is_available())

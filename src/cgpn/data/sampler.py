"""P x K identity sampling (Section 4.2: P = 8 identities x K = 8 images), deterministic and distributed-aware.

An epoch is a list of batches, fixed by (seed, epoch). Two definitions (SPEC 7):
``identities`` - every training identity appears once, in groups of P (Market: ceil(751 / 8) = 94
batches; the last group is filled from the start of the permutation); ``images`` - len(train) //
batch batches of P random identities. An identity with fewer than K images is sampled with
replacement. Under DDP, rank r of W takes batches r, r + W, ... of the single-process epoch (padded
by wrapping to a multiple of W), so ranks draw different identities, run the same number of
iterations, and their union is the single-process epoch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from cgpn.config import CHOICES
from cgpn.errors import ConfigError

__all__ = ["PKSampler"]


class PKSampler(Sampler[list[int]]):
    """Yields batches (lists of dataset indices) of ``num_instances`` images for each of P identities.

    Args:
        pids: identity of every training sample.
        batch_size: P x K.
        num_instances: K.
        epoch_mode: ``identities`` or ``images`` (SPEC 7).
        seed: with the epoch (``set_epoch``), fixes every draw.
        rank, world_size: this process's place under DDP.

    Example:
        >>> sampler = PKSampler([0, 0, 1, 1, 2, 2], batch_size=4, num_instances=2)
        >>> [len(b) for b in sampler]
        [4, 4]
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int,
        epoch_mode: str = "identities",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_instances < 1 or batch_size % num_instances != 0:
            raise ConfigError(f"data.batch_size ({batch_size}) must be a multiple of data.num_instances "
                              f"({num_instances}): a batch is P identities x K images")
        if epoch_mode not in CHOICES["data.epoch_mode"]:
            raise ConfigError(f"data.epoch_mode must be identities or images, got {epoch_mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.batch_size, self.num_instances = batch_size, num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.epoch_mode, self.seed, self.rank, self.world_size = epoch_mode, seed, rank, world_size
        index: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            index[int(pid)].append(i)
        self.pids = sorted(index)
        self.index = {pid: np.asarray(ix) for pid, ix in index.items()}
        self.num_samples = len(pids)
        if len(self.pids) < self.num_pids_per_batch:
            raise ConfigError(f"{len(self.pids)} training identities cannot fill a batch of "
                              f"{self.num_pids_per_batch} identities; lower data.batch_size")
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already consumed (for resuming mid-epoch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to draw, and how many of this rank's batches to skip (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _single_process_batches(self) -> int:
        if self.epoch_mode == "identities":
            return math.ceil(len(self.pids) / self.num_pids_per_batch)
        return max(1, self.num_samples // self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return math.ceil(self._single_process_batches() / self.world_size)

    def epoch_batches(self) -> list[list[int]]:
        """All batches of the current epoch, as one process would draw them (before DDP splitting)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        p, n = self.num_pids_per_batch, self._single_process_batches()
        if self.epoch_mode == "identities":
            order = rng.permutation(len(self.pids))
            order = np.concatenate([order, order[: n * p - len(order)]])  # fill the last group
            groups = order.reshape(n, p)
        else:
            groups = np.stack([rng.choice(len(self.pids), size=p, replace=False) for _ in range(n)])
        batches = []
        for group in groups:
            batch: list[int] = []
            for g in group:
                ix = self.index[self.pids[g]]
                batch += rng.choice(ix, size=self.num_instances, replace=len(ix) < self.num_instances).tolist()
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        total = len(self) * self.world_size
        batches = [batches[i % len(batches)] for i in range(total)]  # wrap so every rank runs len(self) batches
        mine = batches[self.rank :: self.world_size]
        yield from mine[self.start_batch :]

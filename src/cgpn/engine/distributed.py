"""Training on several processes with PyTorch's own stack: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc_per_node N -m cgpn train ...`` (add ``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``
for several machines) starts N processes and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; ``init_distributed`` reads them. Every process draws its own P x K
batches (``PKSampler`` with rank / world size), so the global batch is N x ``data.batch_size``.
Gradients are averaged by DDP, so every process keeps identical parameters. Only rank 0 evaluates and
writes logs and checkpoints.

The triplet loss (``engine.triplet_scope``):
- ``rank``: each process mines its hardest positive and negative inside its own P x K batch, as one
  GPU training with ``data.batch_size`` does; the recipe's behaviour does not change with N.
- ``global``: features (and labels) of all processes are gathered, with gradients, and every anchor
  is mined against the N x P x K batch: harder negatives as N grows, the loss of one big batch.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from cgpn.config import CHOICES, EngineConfig
from cgpn.errors import ConfigError

T = TypeVar("T")

__all__ = ["DistEnv", "any_rank", "from_main_process", "gather_across_processes", "init_distributed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # whether init_distributed started the process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates and writes logs and checkpoints."""
        return self.rank == 0

    def close(self) -> None:
        """End the process group if ``init_distributed`` started it."""
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(cfg: EngineConfig) -> DistEnv:
    """Join the process group torchrun describes in the environment; one process without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
    if backend not in CHOICES["engine.dist_backend"][1:]:  # after auto
        raise ConfigError(f"engine.dist_backend must be auto, nccl or gloo, got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    initialized_here = not dist.is_initialized()  # else a caller's group (a test, a notebook) is used as it is
    if initialized_here:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        logger.info("process %d of %d (%s)", rank, world_size, backend)
    if rank != 0:  # one voice: the other processes only warn
        logging.getLogger("cgpn").setLevel(logging.WARNING)
    return DistEnv(rank, world_size, local_rank, initialized_here=initialized_here)


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any (so that all stop at the same step)."""
    if not env.distributed:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main_process(obj: T, env: DistEnv) -> T:
    """Rank 0's ``obj`` on every process (pickled; e.g. a checkpoint only rank 0's machine has on disk)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_across_processes(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every process concatenated along dim 0, in rank order; float tensors keep their gradient
    (each process's slice sends its gradient back to that process), labels need none."""
    if x.is_floating_point():
        return torch.cat(dist_fn.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)

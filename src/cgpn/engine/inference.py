"""Test features: the network in eval mode, averaged over the image and its mirror (Section 4.2)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cgpn.errors import ConfigError

__all__ = ["extract_features", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device '{name}' asked for, but this machine has "
                              f"{f'{count} CUDA device(s)' if count else 'no CUDA device'}; use auto or cpu")
    elif device.type != "cpu":
        raise ConfigError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device, flip: bool = True,
                     desc: str = "features") -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(features (N, D) on the CPU, pids (N,), camids (N,)) of every image ``loader`` yields, in order."""
    was_training = model.training
    model.eval()
    feats, pids, camids = [], [], []
    for images, pid, camid, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        images = images.to(device, non_blocking=True)
        f = model(images)
        if flip:
            f = (f + model(images.flip(3))) / 2
        feats.append(f.float().cpu())
        pids.append(pid.numpy())
        camids.append(camid.numpy())
    model.train(was_training)
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids)

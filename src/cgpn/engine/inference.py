"""Test features: the network in eval mode, averaged over the image and its mirror (Section 4.2)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cgpn.errors import ConfigError

__all__ = ["Embedder", "extract_features", "resolve_device"]


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


class Embedder(nn.Module):
    """A network's test feature: ``model(x)`` averaged with ``model(x mirrored)``, then L2-normalised.

    Image and mirror go through the network as one batch of 2B, which is what an exported graph and
    a CPU run want (one large batch rather than two).
    """

    def __init__(self, model: nn.Module, flip: bool = True, normalize: bool = True) -> None:
        super().__init__()
        self.model, self.flip, self.normalize = model, flip, normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D) features (fp32 even under bf16 autocast)."""
        if self.flip:
            f = self.model(torch.cat([images, images.flip(3)])).float()  # (2B, D): images, then mirrors
            f = f.reshape(2, -1, f.shape[1]).mean(0)  # (B, D)
        else:
            f = self.model(images).float()
        return F.normalize(f, dim=1) if self.normalize else f



@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device, flip: bool = True,
                     desc: str = "features") -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(features (N, D) on the CPU, pids (N,), camids (N,)) of every image ``loader`` yields, in order."""
    was_training = model.training
    embed = Embedder(model.eval(), flip=flip, normalize=False)
    feats, pids, camids = [], [], []
    try:
        for images, pid, camid, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
            feats.append(embed(images.to(device, non_blocking=True)).cpu())
            pids.append(pid.numpy())
            camids.append(camid.numpy())
    finally:  # also after a bad image: the caller's model keeps its mode
        model.train(was_training)
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids)

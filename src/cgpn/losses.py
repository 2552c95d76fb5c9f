"""The training loss of eq. 4: L = L_softmax + L_triplet + L_mse, each term reported separately.

- Softmax cross-entropy on every feature's logits (eq. 1), mean over the batch, summed over features (SPEC 6).
- Batch-hard triplet loss (eq. 2, Hermans et al. 2017), margin 1.2, on the global features (on the local
  ones for CGPN-3, which has no global part), mean over anchors (SPEC 4), summed over features.
- Global supervision (eq. 3): MSE between f_g_p and the pooled half f_gl_p, summed over the 3 branches and
  2 halves; ``mean`` over elements (nn.MSELoss) or ``sum`` over channels then batch mean (SPEC 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cgpn.config import CHOICES, LossConfig
from cgpn.errors import ConfigError
from cgpn.model.cgpn import CGPNOutput

__all__ = ["CGPNLoss", "batch_hard_triplet_loss", "cross_entropy_loss", "global_supervision_loss"]


def cross_entropy_loss(logits: list[torch.Tensor], targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over features of the batch-mean cross-entropy."""
    return sum(F.cross_entropy(x.float(), targets, label_smoothing=label_smoothing) for x in logits)


def batch_hard_triplet_loss(features: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 2 for one feature (B, D): for each anchor, its farthest positive and closest negative.

    Distances are Euclidean; the hinge is averaged over anchors. An anchor without a negative in the
    batch contributes 0.
    """
    x = features.float()
    d2 = (x * x).sum(1, keepdim=True) + (x * x).sum(1)[None] - 2 * x @ x.T
    dist = d2.clamp_min(1e-12).sqrt()
    same = targets[:, None] == targets[None]
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    return F.relu(margin + hardest_pos - hardest_neg).mean()


def global_supervision_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]], reduction: str = "mean",
                            detach_target: bool = True) -> torch.Tensor:
    """Eq. 3: summed squared error between each f_g_p (B, c) and its target f_gl_p (B, c)."""
    if reduction not in CHOICES["loss.mse_reduction"]:
        raise ConfigError(f"loss.mse_reduction must be mean or sum, got {reduction!r}")
    total = torch.zeros(())
    for pred, target in pairs:
        pred, target = pred.float(), target.float()
        if detach_target:
            target = target.detach()
        if reduction == "mean":
            total = total.to(pred.device) + F.mse_loss(pred, target)
        else:
            total = total.to(pred.device) + (pred - target).pow(2).sum(1).mean()
    return total


class CGPNLoss(nn.Module):
    """Eq. 4 with the weights of ``LossConfig``; returns the total and each term.

    Args:
        cfg: the loss settings.
        gather: where the triplet term mines over the batches of all processes (``engine.triplet_scope:
            global``), the function that concatenates a tensor over processes, keeping gradients
            (``cgpn.engine.distributed.gather_across_processes``); cross-entropy and MSE stay per process.
    """

    def __init__(self, cfg: LossConfig, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.cfg, self.gather = cfg, gather

    def forward(self, output: CGPNOutput, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        ce = cross_entropy_loss(list(output.logits.values()), targets, cfg.label_smoothing)
        features, triplet_targets = output.triplet_features, targets
        if self.gather is not None:
            features, triplet_targets = [self.gather(f.float()) for f in features], self.gather(targets)
        tri = sum(batch_hard_triplet_loss(f, triplet_targets, cfg.triplet_margin) for f in features)
        mse = global_supervision_loss(output.supervision, cfg.mse_reduction, cfg.mse_detach_target)
        total = cfg.ce_weight * ce + cfg.triplet_weight * tri + cfg.mse_weight * mse.to(ce.device)
        terms = {"ce": float(ce.detach()), "triplet": float(tri.detach()), "mse": float(mse.detach())}
        return total, terms

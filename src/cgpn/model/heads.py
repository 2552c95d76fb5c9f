"""Per-feature heads: a 256-d reduction and an identity classifier (SPEC 3).

One unshared head per feature: 1x1 conv (no bias) -> BatchNorm -> ReLU, then a linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureHead"]


class FeatureHead(nn.Module):
    """Reduce a pooled feature (B, C, 1, 1) to (B, D); ``classifier`` maps that to ``num_classes`` logits.

    Example:
        >>> head = FeatureHead(2048, 256, num_classes=751)
        >>> feat = head(torch.randn(4, 2048, 1, 1))
        >>> feat.shape, head.classifier(feat).shape
        (torch.Size([4, 256]), torch.Size([4, 751]))
    """

    def __init__(self, in_channels: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.reduction = nn.Sequential(
            nn.Conv2d(in_channels, dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.kaiming_normal_(self.reduction[0].weight, mode="fan_in", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.reduction(pooled).flatten(1)  # (B, D)

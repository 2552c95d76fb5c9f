"""CGPN: coarse-grained part-level features with supervised global features (Mao et al., Fig. 2 and 3).

A ResNet is split after ``res_conv4_1`` into three branches. Branch i produces a map T (B, c, h, w);
its *global part* (two 1x1 convs c -> c, then global max pooling) gives f_g = [f_g1, f_g2] (2c), and
during training the upper and lower halves of T, pooled, give the targets f_gl1, f_gl2 (eq. 3); its
*local part* pools adjacent horizontal stripes of T, combined as in ``STRIPES``. Every feature is
reduced to 256-d by its own head; the test feature is their concatenation (12 x 256 = 3072-d).

The ablations of Table 2 and MGN are rows of ``VARIANTS``: settings of this one network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cgpn.errors import ConfigError
from cgpn.model.backbone import SharedTrunk, branch_layers, build_resnet, feature_channels
from cgpn.model.heads import FeatureHead

__all__ = ["CGPN", "GLOBAL_PARTS", "STRIPES", "VARIANTS", "CGPNOutput", "build_model"]

# Local part: per branch, (number of stripes N, row ranges [start, end) in stripe units, one per feature).
STRIPES: dict[str, tuple[tuple[int, tuple[tuple[int, int], ...]], ...]] = {
    # Fig. 3: combined stripes are adjacent and cover at least half the height.
    "coarse": (
        (2, ((0, 1), (1, 2))),  # two 1/2
        (3, ((0, 2), (1, 3))),  # two 2/3
        (4, ((0, 3), (1, 4), (0, 2), (1, 3), (2, 4))),  # two 3/4, three 1/2
    ),
    # CGPN-2 (Fig. 4): branch i splits into 1 + i stripes, one feature each.
    "fine": (
        (2, ((0, 1), (1, 2))),
        (3, ((0, 1), (1, 2), (2, 3))),
        (4, ((0, 1), (1, 2), (2, 3), (3, 4))),
    ),
    # MGN (Wang et al. 2018): a global-only branch, then 2 and 3 stripes.
    "mgn": (
        (1, ()),
        (2, ((0, 1), (1, 2))),
        (3, ((0, 1), (1, 2), (2, 3))),
    ),
    # CGPN-1: no local part.
    "none": ((1, ()), (1, ()), (1, ())),
}

# Global part of each branch:
#   supervised   two 1x1 convs c -> c + GMP -> f_g (2c), pulled toward pooled halves of T by MSE (CGPN)
#   unsupervised the same convs, no MSE (CGPN-4)
#   pooled       GMP of T itself (c), as MGN
#   none         no global feature (CGPN-3)
GLOBAL_PARTS = ("supervised", "unsupervised", "pooled", "none")

VARIANTS: dict[str, dict[str, object]] = {
    "cgpn": {"global_part": "supervised", "local_part": "coarse", "last_stride": [1, 1, 1]},
    "cgpn1": {"global_part": "supervised", "local_part": "none", "last_stride": [1, 1, 1]},
    "cgpn2": {"global_part": "supervised", "local_part": "fine", "last_stride": [1, 1, 1]},
    "cgpn3": {"global_part": "none", "local_part": "coarse", "last_stride": [1, 1, 1]},
    "cgpn4": {"global_part": "unsupervised", "local_part": "coarse", "last_stride": [1, 1, 1]},
    "mgn": {"global_part": "pooled", "local_part": "mgn", "last_stride": [2, 1, 1]},
}


@dataclass
class CGPNOutput:
    """What the network gives the losses in training mode.

    Attributes:
        features: reduced features (B, 256) by name (``g1``..``g3``, ``b3_0_3``...), in test order.
        logits: identity logits (B, num_classes) by the same names.
        triplet_features: features the triplet loss acts on (the 3 global ones, SPEC 4; the local ones too with
            ``triplet_parts="all"``, and for CGPN-3, which has no global one).
        supervision: (prediction f_g_p, target f_gl_p) pairs of eq. 3, each (B, c); empty without MSE.
    """

    features: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    triplet_features: list[torch.Tensor]
    supervision: list[tuple[torch.Tensor, torch.Tensor]]


def stripe_rows(height: int, num_stripes: int, start: int, end: int) -> tuple[int, int]:
    """Rows [r0, r1) of stripes [start, end) when ``height`` rows are split into ``num_stripes``.

    Stripe i spans rows floor(i*h/N) .. ceil((i+1)*h/N), as adaptive pooling does (SPEC 2), so heights
    that N does not divide still work.
    """
    return (start * height) // num_stripes, math.ceil(end * height / num_stripes)


class Branch(nn.Module):
    """One of the three branches: its own ``layer3[1:]`` and ``layer4``, and the 1x1 convs of its global part."""

    def __init__(self, layer3: nn.Sequential, layer4: nn.Sequential, channels: int, global_part: str) -> None:
        super().__init__()
        self.layer3 = layer3
        self.layer4 = layer4
        if global_part in ("supervised", "unsupervised"):
            # f_g1 attends to the upper half, f_g2 to the lower one (Section 3.1)
            self.global_convs = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=1) for _ in range(2))
        else:
            self.global_convs = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(x))  # T: (B, c, h, w), e.g. (B, 2048, 24, 8) at 384 x 128


class CGPN(nn.Module):
    """The CGPN network and its variants.

    Args:
        num_classes: training identities (one classifier output per identity).
        backbone: a name in ``cgpn.model.backbone.BACKBONES``.
        pretrained: ImageNet weights: ``True`` (torchvision), ``False``, or a path to a .pth file.
        global_part: one of ``GLOBAL_PARTS``.
        local_part: a key of ``STRIPES``.
        last_stride: stride of ``layer4`` in each of the 3 branches.
        pooling: ``max`` or ``avg``.
        reduce_dim: size of each reduced feature.
        triplet_on: ``reduced`` or ``pooled`` features for the triplet loss.
        triplet_parts: ``global`` (the 3 global features, Section 3.3) or ``all`` (the local ones too:
            Section 3.2 says the local part is trained with softmax and triplet loss).

    Example:
        >>> model = CGPN(num_classes=751, backbone="resnet18", pretrained=False).eval()
        >>> model(torch.randn(2, 3, 384, 128)).shape
        torch.Size([2, 3072])
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: bool | str = True,
        global_part: str = "supervised",
        local_part: str = "coarse",
        last_stride: list[int] | tuple[int, ...] = (1, 1, 1),
        pooling: str = "max",
        reduce_dim: int = 256,
        triplet_on: str = "reduced",
        triplet_parts: str = "global",
    ) -> None:
        super().__init__()
        _check_choice("model.global_part", global_part, GLOBAL_PARTS)
        _check_choice("model.local_part", local_part, tuple(STRIPES))
        _check_choice("model.pooling", pooling, ("max", "avg"))
        _check_choice("model.triplet_on", triplet_on, ("reduced", "pooled"))
        _check_choice("model.triplet_parts", triplet_parts, ("global", "all"))
        if len(last_stride) != 3 or any(s not in (1, 2) for s in last_stride):
            raise ConfigError(f"model.last_stride must be 3 values of 1 or 2 (one per branch), got {last_stride}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        if global_part == "none" and local_part == "none":
            raise ConfigError("model.global_part=none with model.local_part=none leaves no feature at all")
        self.global_part, self.local_part, self.triplet_on = global_part, local_part, triplet_on
        self.triplet_parts = triplet_parts
        self.pool = F.adaptive_max_pool2d if pooling == "max" else F.adaptive_avg_pool2d
        self.stripes = STRIPES[local_part]
        c = feature_channels(backbone)

        resnet = build_resnet(backbone, pretrained)
        self.trunk = SharedTrunk(resnet)
        self.branches = nn.ModuleList(
            Branch(*branch_layers(resnet, stride), channels=c, global_part=global_part) for stride in last_stride
        )
        global_channels = {"supervised": 2 * c, "unsupervised": 2 * c, "pooled": c, "none": 0}[global_part]
        heads = {}
        if global_channels:
            for i in range(3):
                heads[f"g{i + 1}"] = FeatureHead(global_channels, reduce_dim, num_classes)
        for i, (_, ranges) in enumerate(self.stripes):
            for start, end in ranges:
                heads[f"b{i + 1}_{start}_{end}"] = FeatureHead(c, reduce_dim, num_classes)
        self.heads = nn.ModuleDict(heads)
        self.feature_dim = reduce_dim * len(self.heads)

    @property
    def feature_names(self) -> list[str]:
        """Names of the reduced features, in the order of the test feature."""
        return list(self.heads)

    def _pool_rows(self, t: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        return self.pool(t[:, :, rows[0] : rows[1]], 1)  # (B, c, 1, 1)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) -> the three branch maps T, each (B, c, H/16, W/16) at stride 1."""
        shared = self.trunk(images)
        return [branch(shared) for branch in self.branches]

    def forward_head(
        self, maps: list[torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Branch maps -> (pooled features by name, reduced features by name, supervision pairs)."""
        pooled: dict[str, torch.Tensor] = {}
        supervision: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (branch, t) in enumerate(zip(self.branches, maps)):
            h = t.shape[2]
            if self.global_part == "pooled":
                pooled[f"g{i + 1}"] = self.pool(t, 1)
            elif self.global_part in ("supervised", "unsupervised"):
                f_g = [self.pool(conv(t), 1) for conv in branch.global_convs]  # f_g1, f_g2: (B, c, 1, 1)
                pooled[f"g{i + 1}"] = torch.cat(f_g, dim=1)  # f_g: (B, 2c, 1, 1)
                if self.global_part == "supervised" and self.training:
                    f_gl = [self._pool_rows(t, stripe_rows(h, 2, p, p + 1)) for p in range(2)]  # halves of T
                    supervision += [(g.flatten(1), gl.flatten(1)) for g, gl in zip(f_g, f_gl)]
        for i, (t, (n, ranges)) in enumerate(zip(maps, self.stripes)):
            for start, end in ranges:
                pooled[f"b{i + 1}_{start}_{end}"] = self._pool_rows(t, stripe_rows(t.shape[2], n, start, end))
        reduced = {name: head(pooled[name]) for name, head in self.heads.items()}
        return pooled, reduced, supervision

    def forward(self, images: torch.Tensor) -> CGPNOutput | torch.Tensor:
        """Training: a ``CGPNOutput``. Evaluation: the test feature (B, 256 x number of features)."""
        pooled, reduced, supervision = self.forward_head(self.forward_features(images))
        if not self.training:
            return torch.cat(list(reduced.values()), dim=1)
        logits = {name: head.classifier(reduced[name]) for name, head in self.heads.items()}
        triplet_names = [n for n in self.heads if n.startswith("g") or self.triplet_parts == "all"]
        triplet_names = triplet_names or list(self.heads)  # CGPN-3: the locals
        source = reduced if self.triplet_on == "reduced" else {n: p.flatten(1) for n, p in pooled.items()}
        return CGPNOutput(
            features=reduced,
            logits=logits,
            triplet_features=[source[n] for n in triplet_names],
            supervision=supervision,
        )


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def build_model(
    name: str,
    num_classes: int,
    backbone: str = "resnet50",
    pretrained: bool | str = True,
    **settings: object,
) -> CGPN:
    """Build a variant by name (``cgpn``, ``cgpn1``..``cgpn4``, ``mgn``); ``settings`` override its row.

    ``None`` settings are ignored, so a ``ModelConfig``'s fields can be passed as they are.
    """
    if name not in VARIANTS:
        raise ConfigError(f"unknown model '{name}'; choose one of {', '.join(VARIANTS)} (model.name)")
    kwargs = dict(VARIANTS[name])
    kwargs.update({k: v for k, v in settings.items() if v is not None})
    return CGPN(num_classes=num_classes, backbone=backbone, pretrained=pretrained, **kwargs)

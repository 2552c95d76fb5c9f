"""The ResNet trunk (torchvision) and its ImageNet weights.

CGPN splits a ResNet after ``res_conv4_1`` (torchvision ``layer3[0]``): the part before is shared, the
rest (``layer3[1:]`` and ``layer4``) is copied into each branch (Section 3.1). Module names stay
torchvision's, so a torchvision state dict loads unchanged. This is the only module that loads weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

from cgpn.errors import ConfigError, PretrainedWeightsError
from cgpn.files import describe_file, load_torch_file

__all__ = ["BACKBONES", "SharedTrunk", "branch_layers", "build_resnet", "feature_channels"]

# name -> (constructor, ImageNet weights enum, channels of layer4's output)
BACKBONES = {
    "resnet18": (torchvision.models.resnet18, tv_resnet.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (torchvision.models.resnet34, tv_resnet.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (torchvision.models.resnet50, tv_resnet.ResNet50_Weights.IMAGENET1K_V1, 2048),
    "resnet101": (torchvision.models.resnet101, tv_resnet.ResNet101_Weights.IMAGENET1K_V1, 2048),
}


def _spec(name: str) -> tuple:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)} (model.backbone)")
    return BACKBONES[name]


def feature_channels(name: str) -> int:
    """Channels c of the branch feature map T: 2048 for ResNet-50/101, 512 for ResNet-18/34."""
    return _spec(name)[2]


def _imagenet_state_dict(name: str, source: bool | str) -> dict[str, torch.Tensor]:
    """Read ImageNet weights from torchvision's download/cache (``True``) or from a local file (a path)."""
    weights = _spec(name)[1]
    if source is True:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except Exception as err:  # offline, or a damaged file in the cache (torch's message is no help there)
            reason = (f"the cached copy is {describe_file(cache)}; delete it" if cache.is_file() else
                      str(getattr(err, "reason", err)).splitlines()[0])
            raise PretrainedWeightsError(
                f"cannot get ImageNet weights for {name} from {weights.url} ({reason}); "
                f"put that file at {cache} or set model.pretrained=/path/to/{cache.name}, "
                f"or train without them with model.pretrained=false"
            ) from None
    path = Path(str(source)).expanduser()
    state = load_torch_file(path, "model.pretrained file",
                            f"torchvision's {Path(weights.url).name} (or model.pretrained=true to download it, "
                            f"false to start from random weights)", PretrainedWeightsError)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"'{path}' holds a {type(state).__name__}, expected a ResNet state dict")
    return state


def build_resnet(name: str, pretrained: bool | str) -> torchvision.models.ResNet:
    """A torchvision ResNet, with ImageNet weights when ``pretrained`` is true or a path to a .pth file."""
    constructor = _spec(name)[0]
    model = constructor(weights=None)
    if pretrained is False or pretrained is None:
        return model
    state = {k: v for k, v in _imagenet_state_dict(name, pretrained).items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        bad = (missing + unexpected)[:4]
        raise PretrainedWeightsError(
            f"ImageNet weights do not fit {name}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"keys (e.g. {', '.join(bad)}); check model.backbone and model.pretrained"
        )
    return model


class SharedTrunk(nn.Sequential):
    """``conv1`` .. ``layer3[0]`` (res_conv4_1): shared by the three branches. (B,3,H,W) -> (B,C/2,H/16,W/16)."""

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3 = resnet.layer3[:1]  # keys stay "layer3.0.*"


def _set_stride(layer4: nn.Sequential, stride: int) -> None:
    """Give the first block of ``layer4`` this stride (SPEC 1: a stride change, not dilation)."""
    block = layer4[0]
    conv = block.conv2 if isinstance(block, tv_resnet.Bottleneck) else block.conv1
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def branch_layers(resnet: torchvision.models.ResNet, last_stride: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Fresh copies of ``layer3[1:]`` and ``layer4`` (same starting weights for every branch)."""
    layer3 = copy.deepcopy(resnet.layer3[1:])  # keys stay "1", "2", ...
    layer4 = copy.deepcopy(resnet.layer4)
    _set_stride(layer4, last_stride)
    return layer3, layer4

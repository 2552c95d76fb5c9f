"""Checkpoints: written atomically, read safely (``weights_only``), refused when they do not fit.

A checkpoint holds the model's state dict, the resolved config and the number of classes, so that
``load_model`` rebuilds the network from the file alone; training state (optimizer, scheduler, epoch)
rides along for resuming.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cgpn.config import Config
from cgpn.errors import CheckpointError
from cgpn.model import CGPN, build_model

__all__ = ["build_model_from_config", "load_checkpoint", "load_model", "save_checkpoint"]

FORMAT = "cgpn-checkpoint-v1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a cgpn checkpoint on the CPU (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (expected a file written by cgpn train, "
                              f"e.g. runs/<name>/last.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike
        raise CheckpointError(f"cannot read checkpoint '{path}': {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a cgpn checkpoint (no '{FORMAT}' marker); "
                              f"was it written by another tool?")
    return state


def build_model_from_config(cfg: Config, num_classes: int, pretrained: bool | str | None = None) -> CGPN:
    """The network ``cfg.model`` describes (``pretrained`` overrides ``cfg.model.pretrained``)."""
    m = cfg.model
    return build_model(m.name, num_classes, backbone=m.backbone,
                       pretrained=m.pretrained if pretrained is None else pretrained,
                       global_part=m.global_part, local_part=m.local_part, last_stride=m.last_stride,
                       pooling=m.pooling, reduce_dim=m.reduce_dim, triplet_on=m.triplet_on)


def load_model(path: str | Path) -> tuple[CGPN, Config]:
    """Rebuild the network stored in a checkpoint, with its weights, and the config it was trained with."""
    state = load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    model = build_model_from_config(cfg, state["num_classes"], pretrained=False)
    load_weights(model, state["model"], source=str(path))
    return model, cfg


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str,
                 skip_classifiers: bool = False) -> None:
    """Load ``weights`` into ``model``, refusing (with the first bad keys) a state dict of another model."""
    own = model.state_dict()
    if skip_classifiers:
        weights = {k: v for k, v in weights.items() if ".classifier." not in k}
    missing = [k for k in own if k not in weights and not (skip_classifiers and ".classifier." in k)]
    unexpected = [k for k in weights if k not in own]
    shape = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    if missing or unexpected or shape:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("other shape", shape)) if keys)
        raise CheckpointError(f"checkpoint '{source}' does not fit this model ({detail}); "
                              f"it was trained with another model.name, backbone or number of classes")
    model.load_state_dict(weights, strict=not skip_classifiers)

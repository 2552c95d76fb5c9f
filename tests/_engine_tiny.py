"""Settings of a tiny, quick, deterministic training run (ResNet-18 at 32 x 16, 8-image batches, 1 thread)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path, out: Path, **extra: object) -> list[str]:
    """``--set`` strings: 48 synthetic images -> 6 iterations per epoch, 2 epochs, lr x0.1 after epoch 1."""
    values: dict[str, object] = {
        "output_dir": out, "data.dataset": "synthetic", "data.root": data_root,
        "model.backbone": "resnet18", "model.pretrained": "false",
        "data.height": 32, "data.width": 16, "data.batch_size": 8, "data.num_instances": 2,
        "data.epoch_mode": "images", "data.workers": 0, "data.test_batch_size": 64,
        "solver.epochs": 2, "solver.milestones": "[1]",
        "engine.threads": 1, "engine.deterministic": "true", "engine.progress": "false",
        "engine.tensorboard": "false", "engine.log_period": 1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def cli_env() -> dict[str, str]:
    """The environment for ``python -m cgpn`` subprocesses: this checkout's sources first, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_cmd(overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "cgpn", "-q", "train", *(a for o in overrides for a in ("--set", o)), *extra]


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]

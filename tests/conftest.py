"""Shared fixtures: paths to ../shared data, a tiny synthetic data set, CPU thread settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# CI clones the project with ../shared beside it; CGPN_SHARED points elsewhere (e.g. from a worktree).
SHARED = Path(os.environ.get("CGPN_SHARED", ROOT.parent / "shared"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per worker: two workers on two cores


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real CUHK03 images and split files; never copied into the project)."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set CGPN_SHARED to the folder that holds data/)")
    return path


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic set (8 train ids, 6 test ids, 3 cameras) in Market-1501 layout."""
    from cgpn.data.datasets.synthetic import PRESETS, generate_synthetic

    out = tmp_path_factory.mktemp("tiny_synth")
    generate_synthetic(out, PRESETS["tiny"], progress=False)
    return out

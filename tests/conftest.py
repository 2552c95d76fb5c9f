"""Shared fixtures: paths to ../shared data, a tiny synthetic data set, CPU thread settings."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# CI clones the project with ../shared beside it; CGPN_SHARED points elsewhere (e.g. from a worktree).
SHARED = Path(os.environ.get("CGPN_SHARED", ROOT.parent / "shared"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per worker: two workers on two cores


def _runs_state() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the checkout's runs/ (what `make demo` writes)."""
    state = {}
    for folder, _, files in os.walk(ROOT / "runs"):
        for name in files:
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                state[path] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(autouse=True)
def _checkout_runs_untouched():
    """A test never writes the checkout's runs/: it holds the user's own runs (`make demo`), and a test that
    depends on them passes or fails by what the working tree holds."""
    before = _runs_state()
    yield
    after = _runs_state()
    changed = sorted(set(before) ^ set(after) | {p for p in before.keys() & after.keys() if before[p] != after[p]})
    assert not changed, f"the test wrote into the checkout's runs/: {changed[:3]}"


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

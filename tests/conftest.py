"""Shared fixtures: paths to ../shared data, a tiny synthetic data set, a network trained briefly on real
CUHK03 images, CPU thread settings."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
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
def _onnx_cache_under_basetemp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs the extractor / embedder export go to this session's temporary folder, never ~/.cache."""
    monkeypatch.setenv("CGPN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "onnx_cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ResNet-18 CGPN checkpoint at 64 x 32 (``serve_helpers.make_checkpoint``), one per module."""
    from serve_helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


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


# A few CPU minutes of training of the demo-sized CGPN (ResNet-18, no ImageNet weights) on the real mini set.
MINI_RECIPE = [
    "data.dataset=market1501", "data.verify_counts=ignore",  # a partial copy, read by the Market-1501 reader
    "data.height=64", "data.width=32", "data.workers=0",
    "solver.lr=0.05", "solver.epochs=8", "solver.milestones=[7]",
    "engine.precision=fp32",  # the same network on CPUs with and without bf16 units
    "engine.eval_at_start=true", "engine.eval_period=0", "engine.tensorboard=false", "engine.progress=false",
]


@dataclass
class MiniRun:
    """A trained checkpoint on ``cuhk03-np-mini/labeled`` and its evaluations before / after training."""

    root: Path  # the data set
    checkpoint: Path  # last.pt
    before: dict  # Rank-1, Rank-10, mAP (fractions) and the summary line of the untrained network
    after: dict  # the same after training
    losses: list[float]  # mean total loss per epoch


@pytest.fixture(scope="session")
def mini_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> MiniRun:
    """``MINI_RECIPE`` trained once per test session: under pytest-xdist the first worker that needs it
    trains, the others wait on a file lock and read the record it leaves."""
    from filelock import FileLock

    root = shared_data / "cuhk03-np-mini" / "labeled"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, common to all its workers
    out = shared / "mini_run"
    record = out / "record.json"
    with FileLock(str(shared / "mini_run.lock")):
        if not record.is_file():
            from cgpn.config import load_config
            from cgpn.engine.trainer import train

            cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={root}", f"output_dir={out}", *MINI_RECIPE])
            result = train(cfg)
            first, last = result.evaluations[0], result.evaluations[max(result.evaluations)]
            numbers = [{"rank1": r.rank(1), "rank10": r.rank(10), "mAP": r.mAP, "summary": r.summary()}
                       for r in (first, last)]
            record.write_text(json.dumps({"before": numbers[0], "after": numbers[1],
                                          "losses": [e["total"] for e in result.epoch_losses]}))
    saved = json.loads(record.read_text())
    return MiniRun(root, out / "last.pt", saved["before"], saved["after"], saved["losses"])

"""Helpers of the serving tests: a small untrained checkpoint, the CLI in-process or in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cgpn.cli import main
from cgpn.config import Config
from cgpn.engine.checkpoint import build_model_from_config, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 64, 32  # small images: ResNet-18 maps of 4 x 2, enough rows for the 4 stripes of branch 3


def make_checkpoint(path: Path, name: str = "cgpn", num_classes: int = 5, seed: int = 0) -> Path:
    """An untrained ResNet-18 ``name`` at 64 x 32, saved as cgpn train would (no training: weights are seeded)."""
    cfg = Config.from_dict({"model": {"name": name, "backbone": "resnet18", "pretrained": False},
                            "data": {"height": HEIGHT, "width": WIDTH, "workers": 0, "test_batch_size": 32}})
    torch.manual_seed(seed)
    model = build_model_from_config(cfg, num_classes, pretrained=False)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": num_classes,
                           "epoch": 0})
    return path


@dataclass
class Run:
    """Exit status and output of one ``cgpn`` command."""

    returncode: int
    stdout: str
    stderr: str


def cli(capsys: pytest.CaptureFixture, *args: str) -> Run:
    """``cgpn -q ARGS`` in this process (``cgpn.cli.main``): a subprocess would spend ~10 s importing torch."""
    capsys.readouterr()
    code = main(["-q", *args])
    out = capsys.readouterr()
    return Run(code, out.out, out.err)


def run_cli(*args: str, cache: Path, timeout: int = 300) -> Run:
    """``python -m cgpn -q ARGS`` in a subprocess, this checkout's sources first on the path."""
    env = dict(os.environ, CGPN_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, "-m", "cgpn", "-q", *args], capture_output=True, text=True, env=env,
                            timeout=timeout)
    return Run(result.returncode, result.stdout, result.stderr)


def error_line(result: Run) -> str:
    """The one stderr line of a failed command (asserting there is exactly one and the status is 2)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]

"""Helpers of the serving tests: a small untrained checkpoint, a tiny gallery, the CLI in-process or in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cgpn.cli import main
from cgpn.config import Config
from cgpn.engine.checkpoint import build_model_from_config, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 64, 32  # small images: ResNet-18 maps of 4 x 2, enough rows for the 4 stripes of branch 3


def make_checkpoint(path: Path, name: str = "cgpn", num_classes: int = 5, seed: int = 0, height: int = HEIGHT,
                    width: int = WIDTH) -> Path:
    """An untrained ResNet-18 ``name`` (64 x 32 unless told), saved as cgpn train would (weights are seeded)."""
    cfg = Config.from_dict({"model": {"name": name, "backbone": "resnet18", "pretrained": False},
                            "data": {"height": height, "width": width, "workers": 0, "test_batch_size": 32}})
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


@dataclass
class Gallery:
    """A searchable tiny gallery: the checkpoint, its features file and its exact index."""

    checkpoint: Path
    features: Path
    index: Path
    images: Path  # the gallery's image folder
    queries: Path  # a folder of query images


def make_gallery(data_root: Path, out: Path) -> Gallery:
    """``cgpn extract`` (eager) of ``data_root``'s gallery with an untrained tiny checkpoint, then ``cgpn index
    build``: what a user does before ``cgpn serve``."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(out / "tiny.pt")
    gallery = Gallery(checkpoint, out / "gallery.npz", out / "gallery.faiss", data_root / "bounding_box_test",
                      data_root / "query")
    assert main(["-q", "extract", "--checkpoint", str(checkpoint), "--images", str(gallery.images), "--out",
                 str(gallery.features), "--backend", "eager", "--device", "cpu"]) == 0
    assert main(["-q", "index", "build", "--features", str(gallery.features), "--out", str(gallery.index)]) == 0
    return gallery


def cli_search(capsys: pytest.CaptureFixture, gallery: Gallery, query: Path, topk: int) -> list[dict]:
    """``cgpn search --json`` of one query image (eager, as the gallery was extracted): its ranked hits."""
    run = cli(capsys, "search", "--index", str(gallery.index), "--query", str(query), "--topk", str(topk), "--json",
              "--backend", "eager", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    (report,) = json.loads(run.stdout)
    return report["results"]


@contextlib.contextmanager
def serve_process(gallery: Gallery, *extra: str, timeout: float = 180) -> Iterator[str]:
    """``cgpn serve`` in a subprocess on a free loopback port (``--port 0``); yields its URL, then stops it with
    Ctrl-C (SIGINT) and checks that it exits cleanly."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "cgpn", "serve", "--index", str(gallery.index), "--queries", str(gallery.queries),
           "--port", "0", "--backend", "eager", "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        try:
            first = lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"cgpn serve printed no URL in {timeout} s")
        match = re.search(r"at (http://(?:127\.0\.0\.1|\[::1\]):\d+) ", first)
        assert match, (first, proc.poll())
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        stderr = proc.stderr.read()
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]

"""cgpn.runtime: an exported ONNX file runs with the preprocessing of its metadata, files that are not cgpn's
are refused in one line, and a damaged entry of the ONNX cache is exported again instead of failing every run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from cgpn.errors import CheckpointError, ConfigError, ImageError
from cgpn.export import export_onnx
from cgpn.extractor import FeatureExtractor
from cgpn.runtime import Runtime
from serve_helpers import HEIGHT, WIDTH, cli, error_line, make_checkpoint


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGPN_CACHE_DIR", str(tmp_path / "cache"))


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("no_flip", [False, True])
def test_an_exported_file_runs_with_its_metadata(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 no_flip: bool) -> None:
    onnx_file = tmp_path / "model.onnx"
    args = ["export", "--checkpoint", str(checkpoint), "--onnx", str(onnx_file)] + (["--no-flip"] if no_flip else [])
    assert cli(capsys, *args).returncode == 0
    runtime = Runtime(onnx_file, device="cpu")
    assert (runtime.backend, runtime.input_shape, runtime.flip) == ("onnx", (HEIGHT, WIDTH), not no_flip)
    assert runtime.mean == (0.485, 0.456, 0.406) and runtime.std == (0.229, 0.224, 0.225)  # ImageNet's
    assert runtime.config.model.backbone == "resnet18" and runtime.model is None and runtime.onnx_file == onnx_file
    eager = Runtime(checkpoint, device="cpu", backend="eager", flip=not no_flip)
    torch.testing.assert_close(runtime(_images()), eager(_images()), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match=r"was exported (with|without) flip averaging and cannot change it"):
        Runtime(onnx_file, device="cpu", flip=no_flip)
    with pytest.raises(ConfigError, match="is an ONNX file: it runs on backend onnx"):
        Runtime(onnx_file, device="cpu", backend="bf16")
    if not no_flip:  # files and arrays through the file's preprocessing, as from the checkpoint
        pixels = [np.random.default_rng(i).integers(0, 256, (100, 40, 3), dtype=np.uint8) for i in range(2)]
        torch.testing.assert_close(FeatureExtractor(onnx_file, device="cpu")(pixels),
                                   FeatureExtractor(checkpoint, device="cpu", backend="eager")(pixels),
                                   atol=1e-4, rtol=0)


def test_onnx_files_that_are_not_cgpns_are_one_line(checkpoint: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from cgpn.engine.checkpoint import load_model

    bare = export_onnx(load_model(checkpoint)[0], tmp_path / "bare.onnx", HEIGHT, WIDTH)  # no metadata written
    with pytest.raises(CheckpointError, match=r"'.*bare\.onnx' carries no valid cgpn metadata \(no 'cgpn\.height'\)"
                                              r"; export the checkpoint with: cgpn export"):
        Runtime(bare, device="cpu")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 32, 3), np.uint8)).save(images / "a.png")
    out = tmp_path / "feats.npz"
    line = error_line(cli(capsys, "extract", "--checkpoint", str(bare), "--images", str(images), "--out", str(out)))
    assert "carries no valid cgpn metadata" in line and not out.exists()
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(bare.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot load ONNX file '.*damaged\.onnx': .*Protobuf parsing failed"):
        Runtime(damaged, device="cpu")
    assert damaged.stat().st_size == 1000  # the user's file is left alone
    with pytest.raises(CheckpointError, match=r"ONNX file '.*missing\.onnx' does not exist"):
        Runtime(tmp_path / "missing.onnx", device="cpu")


def test_a_damaged_cache_entry_is_exported_again(checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: a cache entry that cannot be loaded used to fail every later run and never repair itself."""
    entry = Runtime(checkpoint, device="cpu", backend="onnx").onnx_file
    assert entry.is_relative_to(tmp_path / "cache")
    good = entry.read_bytes()
    expected = Runtime(checkpoint, device="cpu", backend="eager")(_images())
    for damage in (b"", good[: len(good) // 2], b"\x08not onnx" * 64):  # empty, truncated, garbage
        entry.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cgpn.runtime"):
            repaired = Runtime(checkpoint, device="cpu", backend="onnx")
        assert any("cannot be loaded" in r.getMessage() and "exporting again" in r.getMessage()
                   for r in caplog.records), damage[:20]
        assert repaired.onnx_file == entry
        torch.testing.assert_close(repaired(_images()), expected, atol=1e-4, rtol=0)
        ort.InferenceSession(str(entry), providers=["CPUExecutionProvider"])  # repaired on disk

    def no_export(*args, **kwargs):
        raise AssertionError("the repaired entry should have been used")

    monkeypatch.setattr("cgpn.runtime.export_onnx", no_export)
    torch.testing.assert_close(Runtime(checkpoint, device="cpu", backend="onnx")(_images()), expected,
                               atol=1e-4, rtol=0)


def test_batches_are_checked_and_may_be_empty(checkpoint: Path) -> None:
    runtime = Runtime(checkpoint, device="cpu", backend="eager")
    assert runtime(torch.zeros(0, 3, HEIGHT, WIDTH)).shape == (0, 3072)
    with pytest.raises(ImageError, match=rf"expected normalised images \(B, 3, {HEIGHT}, {WIDTH}\), got shape "
                                         r"\(2, 3, 128, 64\); resize them"):
        runtime(torch.zeros(2, 3, 128, 64))
    with pytest.raises(ConfigError, match="backend must be one of"):
        Runtime(checkpoint, device="cpu", backend="tensorrt")


def test_auto_is_not_bf16_where_a_strided_convolution_makes_a_one_pixel_wide_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 32 x 16 a ResNet's layer3 makes 16 -> 8 -> 4 -> 2 -> 1 columns, where the CPU's bf16 convolutions are
    wrong on some CPUs (cgpn.engine.precision): auto takes an fp32 backend there even on a CPU with bf16 units,
    an explicit bf16 is refused; at 64 x 32 (2 columns) auto is bf16."""
    monkeypatch.setattr("cgpn.runtime.cpu_has_native_bf16", lambda: True)
    narrow = make_checkpoint(tmp_path / "narrow.pt", height=32, width=16)
    assert Runtime(narrow, device="cpu").backend in ("onnx", "channels_last")
    with pytest.raises(ConfigError, match=r"backend bf16: at 32 x 16 the strided convolution trunk\.layer3\.0\.conv1 "
                                          r"makes a 1-pixel-wide output"):
        Runtime(narrow, device="cpu", backend="bf16")
    assert Runtime(make_checkpoint(tmp_path / "wide.pt"), device="cpu").backend == "bf16"

"""ONNX export: onnxruntime against the PyTorch network at dynamic batch sizes 1 and 7; the export command."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from cgpn.config import ONNX_OPSET
from cgpn.engine.checkpoint import load_model
from cgpn.export import TOLERANCE, check_onnx, export_onnx
from serve_helpers import HEIGHT, WIDTH, cli, error_line, make_checkpoint


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


def test_onnx_matches_pytorch_at_batch_sizes_1_and_7(checkpoint: Path, tmp_path: Path) -> None:
    model, _ = load_model(checkpoint)
    model.eval()
    raw = export_onnx(model, tmp_path / "raw.onnx", HEIGHT, WIDTH, flip=False, normalize=False)
    full = export_onnx(model, tmp_path / "full.onnx", HEIGHT, WIDTH)
    for batch in (1, 7):
        x = torch.randn(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            f, f_mirror = model(x), model(x.flip(3))
        expected_full = F.normalize((f + f_mirror) / 2, dim=1)
        got_raw, got_full = _run(raw, x), _run(full, x)
        assert got_raw.shape == got_full.shape == (batch, 3072)
        assert np.abs(got_raw - f.numpy()).max() <= 1e-4  # the network's own 3072-d output
        assert np.abs(got_full - expected_full.numpy()).max() <= 1e-4  # flip-averaged and normalised
    for batch in (1, 7):
        check = check_onnx(full, model, HEIGHT, WIDTH, batch_size=batch)
        assert check.passed and check.max_abs_diff <= 1e-4 and check.min_cosine > 0.9999


def test_export_command_checks_and_describes_the_file(checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model.onnx"
    run = cli(capsys, "export", "--checkpoint", str(checkpoint), "--onnx", str(out), "--check-batch", "7")
    assert run.returncode == 0, run.stderr
    assert f"opset {ONNX_OPSET}" in run.stdout and f"(batch, 3, {HEIGHT}, {WIDTH})" in run.stdout
    check_line = next(line for line in run.stdout.splitlines() if line.startswith("check:"))
    assert "random batch of 7" in check_line and check_line.endswith("OK")

    proto = onnx.load(str(out), load_external_data=False)
    assert proto.opset_import[0].version == ONNX_OPSET
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic batch axis
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (meta["cgpn.height"], meta["cgpn.width"], meta["cgpn.flip"]) == (str(HEIGHT), str(WIDTH), "true")


def test_the_check_fails_for_another_network_and_the_command_exits_1(checkpoint: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph of another network (other weights), or one without the flip averaging asked for, is FAILED;
    ``cgpn export`` whose exporter wrote another network's graph says so and exits 1."""
    import cgpn.export

    model, _ = load_model(checkpoint)
    other, _ = load_model(make_checkpoint(tmp_path / "other.pt", seed=1))
    for graph, flip in ((export_onnx(other, tmp_path / "other.onnx", HEIGHT, WIDTH), True),
                        (export_onnx(model, tmp_path / "no_flip.onnx", HEIGHT, WIDTH, flip=False), False)):
        check = check_onnx(graph, model, HEIGHT, WIDTH)
        assert not check.passed and check.max_abs_diff > 10 * TOLERANCE, (graph, check)
        assert check.summary().endswith("FAILED")
        if not flip:  # the same graph passes when checked against what it computes
            assert check_onnx(graph, model, HEIGHT, WIDTH, flip=False).passed

    real_export = cgpn.export.export_onnx
    monkeypatch.setattr(cgpn.export, "export_onnx", lambda _, out, *a, **k: real_export(other, out, *a, **k))
    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    run = cli(capsys, "export", "--checkpoint", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"))
    assert run.returncode == 1, run.stdout + run.stderr
    check_line = next(line for line in run.stdout.splitlines() if line.startswith("check:"))
    assert check_line.endswith("FAILED") and "limit 1e-04" in check_line
    assert "not written" in run.stderr and run.stderr.count("\n") == 1
    assert (tmp_path / "m.onnx").read_bytes() == b"an earlier export"  # a failed graph never replaces a file
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")]  # and leaves no temporary


def test_export_without_onnxruntime_is_one_line(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    line = error_line(cli(capsys, "export", "--checkpoint", str(checkpoint), "--onnx", str(tmp_path / "m.onnx")))
    assert "onnxruntime is not installed" in line and "pip install onnxruntime" in line
    assert not (tmp_path / "m.onnx").exists()


def test_export_options_out_of_range_are_one_line(checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.onnx"
    line = error_line(cli(capsys, "export", "--checkpoint", str(checkpoint), "--onnx", str(out), "--opset", "9"))
    assert "--opset must be between 10 and 20, got 9" in line  # flip needs opset 10
    line = error_line(cli(capsys, "export", "--checkpoint", str(checkpoint), "--onnx", str(out), "--check-batch", "0"))
    assert "--check-batch must be at least 1, got 0" in line


def test_a_failed_export_leaves_no_file_and_the_model_as_it_was(checkpoint: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_model(checkpoint)
    model.train()
    out = tmp_path / "m.onnx"

    def broken_export(*args, **kwargs):
        Path(args[2]).write_bytes(b"half a graph")  # what a kill mid-export would leave
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(model, out, HEIGHT, WIDTH)
    assert model.training
    assert list(tmp_path.iterdir()) == []

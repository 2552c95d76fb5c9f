"""Files written whole or not at all (cgpn.files.atomic_path), and what a user sees when a path is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from cgpn.files import atomic_path
from serve_helpers import cli, error_line


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "feats.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.npz"]


def test_a_finished_write_replaces_the_file_and_keeps_the_suffix(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "ranks.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png"  # writers pick the format from it
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["ranks.png"]


def test_a_folder_as_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step,epoch,tag,value\n1,0,train/loss,2.0\n2,0,train/loss,1.5\n")
    folder = tmp_path / "curves.png"
    folder.mkdir()
    line = error_line(cli(capsys, "show", "--curves", str(run_dir), "--out", str(folder)))
    assert line == f"cgpn show: error: expected a file name, got a folder: '{folder}'"


def test_a_written_file_has_the_usual_permissions(tmp_path: Path) -> None:
    """Like open(): 0o666 less the umask (temporary files start at 0o600; a shared folder needs better)."""
    import os

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.npz") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.npz").stat().st_mode & 0o777 == 0o644

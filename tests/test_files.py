"""The rules of cgpn.files: files written whole or not at all, outputs that are inputs refused, folders replaced
only by their writer, one process per folder, and inputs read into one-line errors."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _code_payload import CodePayload
from _engine_tiny import cli_env
from cgpn.errors import CheckpointError, ConfigError, DatasetError, FolderInUseError
from cgpn.files import (
    FOLDER_MARKER,
    atomic_path,
    check_output_file,
    check_replaceable_folder,
    describe_file,
    load_torch_file,
    lock_folder,
    other_name,
    reading,
    write_folder,
)
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
    assert line == f"cgpn show: error: --out '{folder}' is a folder; expected a file name"


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


# --- issue 13: the rules of cgpn.files, with real processes where a kill or a second process is the point --------

_WRITER = """
import os, signal, sys
from cgpn.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(sys.argv[2].encode() * 1000)
    print(tmp, flush=True)
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # until the test closes stdin
"""

_FOLDER_WRITER = """
import os, signal, sys
from pathlib import Path
from cgpn.files import write_folder
with write_folder(sys.argv[1], "cgpn synth") as tmp:
    (tmp / "new.jpg").write_bytes(b"new")
    print(tmp, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""

_HOLDER = """
import sys
from cgpn.files import lock_folder
with lock_folder(sys.argv[1], "output_dir"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=cli_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_temporaries_of_killed_writes_go_at_the_next_write_and_live_ones_stay(tmp_path: Path) -> None:
    """A SIGKILLed writer's temporary is removed when that output is written again; a live writer's is not
    (removing it would make its rename fail); another output's temporary is that output's business."""
    target = tmp_path / "feats.npz"
    target.write_bytes(b"old")
    other = tmp_path / ".other.999999-abc.tmp.npz"  # a dead temporary of other.npz
    other.write_bytes(b"x")
    killed = _start(_WRITER, str(target), "k", "die")
    killed_tmp = Path(killed.stdout.readline().strip())
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert killed_tmp.is_file() and killed_tmp.name.startswith(".feats.") and target.read_bytes() == b"old"
    live = _start(_WRITER, str(target), "l", "wait")
    live_tmp = Path(live.stdout.readline().strip())

    with atomic_path(target) as tmp:
        tmp.write_bytes(b"mine")
    assert target.read_bytes() == b"mine"
    assert not killed_tmp.exists() and live_tmp.is_file() and other.is_file()

    live.stdin.close()
    assert live.wait(timeout=60) == 0
    assert target.read_bytes() == b"l" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "feats.npz"]


def test_an_output_that_is_an_input_is_refused_also_through_links(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    (tmp_path / "sym.pt").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.pt")
    (tmp_path / "sub").mkdir()
    for out in ("m.pt", "sym.pt", "hard.pt", "sub/../m.pt"):
        with pytest.raises(ConfigError, match=r"is --checkpoint .*\(the same file\): writing it would destroy that "
                                              r"input; choose another --out"):
            check_output_file(tmp_path / out, "--out", {"--checkpoint": ckpt})
    images = [tmp_path / f"000{i}_c1s1_000001_00.jpg" for i in range(3)]
    for image in images:
        image.write_bytes(b"jpeg")
    with pytest.raises(ConfigError, match="is an image of --images"):
        check_output_file(images[1], "--out", {"--checkpoint": ckpt, "an image of --images": images})
    assert check_output_file(tmp_path / "feats.npz", "--out", {"--checkpoint": ckpt}) == tmp_path / "feats.npz"
    (tmp_path / "old.npz").write_bytes(b"an earlier output")  # an existing file that is no input: may go
    assert check_output_file(tmp_path / "old.npz", "--out", {"--checkpoint": ckpt, "--images": None})
    assert ckpt.read_bytes() == b"weights"


def test_an_output_where_no_file_can_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"cannot be written: '.*a_file' is a file, not a folder"):
        check_output_file(blocker / "sub" / "f.npz", "--out")
    with pytest.raises(ConfigError, match="is a folder; expected a file name"):
        check_output_file(tmp_path, "--out")
    if Path("/proc/self").is_dir():  # read-only for everyone, root included
        with pytest.raises(ConfigError, match="no file can be created in '/proc'"):
            check_output_file("/proc/cgpn-test/f.npz", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the check leaves no trace


def test_a_suggested_command_never_writes_over_its_input() -> None:
    for given in ("feats.npz", "g.faiss", "runs/x/model"):
        for suffix in (".npz", ".faiss"):
            assert other_name(given, suffix).name != Path(given).name
            assert other_name(given, suffix).suffix == suffix
    assert other_name("g.faiss", ".npz") == Path("g.npz")


def test_a_folder_is_replaced_only_by_the_command_that_wrote_it(tmp_path: Path) -> None:
    out = tmp_path / "data"
    with write_folder(out, "cgpn synth") as tmp:
        (tmp / "a.jpg").write_bytes(b"first")
    assert json.loads((out / FOLDER_MARKER).read_text())["command"] == "cgpn synth"
    with pytest.raises(RuntimeError), write_folder(out, "cgpn synth") as tmp:  # a failure halfway
        (tmp / "b.jpg").write_bytes(b"half")
        raise RuntimeError("failed halfway")
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_MARKER, "a.jpg"]
    with pytest.raises(ConfigError, match="was written by cgpn synth; nothing was changed"):
        check_replaceable_folder(out, "cgpn synth-video")
    with write_folder(out, "cgpn synth") as tmp:
        (tmp / "b.jpg").write_bytes(b"second")
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_MARKER, "b.jpg"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"a person's own")
    refused = r"already holds files \(photo.jpg\) and was not written by cgpn synth"
    with pytest.raises(ConfigError, match=refused), write_folder(mine, "cgpn synth"):
        raise AssertionError("the block must not run")
    assert (mine / "photo.jpg").read_bytes() == b"a person's own"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine"]  # no temporary folder left


def test_a_killed_folder_write_leaves_the_old_folder_and_its_temporary_goes_next_time(tmp_path: Path) -> None:
    out = tmp_path / "data"
    with write_folder(out, "cgpn synth") as tmp:
        (tmp / "old.jpg").write_bytes(b"old")
    killed = _start(_FOLDER_WRITER, str(out))
    half = Path(killed.stdout.readline().strip())
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert (half / "new.jpg").is_file() and (out / "old.jpg").read_bytes() == b"old"
    with write_folder(out, "cgpn synth") as tmp:
        (tmp / "again.jpg").write_bytes(b"again")
    assert not half.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_folder_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _start(_HOLDER, str(run))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError) as info, lock_folder(run, "output_dir", "choose another folder"):
            raise AssertionError("a second holder")
        message = str(info.value)
        assert f"output_dir '{run}' is in use by another process (pid {holder.pid} on host {socket.gethostname()}, " \
               f"started " in message and message.endswith("wait for it to end, or choose another folder")
        started = datetime.datetime.fromisoformat(message.split("started ")[1].split(": ")[0])
        assert abs((datetime.datetime.now().astimezone() - started).total_seconds()) < 120
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait(timeout=60)
    with lock_folder(run, "output_dir"):
        pass


def _onnx_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(path))
    return path


def test_files_are_described_by_their_bytes_and_torch_files_never_run_code(tmp_path: Path) -> None:
    """Every file is named x.pt: what it is comes from its content, not its name."""
    import numpy as np
    import torch

    sentinel = tmp_path / "code_ran"
    files = {}
    (tmp_path / "empty").mkdir()
    files["empty"] = tmp_path / "empty" / "x.pt"
    files["empty"].write_bytes(b"")
    files["random"] = tmp_path / "random.pt"
    files["random"].write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    files["onnx"] = _onnx_model(tmp_path / "onnx.pt")
    files["pickle"] = tmp_path / "pickle.pt"
    files["pickle"].write_bytes(pickle.dumps(CodePayload(sentinel)))
    files["torch_code"] = tmp_path / "torch_code.pt"
    torch.save({"model": CodePayload(sentinel)}, files["torch_code"])
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, whole)
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    files["npz"] = tmp_path / "npz.pt"
    with files["npz"].open("wb") as f:
        np.savez(f, features=np.zeros((2, 3)))
    files["text"] = tmp_path / "text.pt"
    files["text"].write_text("solver:\n  lr: 0.01\n")
    expected = {"empty": "an empty file (0 bytes)", "random": "not a format cgpn knows (random or damaged bytes?)",
                "onnx": "an ONNX graph", "pickle": "a Python pickle that would import posix.system (Python code, "
                "which cgpn never runs)", "torch_code": "a PyTorch file whose pickle would import posix.system "
                "(Python code, which cgpn never runs)", "truncated": "a truncated or damaged zip archive (a copy or "
                "save cut short?)", "npz": "a NumPy .npz archive", "text": "a text file"}
    assert {k: describe_file(p) for k, p in files.items()} == expected
    assert describe_file(whole) == "a PyTorch file"
    for kind, path in files.items():
        with pytest.raises(CheckpointError) as info:
            load_torch_file(path, "checkpoint", "a checkpoint written by cgpn train", CheckpointError)
        message = str(info.value)
        assert "\n" not in message and "weights_only" not in message, message
        if kind == "empty":
            assert message == f"checkpoint '{path}' is empty (0 bytes; a copy or save cut short?); expected a " \
                              f"checkpoint written by cgpn train"
        else:
            assert message == f"checkpoint '{path}' cannot be loaded: it is {expected[kind]}; pass a checkpoint " \
                              f"written by cgpn train instead"
    with pytest.raises(CheckpointError, match=r"checkpoint '.*empty' is a folder, not a file"):
        load_torch_file(tmp_path / "empty", "checkpoint", "a checkpoint", CheckpointError)
    assert not sentinel.exists()
    os.system(f"touch {sentinel}")  # the payload would have worked: the check above means something
    assert sentinel.exists()


def test_reading_turns_any_failure_into_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError) as info, reading(path, "MSMT17 list", "lines like 'a.jpg 0'", DatasetError):
        path.read_text()  # UnicodeDecodeError
    assert str(info.value).startswith(f"cannot read MSMT17 list '{path}' ('utf-8' codec can't decode")
    assert str(info.value).endswith("it is not a format cgpn knows (random or damaged bytes?); expected lines "
                                    "like 'a.jpg 0'")
    with pytest.raises(DatasetError, match="my own message"), reading(path, "list", "lines", DatasetError):
        raise DatasetError("my own message")  # a cgpn error passes unchanged

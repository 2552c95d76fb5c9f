"""Issue 13 across the commands: no output overwrites an input, every value and output place is checked before
the work, and a file that is there but wrong (empty, truncated, another kind, a folder) is one line naming it."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shlex
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _code_payload import CodePayload
from _engine_tiny import tiny_overrides
from cgpn.engine.events import MetricsWriter, read_metrics
from cgpn.retrieval import FeatureFile, GalleryIndex, save_features
from serve_helpers import cli, error_line


@pytest.fixture
def data(tiny_synth: Path, tmp_path: Path) -> Path:
    """A copy of the tiny synthetic set: a command that broke a rule here would not spoil other tests' data."""
    return Path(shutil.copytree(tiny_synth, tmp_path / "data"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unit(rows: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(rows).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _synthetic(data: Path) -> list[str]:
    return ["--dataset", "synthetic", "--data-root", str(data)]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# --- class 2: an output that is one of the command's inputs ----------------------------------------------


def _link(kind: str, target: Path, link: Path) -> Path:
    (os.symlink if kind == "symlink" else os.link)(target, link)
    return link


# name -> (tmp_path, checkpoint copy, data copy) -> (argv, the input that must survive, what the line says)
OVERWRITES: dict[str, Callable[[Path, Path, Path], tuple[list[str], Path, str]]] = {
    "extract --out CHECKPOINT": lambda t, c, d: (
        ["extract", "--checkpoint", str(c), "--images", str(d / "query"), "--out", str(c)], c,
        f"--out '{c}' is --checkpoint (the same file)"),
    "extract --out IMAGE": lambda t, c, d: (
        ["extract", "--checkpoint", str(c), "--images", str(d / "query"), "--out", str(sorted((d / "query").iterdir())[1])],
        sorted((d / "query").iterdir())[1], "is an image of --images"),
    "extract --out HARD_LINK": lambda t, c, d: (
        ["extract", "--checkpoint", str(c), "--images", str(d / "query"), "--out", str(_link("hard", c, t / "f.npz"))],
        c, f"is --checkpoint '{c}' (the same file)"),
    "export --onnx CHECKPOINT": lambda t, c, d: (
        ["export", "--checkpoint", str(c), "--onnx", str(c)], c, f"--onnx '{c}' is --checkpoint (the same file)"),
    "export --onnx SYMLINK": lambda t, c, d: (
        ["export", "--checkpoint", str(c), "--onnx", str(_link("symlink", c, t / "m.onnx"))], c,
        "is --checkpoint"),
    "index build --out FEATURES": lambda t, c, d: (
        ["index", "build", "--features", str(_features(t)), "--out", str(t / "f.npz")], t / "f.npz",
        "is --features (the same file)"),
    "eval --plot SYMLINK": lambda t, c, d: (
        ["eval", "--checkpoint", str(c), *_synthetic(d), "--occlude", "0.3", "--plot",
         str(_link("symlink", c, t / "plot.png"))], c, "--plot"),
    "eval --plot IMAGE": lambda t, c, d: (
        ["eval", "--checkpoint", str(c), *_synthetic(d), "--occlude", "0.3", "--plot",
         str(sorted((d / "query").iterdir())[0])], sorted((d / "query").iterdir())[0], "is an image of the data set"),
    "show --out IMAGE": lambda t, c, d: (
        ["show", "--checkpoint", str(c), *_synthetic(d), "--out", str(sorted((d / "bounding_box_test").iterdir())[0])],
        sorted((d / "bounding_box_test").iterdir())[0], "is an image of the data set"),
    "train --config OUTPUT_DIR/config.yaml": lambda t, c, d: (
        ["train", "--config", str(_config(t / "run" / "config.yaml")), *_sets(tiny_overrides(d, t / "run"))],
        t / "run" / "config.yaml", "is where the run in output_dir"),
}


def _features(tmp: Path) -> Path:
    return save_features(FeatureFile(["a.jpg", "b.jpg"], _unit(2, 8)), tmp / "f.npz")


def _config(path: Path) -> Path:
    path.parent.mkdir(parents=True)
    path.write_text("# my experiment\nsolver:\n  lr: 0.02\n")
    return path


@pytest.mark.parametrize("case", list(OVERWRITES))
def test_no_command_writes_over_its_own_input(case: str, checkpoint: Path, data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Issue 13: ``cgpn extract --checkpoint m.pt ... --out m.pt`` turned a 251 MB checkpoint into a 68 KB
    feature file and exited 0; export and index build did the same. Also through symbolic and hard links."""
    ckpt = Path(shutil.copy(checkpoint, tmp_path / "m.pt"))
    argv, protected, needle = OVERWRITES[case](tmp_path, ckpt, data)
    before = _sha(protected)
    line = error_line(cli(capsys, *argv))
    assert needle in line, line
    assert "writing it would destroy that input" in line or "training would replace your file" in line
    assert _sha(protected) == before


def _suggested_commands(message: str) -> list[list[str]]:
    return [shlex.split(m) for m in re.findall(r"cgpn (?:index build|extract|export)( --[^;)]*)", message)]


def test_a_hint_never_suggests_writing_over_an_input(tmp_path: Path, checkpoint: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """The messages that suggest a command: the output it names is never one of the inputs it names (a
    features file given as --index used to get "cgpn index build --features feats.npz --out feats.npz")."""
    feats = _features(tmp_path).rename(tmp_path / "feats.npz")  # the name of the example in the old hint
    foreign = tmp_path / "other.npz"
    np.savez(foreign, a=np.zeros(2))
    lines = [error_line(cli(capsys, "search", "--index", str(feats), "--query", str(feats))),
             error_line(cli(capsys, "search", "--index", str(tmp_path / "f.faiss"), "--query", str(feats))),
             error_line(cli(capsys, "search", "--index", str(tmp_path / "missing.npz"), "--query", str(feats))),
             error_line(cli(capsys, "index", "build", "--features", str(foreign), "--out", str(tmp_path / "g.faiss")))]
    commands = [c for line in lines for c in _suggested_commands(line)]
    assert len(commands) == 4, lines
    for words in commands:
        flags = dict(zip(words[::2], words[1::2]))
        out = Path(flags.pop("--out"))
        assert out.name not in {Path(v).name for v in flags.values()}, words
        assert not out.exists() or out == tmp_path / "f.faiss", words  # nothing there, or what was asked for


# --- class 7: every value and output place is checked before the work -------------------------------------


def _beside_a_folder(checkpoint: Path, tmp: Path) -> Path:
    """A copy of ``checkpoint`` in a folder where ``occlusion.png`` (eval's default plot) is a folder."""
    (tmp / "run" / "occlusion.png").mkdir(parents=True)
    return Path(shutil.copy(checkpoint, tmp / "run" / "m.pt"))


def _refuse_work(monkeypatch: pytest.MonkeyPatch, *targets: str) -> None:
    """Make each ``module:attribute`` (the expensive step of a command) fail the test if it is ever reached."""
    for target in targets:
        module, name = target.split(":")

        def work(*args, _target=target, **kwargs):
            raise AssertionError(f"{_target} ran: the check came after the work")

        monkeypatch.setattr(f"{module}.{name}", work)


LATE = {  # command -> (argv given tmp_path, checkpoint and data, the expensive step, what the line says)
    "export --check-batch 0": (lambda t, c, d: ["export", "--checkpoint", str(c), "--onnx", str(t / "m.onnx"),
                                                "--check-batch", "0"],
                               "cgpn.export:export_onnx", "--check-batch must be at least 1, got 0"),
    "export --opset 9": (lambda t, c, d: ["export", "--checkpoint", str(c), "--onnx", str(t / "m.onnx"),
                                          "--opset", "9"], "cgpn.engine.checkpoint:load_model",
                         "--opset must be between 10 and 20, got 9"),
    "export into a file": (lambda t, c, d: ["export", "--checkpoint", str(c), "--onnx", str(t / "blocker" / "m.onnx")],
                           "cgpn.engine.checkpoint:load_model", "is a file, not a folder"),
    "extract into a file": (lambda t, c, d: ["extract", "--checkpoint", str(c), "--images", str(d / "query"),
                                             "--out", str(t / "blocker" / "sub" / "f.npz")],
                            "cgpn.extractor:FeatureExtractor", "is a file, not a folder"),
    "extract into /proc": (lambda t, c, d: ["extract", "--checkpoint", str(c), "--images", str(d / "query"),
                                            "--out", "/proc/cgpn/f.npz"],
                           "cgpn.extractor:FeatureExtractor", "no file can be created in '/proc'"),
    "eval --plot into a file": (lambda t, c, d: ["eval", "--checkpoint", str(c), *_synthetic(d), "--occlude", "0.3",
                                                 "--plot", str(t / "blocker" / "o.png")],
                                "cgpn.engine.robustness:evaluate_occlusion", "is a file, not a folder"),
    "eval --occlude, default plot a folder": (
        lambda t, c, d: ["eval", "--checkpoint", str(_beside_a_folder(c, t)), *_synthetic(d), "--occlude", "0.3"],
        "cgpn.engine.robustness:evaluate_occlusion", "occlusion.png' is a folder; expected a file name"),
    "eval --plot without --occlude": (lambda t, c, d: ["eval", "--checkpoint", str(c), "--plot", str(t / "o.png")],
                                      "cgpn.engine.checkpoint:load_model", "--plot draws the results of --occlude"),
    "eval --plot not a picture": (lambda t, c, d: ["eval", "--checkpoint", str(c), "--occlude", "0.3", "--plot",
                                                   str(t / "o.txt")], "cgpn.engine.checkpoint:load_model",
                                  "--plot must name a picture file"),
    "show --out into a file": (lambda t, c, d: ["show", "--checkpoint", str(c), *_synthetic(d), "--out",
                                                str(t / "blocker" / "r.png")],
                               "cgpn.engine.checkpoint:load_model", "is a file, not a folder"),
    "show --queries foo": (lambda t, c, d: ["show", "--checkpoint", str(c), *_synthetic(d), "--out", str(t / "r.png"),
                                            "--queries", "foo"], "cgpn.engine.checkpoint:load_model",
                           "--queries must be random, worst, best or comma-separated pids, got 'foo'"),
    "show --queries 999": (lambda t, c, d: ["show", "--checkpoint", str(c), *_synthetic(d), "--out", str(t / "r.png"),
                                            "--queries", "999"], "cgpn.engine.evaluation:test_features",
                           "no query image has pid 999"),
    "index build into a file": (lambda t, c, d: ["index", "build", "--features", str(_features(t)), "--out",
                                                 str(t / "blocker" / "g.faiss")],
                                "cgpn.retrieval.features:load_features", "is a file, not a folder"),
    "train output_dir=''": (lambda t, c, d: ["train", *_sets(tiny_overrides(d, t)), "--set", "output_dir="],
                            "cgpn.engine.trainer:train", "config key 'output_dir' must name a folder for the run"),
}


@pytest.mark.parametrize("case", list(LATE))
def test_values_and_output_places_are_checked_before_the_work(case: str, checkpoint: Path, data: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: ``export --check-batch 0`` wrote the ONNX file, then failed; extract and eval --plot into an
    unwritable folder failed after all the work; an empty output_dir trained into the current folder."""
    if "/proc" in case and not Path("/proc/self/root").is_dir():
        pytest.skip("no /proc: no folder that even root cannot write")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    argv, work, needle = LATE[case]
    argv = argv(tmp_path, checkpoint, data)
    _refuse_work(monkeypatch, work)
    monkeypatch.chdir(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    line = error_line(cli(capsys, *argv))
    assert needle in line, line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written (no m.onnx, no run files)


# --- classes 5 and 6: files that are there but wrong ------------------------------------------------------


def _onnx_of(checkpoint: Path) -> Path:
    """The ONNX graph of ``checkpoint`` (exported once, beside it)."""
    from cgpn.engine.checkpoint import load_model
    from cgpn.export import export_onnx

    path = checkpoint.with_suffix(".onnx")
    if not path.is_file():
        export_onnx(load_model(checkpoint)[0], path, 64, 32)
    return path


def _bad_checkpoint(kind: str, tmp: Path, good: Path) -> Path:
    path = tmp / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "onnx":
        shutil.copy(_onnx_of(good), path)
    elif kind == "pickle_with_code":
        path.write_bytes(pickle.dumps({"model": CodePayload(tmp / "code_ran")}))
    elif kind == "folder":
        path.mkdir()
    return path


BAD_CHECKPOINTS = {"empty": "is empty (0 bytes", "truncated": "truncated or damaged zip archive",
                   "random": "not a format cgpn knows", "onnx": "it is an ONNX graph",
                   "pickle_with_code": "would import posix.system (Python code, which cgpn never runs)",
                   "folder": "is a folder, not a file"}
LOADERS = {  # command -> argv given the bad file, the tmp folder and the data
    "eval": lambda p, t, d: ["eval", "--checkpoint", str(p)],
    "show": lambda p, t, d: ["show", "--checkpoint", str(p), "--out", str(t / "r.png")],
    "extract": lambda p, t, d: ["extract", "--checkpoint", str(p), "--images", str(d / "query"), "--out",
                                str(t / "f.npz"), "--backend", "eager"],
    "export": lambda p, t, d: ["export", "--checkpoint", str(p), "--onnx", str(t / "m.onnx")],
    "search": lambda p, t, d: ["search", "--index", str(_index(t)), "--query", str(d / "query"), "--checkpoint", str(p)],
    "train --resume": lambda p, t, d: ["train", "--resume", str(p)],
    "train --finetune": lambda p, t, d: ["train", *_sets(tiny_overrides(d, t / "run")), "--finetune", str(p)],
    "eval model.pretrained": lambda p, t, d: ["eval", *_synthetic(d), "--set", "model.backbone=resnet18", "--set",
                                              f"model.pretrained={p}", "--set", "data.workers=0"],
}


def _index(tmp: Path) -> Path:
    return GalleryIndex.build(FeatureFile(["a.jpg", "b.jpg"], _unit(2, 3072))).save(tmp / "g.faiss")


@pytest.mark.parametrize("command", list(LOADERS))
@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_a_file_that_is_not_a_checkpoint_is_one_line_in_every_command(kind: str, command: str, checkpoint: Path,
                                                                     data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Issue 13: a zero-byte checkpoint gave a traceback (exit 1) in every command that loads one; for random
    bytes, an ONNX file or a pickle carrying code the message passed on torch's advice to retry with
    weights_only=False; a folder was "does not exist". Now: one line, what the file is, what to pass."""
    path = _bad_checkpoint(kind, tmp_path, checkpoint)
    line = error_line(cli(capsys, *LOADERS[command](path, tmp_path, data)))
    assert f"'{path}'" in line and BAD_CHECKPOINTS[kind] in line, line
    assert "weights_only" not in line and "Traceback" not in line
    assert ("torchvision's resnet18" if command == "eval model.pretrained" else "written by cgpn train") in line
    assert not (tmp_path / "code_ran").exists()
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "f.npz").exists()


def test_a_torn_last_row_of_metrics_csv_is_dropped_on_resume_and_in_show_curves(tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    """Issue 13: a torn last row of metrics.csv survived a resume and then crashed ``show --curves``. A kill
    while a row is written leaves it without its line end: it is dropped, even when what is there parses
    (here the lr 0.01 cut to 0.0). A damaged row elsewhere is one line naming the file and the line."""
    run = tmp_path / "run"
    run.mkdir()
    complete = "step,epoch,tag,value\r\n1,1,train/total,2.5\r\n2,1,train/total,2.25\r\n"
    (run / "metrics.csv").write_bytes((complete + "2,1,train/lr,0.0").encode())
    assert read_metrics(run) == {"train/total": [(1, 1, 2.5), (2, 1, 2.25)]}
    assert cli(capsys, "show", "--curves", str(run), "--out", str(tmp_path / "c.png")).returncode == 0
    assert Image.open(tmp_path / "c.png").size[0] > 0

    MetricsWriter(run, tensorboard=False, start_step=2).close()  # a resume from the checkpoint of step 2
    assert (run / "metrics.csv").read_bytes() == complete.encode()

    (run / "metrics.csv").write_text("step,epoch,tag,value\n1,1,train/total,2.5\n2,1,train/total\n3,1,train/lr,1\n")
    line = error_line(cli(capsys, "show", "--curves", str(run), "--out", str(tmp_path / "c.png")))
    assert line == f"cgpn show: error: '{run / 'metrics.csv'}' line 3 is not a row of step,epoch,tag,value: " \
                   f"'2,1,train/total' (damaged; delete that line)"


def _png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG of (H, W) grey or (H, W, 3) RGB ``pixels``, encoded here from the PNG specification (one
    zlib stream of scanlines, each with filter 0 and big-endian samples), not by PIL."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_a_16_bit_png_is_decoded_to_its_high_byte_not_white(tmp_path: Path, checkpoint: Path) -> None:
    """Issue 13: a 16-bit grey PNG was read as white and gave a wrong feature without a word. It now gives
    the image's high byte, as PIL gives for a 16-bit RGB PNG, and the feature of the same image in 8 bits."""
    from cgpn.data.check import decode_problem
    from cgpn.data.loader import read_image
    from cgpn.errors import ImageError
    from cgpn.extractor import FeatureExtractor

    values = (np.arange(64 * 32, dtype=np.uint32) * 31 % 65536).astype(np.uint16).reshape(64, 32)
    high = (values >> 8).astype(np.uint8)  # by hand: 0x1234 -> 0x12
    for name, pixels in (("grey16.png", values), ("rgb16.png", np.stack([values] * 3, axis=-1))):
        got = np.asarray(read_image(str(_png16(tmp_path / name, pixels))))
        assert got.shape == (64, 32, 3) and (got == high[..., None]).all(), name
    Image.fromarray(high).save(tmp_path / "grey8.png")
    extractor = FeatureExtractor(checkpoint, device="cpu", backend="eager")
    f16, f8 = extractor([tmp_path / "grey16.png", tmp_path / "grey8.png"])
    assert torch.equal(f16, f8)

    Image.fromarray(np.full((8, 4), 0.5, np.float32)).save(tmp_path / "float.tif")  # no agreed scale: refused
    with pytest.raises(ImageError, match=r"cannot read image '.*float.tif': floating-point pixels"):
        read_image(str(tmp_path / "float.tif"))
    assert decode_problem(str(tmp_path / "float.tif"))[0].startswith("ValueError: floating-point pixels")


def test_files_that_are_there_but_wrong_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated .npz, a _base_ that is not a string, a binary config, a folder where a file is expected and
    a file where a folder is expected: each one line naming the file."""
    feats = _features(tmp_path)
    (tmp_path / "cut.npz").write_bytes(feats.read_bytes()[:-100])
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "folder.npz").mkdir()
    for name, needle in (("cut.npz", "cannot read features file"), ("empty.npz", "is empty (0 bytes"),
                         ("folder.npz", "is a folder, not a file")):
        line = error_line(cli(capsys, "index", "build", "--features", str(tmp_path / name), "--out",
                              str(tmp_path / "g.faiss")))
        assert needle in line and f"'{tmp_path / name}'" in line, line
    for base, shown in (("5", "5"), ("[a.yaml, b.yaml]", "['a.yaml', 'b.yaml']")):
        (tmp_path / "c.yaml").write_text(f"_base_: {base}\nsolver:\n  lr: 0.1\n")
        line = error_line(cli(capsys, "train", "--config", str(tmp_path / "c.yaml")))
        assert line == f"cgpn train: error: config file '{tmp_path / 'c.yaml'}': _base_ must name another YAML " \
                       f"file (e.g. _base_: market1501.yaml), got {shown}"
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    assert "cannot read config file" in error_line(cli(capsys, "train", "--config", str(tmp_path / "bin.yaml")))
    assert "'" + str(tmp_path) + "' is a folder, not a file" in \
        error_line(cli(capsys, "train", "--config", str(tmp_path)))
    assert "'" + str(tmp_path) + "' is a folder, not a file" in \
        error_line(cli(capsys, "search", "--index", str(tmp_path), "--query", str(feats)))
    assert f"image folder '{feats}' is a file, not a folder" in \
        error_line(cli(capsys, "extract", "--checkpoint", str(feats), "--images", str(feats), "--out",
                       str(tmp_path / "x.npz")))
    assert f"run folder '{feats}' is a file" in \
        error_line(cli(capsys, "show", "--curves", str(feats), "--out", str(tmp_path / "c.png")))


def test_every_verb_prints_help(capsys: pytest.CaptureFixture) -> None:
    """The README's promise starts here: every verb (and index's action) answers --help with exit status 0."""
    import argparse

    from cgpn.cli import build_parser, main

    def verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += [(*prefix, name), *verbs(sub, (*prefix, name))]
        return found

    names = verbs(build_parser())
    assert {("synth",), ("train",), ("eval",), ("show",), ("extract",), ("index", "build"), ("search",),
            ("export",), ("check-data",)} <= set(names)
    for verb in names:
        with pytest.raises(SystemExit) as exit_:
            main([*verb, "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: cgpn {' '.join(verb)}")


def test_a_checkpoint_of_a_run_with_a_blank_output_dir_still_loads(tmp_path: Path, checkpoint: Path) -> None:
    """output_dir='' is now refused (it trained into the current folder); a checkpoint such a run wrote still
    loads, its run folder taken to be the checkpoint's folder."""
    from cgpn.config import load_config
    from cgpn.engine.checkpoint import load_model
    from cgpn.errors import ConfigError

    state = torch.load(checkpoint, weights_only=True)
    state["config"]["output_dir"] = ""
    torch.save(state, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[1].output_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="config key 'output_dir' must name a folder for the run"):
        load_config(None, ["output_dir="])

"""The command line: verbs listed, and every user mistake of issue 3 ends in one line with exit status 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from _engine_tiny import cli_env
from cgpn.cli import build_parser, main

VERBS = ("synth", "train", "eval", "show")
HEAVY = ("torch", "torchvision", "faiss", "onnxruntime", "scipy", "matplotlib")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cgpn", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


def test_help_lists_the_verbs():
    result = _run("--help")
    assert result.returncode == 0
    assert all(verb in result.stdout for verb in VERBS)


def _verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command of the parser, e.g. ("index", "build"), with its own parser: verbs added later too."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(((*path, name), sub))
                found += _verbs(sub, (*path, name))
    return found


def test_every_verb_prints_its_help(capsys):
    """README: every verb prints --help (exit 0, its usage line, each of its options); the verbs come from the
    parser itself, so a new one is covered without touching this test."""
    verbs = _verbs(build_parser())
    assert {path[0] for path, _ in verbs} >= {*VERBS, "check-data", "extract", "index", "search", "export"}
    assert ("index", "build") in {path for path, _ in verbs}
    for path, sub in verbs:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0, path
        assert out.startswith(f"usage: cgpn {' '.join(path)}"), out[:200]
        options = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
        assert options and all(o in out for o in options), (path, [o for o in options if o not in out])


def test_import_cgpn_loads_nothing_heavy():
    """README: `import cgpn` loads nothing heavy until a name is used (cgpn --help neither); using a name
    loads what it needs."""
    code = ("import contextlib, io, sys, cgpn, cgpn.cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    cgpn.cli.main(['--help'])\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
            "cgpn.build_model\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded, used = result.stdout.splitlines()
    assert loaded == "", f"import cgpn loaded {loaded}"
    assert used == "True"  # the lazy name does load its module


def test_every_lazy_name_of_cgpn_is_its_modules_object():
    """README: `from cgpn import build_model, evaluate, FeatureExtractor, load_config, train`; ``cgpn.__all__``
    names exactly the lazy names, each public in the module that defines it, and the README's ``evaluate``
    line gives the metrics of a case worked by hand."""
    import importlib

    import numpy as np

    import cgpn
    from cgpn import FeatureExtractor, build_model, evaluate, load_config, train  # noqa: F401 (the README's line)

    assert sorted(cgpn.__all__) == sorted(cgpn._EXPORTS)  # every public name is served lazily, and only those
    for name, module in cgpn._EXPORTS.items():
        defined_in = importlib.import_module(module)
        assert name in getattr(defined_in, "__all__", [name]) and getattr(cgpn, name) is getattr(defined_in, name), name
    # 1 query (id 1, camera 0); gallery ids 2, 1, 1 of camera 1 at distances 0.1, 0.2, 0.3: matches at ranks
    # 2 and 3, so Rank-1 0, Rank-2 1, AP (1/2 + 2/3) / 2 = 7/12, INP 2 matches / rank 3 of the last = 2/3.
    r = evaluate(np.array([[0.1, 0.2, 0.3]]), np.array([1]), np.array([2, 1, 1]), np.array([0]), np.array([1, 1, 1]),
                 max_rank=3)
    assert (r.rank(1), r.rank(2)) == (0.0, 1.0)
    assert r.mAP == pytest.approx(7 / 12) and r.mINP == pytest.approx(2 / 3)


def test_error_is_one_line_with_exit_2_and_debug_shows_the_traceback(tmp_path):
    result = _run("train", "--config", "configs/demo.yaml", "--set", f"data.root={tmp_path / 'missing'}",
                  "--set", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "data root" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    debug = _run("--debug", "train", "--config", "configs/demo.yaml", "--set", f"data.root={tmp_path / 'missing'}",
                 "--set", f"output_dir={tmp_path / 'run'}")
    assert "Traceback" in debug.stderr


def _error_line(capsys, *argv: str) -> str:
    code = main(["-q", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if "error:" in line]) == 1
    assert not any("Traceback" in line for line in err), err
    return next(line for line in err if "error:" in line)


@pytest.mark.parametrize(("override", "needle"), [
    ("model.name=cgpn7", "unknown model 'cgpn7'"),
    ("model.backbone=resnet5", "unknown backbone 'resnet5'"),
    ("model.bakbone=resnet18", "unknown config key 'model.bakbone'; did you mean 'model.backbone'"),
    ("data.batch_size=10", "must be a multiple of data.num_instances"),
])
def test_config_mistakes(capsys, tiny_synth, tmp_path, override, needle):
    line = _error_line(capsys, "train", "--config", "configs/demo.yaml", "--set", f"data.root={tiny_synth}",
                       "--set", f"output_dir={tmp_path}", "--set", override)
    assert needle in line


def test_malformed_data_folder(capsys, tmp_path):
    (tmp_path / "bounding_box_train").mkdir()
    (tmp_path / "query").mkdir()
    line = _error_line(capsys, "eval", "--config", "configs/demo.yaml", "--set", f"data.root={tmp_path}")
    assert "missing bounding_box_test/" in line and "0002_c1s1_000451_00.jpg" in line


def test_unparseable_file_name(capsys, tiny_synth, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    (root / "query" / "person.jpg").write_bytes((next((root / "query").iterdir())).read_bytes())
    line = _error_line(capsys, "eval", "--config", "configs/demo.yaml", "--set", f"data.root={root}")
    assert "cannot parse" in line and "person.jpg" in line


def test_missing_checkpoint(capsys, tmp_path):
    line = _error_line(capsys, "eval", "--checkpoint", str(tmp_path / "none.pt"))
    assert "does not exist" in line


def test_a_bad_image_read_in_a_loader_worker_is_one_line(capsys, tiny_synth, tmp_path):
    """torch re-raises a worker's error with the worker's traceback in the message; the user sees one line."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    bad = sorted((root / "bounding_box_test").glob("*.jpg"))[3]
    bad.write_bytes(b"\xff\xd8 truncated")
    line = _error_line(capsys, "eval", "--config", "configs/demo.yaml", "--set", f"data.root={root}",
                       "--set", "data.workers=2", "--set", "data.height=64", "--set", "data.width=32")
    assert line.startswith("cgpn eval: error: cannot read image") and bad.name in line, line

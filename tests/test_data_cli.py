"""Bad input through the CLI: one line on stderr naming the path, exit code 2, nothing else written;
corrupt images found by ``cgpn check-data``, skipped in training, an error in evaluation."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _reid_trees import cuhk03_official_tree, jpeg_bytes, market_tree, msmt_tree, write_images
from cgpn.cli import main
from cgpn.config import DataConfig
from cgpn.data.check import check_images
from cgpn.data.datasets import Market1501
from cgpn.data.loader import ImageDataset, build_test_loader, build_train_loader
from cgpn.errors import ImageError


def _bad_trees(root: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (check-data arguments, a regex the one error line must match)."""
    cases = {}

    def case(name: str, args: list[str], pattern: str) -> None:
        cases[name] = (args, pattern)

    case("wrong root", ["--dataset", "market1501", "--data-root", str(root / "nowhere")],
         r"data root '.*nowhere' is not a folder: it does not exist")
    market_tree(root / "m1")
    shutil.rmtree(root / "m1" / "Market-1501-v15.09.15" / "query")
    case("missing split folder", ["--dataset", "market1501", "--data-root", str(root / "m1")],
         r"Market-1501-v15.09.15' is not a market1501 folder: missing query/ \(expected .*0002_c1s1_000451_00.jpg")
    market_tree(root / "m2")
    write_images(root / "m2" / "Market-1501-v15.09.15" / "query", ["IMG_0042.jpg"])
    case("unparseable name", ["--dataset", "market1501", "--data-root", str(root / "m2")],
         r"cannot parse '.*query/IMG_0042.jpg': expected a name like 0002_c1s1_000451_00.jpg")
    market_tree(root / "m3")
    write_images(root / "m3" / "Market-1501-v15.09.15" / "query", ["0099_c2s1_000301_00.jpg"])
    case("query id not in gallery", ["--dataset", "market1501", "--data-root", str(root / "m3")],
         r"query': query identity 99 \(.*0099_c2s1_000301_00.jpg\) has no image in '.*bounding_box_test'")
    market_tree(root / "m4")
    for f in (root / "m4" / "Market-1501-v15.09.15" / "bounding_box_test").iterdir():
        f.unlink()
    case("empty folder", ["--dataset", "market1501", "--data-root", str(root / "m4")],
         r"bounding_box_test' holds no usable image \(expected files like 0002_c1s1_000451_00.jpg; it is empty\)")
    base = cuhk03_official_tree(root / "c1")
    shutil.copy(base / "cuhk03_new_protocol_config_labeled.mat", base / "cuhk03_release" / "cuhk-03.mat")
    case("mat of the wrong kind", ["--dataset", "cuhk03", "--data-root", str(root / "c1")],
         r"cuhk-03.mat' is not the official MATLAB v7.3 cuhk-03.mat .* found 'MATLAB 5.0 MAT-file")
    base = msmt_tree(root / "s1")
    (base / "list_gallery.txt").write_text("0000/0000_001_10_0303morning_0022_1.jpg\n")
    case("bad list line", ["--dataset", "msmt17", "--data-root", str(root / "s1")],
         r"list_gallery.txt' line 1: expected 'identity/file.jpg pid' like '0000/0000_000_01")
    (root / "f1").mkdir()
    case("empty folder set", ["--dataset", "folder", "--data-root", str(root / "f1")],
         r"f1' holds no identity folder \(expected one sub-folder per identity .*it is empty\)")
    case("unknown dataset", ["--dataset", "market", "--data-root", str(root / "m1")],
         r"unknown dataset 'market' in data.dataset 'market'; choose one of market1501, dukemtmc")
    return cases


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*")}


def _env() -> dict[str, str]:
    src = str(Path(__file__).parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[list[str], str]]]:
    root = tmp_path_factory.mktemp("bad")
    return root, _bad_trees(root)


CASES = ["wrong root", "missing split folder", "unparseable name", "query id not in gallery", "empty folder",
         "mat of the wrong kind", "bad list line", "empty folder set", "unknown dataset"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2(bad_cases, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each case through ``cgpn.cli.main`` (the console script's function), in this process."""
    root, cases = bad_cases
    before = _snapshot(root)
    code = main(["check-data", *cases[case][0]])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cgpn check-data: error: ")
    assert re.search(cases[case][1], lines[0]), lines[0]
    assert _snapshot(root) == before  # nothing written


def test_bad_input_as_separate_processes(bad_cases) -> None:
    """A case as a real ``python -m cgpn`` process: stderr holds the one line and nothing else."""
    root, cases = bad_cases
    picked = ["mat of the wrong kind"]
    before = _snapshot(root)
    procs = {name: subprocess.Popen([sys.executable, "-m", "cgpn", "check-data", *cases[name][0]], env=_env(),
                                    cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in picked}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and out == ""
        assert len(err.splitlines()) == 1 and re.search(cases[name][1], err), err
    assert _snapshot(root) == before


# --- corrupt images ---------------------------------------------------------------------------------------


@pytest.fixture
def corrupt_market(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Market tree with one truncated training JPEG and one empty query file; each training image is one flat
    colour of its own (``_colour``), so a replacement can be told apart from any other image. The truncated
    file is the last of its identity (pid 7) in sample order: the image after it belongs to pid 10."""
    base = market_tree(tmp_path)
    for i, path in enumerate(sorted((base / "bounding_box_train").glob("*.jpg"))):
        buf = io.BytesIO()
        Image.new("RGB", (4, 8), (30 * i, 250 - 25 * i, 60 + 20 * i)).save(buf, format="JPEG", quality=100)
        path.write_bytes(buf.getvalue())
    truncated = base / "bounding_box_train" / "0007_c3s3_077419_03.jpg"
    truncated.write_bytes(jpeg_bytes(1, (64, 128))[:300])
    empty = base / "query" / "0003_c1s6_015971_00.jpg"
    empty.write_bytes(b"")
    return tmp_path, truncated, empty


def _colour(path: str) -> np.ndarray:
    """The mean RGB of a (flat) image file, as decoded."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)


def test_check_data_reports_every_bad_file(corrupt_market, capsys: pytest.CaptureFixture[str]) -> None:
    root, truncated, empty = corrupt_market
    result = check_images(Market1501(root, verify_counts="ignore"), workers=2, progress=False)
    assert result.counts == {"train": 9, "query": 4, "gallery": 7}
    assert result.bad == {"train": [(str(truncated), result.bad["train"][0][1])],
                          "query": [(str(empty), result.bad["query"][0][1])]}
    assert "truncated" in result.bad["train"][0][1].lower()
    code = main(["-q", "check-data", "--dataset", "market1501", "--data-root", str(root),
                 "--set", "data.verify_counts=ignore"])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert f"bad train image: {truncated}: " in out and f"bad query image: {empty}: " in out
    assert "2 unreadable image(s)" in out and err == ""


def test_training_skips_and_counts_bad_images(corrupt_market) -> None:
    root, truncated, _ = corrupt_market
    ds = Market1501(root, verify_counts="ignore")
    cfg = DataConfig(height=16, width=8, batch_size=4, num_instances=2, workers=0)
    loader = build_train_loader(ds.train, cfg, seed=0)
    bad_index = next(i for i, s in enumerate(ds.train) if s.path == str(truncated))
    readable = [s for s in ds.train if s.path != str(truncated)]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet, as published
    colours = np.stack([(_colour(s.path) / 255 - mean) / std for s in readable])  # each file, normalised
    seen = 0
    for epoch in range(4):
        loader.batch_sampler.set_epoch(epoch)
        for images, pids, _, idx in loader:
            assert images.shape == (4, 3, 16, 8)
            for image, pid, i in zip(images, pids.tolist(), idx.tolist()):
                source = readable[int(np.argmin(np.abs(colours - image.mean((1, 2)).numpy()).sum(1)))]
                assert source.pid == pid  # every slot shows an image of its own identity ...
                if i == bad_index:  # ... and the bad file's slot the other image of pid 7
                    seen += 1
                    assert source.path == str(truncated.with_name("0007_c2s3_070952_01.jpg"))
                else:
                    assert source.path == ds.train[i].path
    assert seen > 0  # the bad file was drawn ...
    assert loader.dataset.skipped >= 1  # ... replaced and counted
    # with workers, the count comes back from the worker processes
    parallel = build_train_loader(ds.train, DataConfig(height=16, width=8, batch_size=4, num_instances=2,
                                                       workers=2), seed=0)
    for epoch in range(4):
        parallel.batch_sampler.set_epoch(epoch)
        list(parallel)
    assert parallel.dataset.skipped >= 1
    stop = build_train_loader(ds.train, DataConfig(height=16, width=8, batch_size=4, num_instances=2, workers=0,
                                                   on_bad_image="stop"), seed=0)
    with pytest.raises(ImageError, match=f"cannot read image '{truncated}'"):
        for epoch in range(4):
            stop.batch_sampler.set_epoch(epoch)
            list(stop)


def test_replacement_is_another_image_of_the_same_identity(corrupt_market) -> None:
    """pid 7's other image (0007_c2s3_...), pixel for pixel; not the next file in sample order (pid 10)."""
    root, truncated, _ = corrupt_market
    ds = Market1501(root, verify_counts="ignore")
    bad = next(i for i, s in enumerate(ds.train) if s.path == str(truncated))
    data = ImageDataset(ds.train, lambda im: np.asarray(im), on_bad_image="skip")
    pixels, pid, _, _ = data[bad]
    other = truncated.with_name("0007_c2s3_070952_01.jpg")
    assert pid == ds.train[bad].pid
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(other).convert("RGB")))
    assert data.skipped == 1


def test_evaluation_stops_on_a_bad_image(corrupt_market) -> None:
    root, _, empty = corrupt_market
    ds = Market1501(root, verify_counts="ignore")
    loader = build_test_loader(ds.query, DataConfig(height=16, width=8, workers=0,
                                                    on_bad_image="skip"))
    with pytest.raises(ImageError, match=f"cannot read image '{empty}'"):
        list(loader)

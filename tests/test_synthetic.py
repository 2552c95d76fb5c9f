"""The synthetic set: Market-1501 layout and names, determinism, the protocol's guarantees."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import pytest

from cgpn.data.datasets import SyntheticReid, build_dataset
from cgpn.data.datasets.synthetic import SyntheticSpec, generate_synthetic
from cgpn.errors import ConfigError

MARKET_NAME = re.compile(r"^(\d{4})_c(\d)s1_(\d{6})_00\.jpg$")  # e.g. 0002_c1s1_000451_00.jpg


def _digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


def test_layout_names_and_counts(tmp_path):
    spec = SyntheticSpec(train_ids=5, test_ids=4, images_per_id=5, cameras=3, distractors=3, seed=1)
    counts = generate_synthetic(tmp_path, spec, progress=False)
    assert counts == {"bounding_box_train": 25, "query": 8, "bounding_box_test": 4 * 3 + 3}
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        for path in (tmp_path / folder).iterdir():
            m = MARKET_NAME.match(path.name)
            assert m, path.name
            assert 1 <= int(m.group(2)) <= 3
    data = SyntheticReid(tmp_path)
    assert data.num_train_pids == 5 and sorted({s.pid for s in data.train}) == list(range(5))
    assert sum(s.pid == 0 for s in data.gallery) == 3  # distractors kept


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    spec = SyntheticSpec(train_ids=3, test_ids=2, images_per_id=4, cameras=2, seed=7)
    generate_synthetic(tmp_path / "a", spec, progress=False)
    generate_synthetic(tmp_path / "b", spec, progress=False)
    spec.seed = 8
    generate_synthetic(tmp_path / "c", spec, progress=False)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert set(a.values()).isdisjoint(c.values())


def _check_cross_camera_matches(root):
    data = build_dataset("synthetic", root)
    gallery_cams = defaultdict(set)
    for s in data.gallery:
        gallery_cams[s.pid].add(s.camid)
    query_cams = defaultdict(list)
    for q in data.query:
        query_cams[q.pid].append(q.camid)
        assert gallery_cams[q.pid] - {q.camid}, f"query {q.path} has no cross-camera match"
    assert all(len(set(cams)) == 2 for cams in query_cams.values())  # one query in each of two cameras
    assert not {s.pid for s in data.train} & set(query_cams)  # test identities unseen in training


def test_every_query_has_a_match_in_another_camera(tiny_synth):
    _check_cross_camera_matches(tiny_synth)


@pytest.mark.parametrize(("images", "cameras"), [(3, 3), (4, 2), (5, 2)])
def test_few_images_or_cameras_still_give_every_query_a_match(tmp_path, images, cameras):
    """Random gallery cameras alone left half of the queries without a match with 3 images and 2 cameras."""
    spec = SyntheticSpec(train_ids=2, test_ids=20, images_per_id=images, cameras=cameras, distractors=0, seed=1)
    generate_synthetic(tmp_path, spec, progress=False)
    _check_cross_camera_matches(tmp_path)


def test_one_gallery_image_needs_a_third_camera(tmp_path):
    with pytest.raises(ConfigError, match="must come from a third camera"):
        generate_synthetic(tmp_path, SyntheticSpec(test_ids=2, images_per_id=3, cameras=2), progress=False)


def test_images_differ_within_an_identity(tiny_synth):
    import numpy as np
    from PIL import Image

    data = build_dataset("synthetic", tiny_synth)
    same = [s for s in data.train if s.pid == 0][:2]
    a, b = (np.asarray(Image.open(s.path), dtype=np.float32) for s in same)
    assert a.shape == (128, 64, 3)
    assert np.abs(a - b).mean() > 5  # pose, camera and background change between shots


def _every_file(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_into_a_real_data_set_refuses_and_deletes_nothing(tmp_path, capsys):
    """Issue 13: pointed at a real data set by mistake, cgpn synth deleted 428 of its 476 images and exited 0;
    with a bad value it deleted first and crashed after. Now it refuses in one line and touches nothing."""
    from PIL import Image

    from serve_helpers import cli, error_line

    real = tmp_path / "Market-1501-v15.09.15"
    for i, sub in enumerate(("bounding_box_train", "query", "bounding_box_test", "gt_bbox")):
        (real / sub).mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (64, 128), (40 * i, 30 * j, 99)).save(real / sub / f"{j + 1:04d}_c{i + 1}s1_00000{j}_00.jpg")
    (real / "readme.txt").write_text("the real thing")
    before = _every_file(real)
    assert len(before) == 13

    line = error_line(cli(capsys, "synth", "--out", str(real), "--preset", "tiny"))
    assert f"'{real}' already holds files (bounding_box_test/, bounding_box_train/, gt_bbox/ and 2 more) and was " \
           f"not written by cgpn synth" in line and "nothing was changed" in line
    line = error_line(cli(capsys, "synth", "--out", str(real), "--height", "0"))
    assert line == "cgpn synth: error: --height must be at least 16, got 0"
    assert _every_file(real) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [real.name]  # no temporary folder beside it


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--height", "15", "--height must be at least 16, got 15"),
    ("--width", "7", "--width must be at least 8, got 7"),
    ("--occlusion", "1.5", "--occlusion must be between 0 and 1, got 1.5"),
    ("--truncation", "-0.1", "--truncation must be between 0 and 1, got -0.1"),
    ("--distractors", "-1", "--distractors must be at least 0, got -1"),
    ("--seed", "-3", "--seed must be at least 0, got -3"),
    ("--cameras", "1", "--cameras must be at least 2, got 1"),
    ("--images-per-id", "2", "--images-per-id must be at least 3, got 2"),
])
def test_synth_checks_every_value_before_touching_its_own_folder(tmp_path, capsys, flag, value, message):
    """A folder synth wrote may be replaced, but not by a run that then fails: the old set stays whole."""
    from serve_helpers import cli, error_line

    out = tmp_path / "synth"
    generate_synthetic(out, SyntheticSpec(train_ids=2, test_ids=2, images_per_id=4, cameras=2), progress=False)
    before = _every_file(out)
    assert error_line(cli(capsys, "synth", "--out", str(out), "--preset", "tiny", flag, value)) == \
        f"cgpn synth: error: {message}"
    assert _every_file(out) == before


def test_synth_replaces_its_own_folder_whole(tmp_path):
    """A second run into the same folder leaves exactly the second set: no image of the first lingers."""
    out = tmp_path / "synth"
    generate_synthetic(out, SyntheticSpec(train_ids=6, test_ids=4, images_per_id=5, cameras=3), progress=False)
    counts = generate_synthetic(out, SyntheticSpec(train_ids=2, test_ids=3, images_per_id=4, cameras=2, seed=5),
                                progress=False)
    assert counts == {"bounding_box_train": 2 * 4, "query": 3 * 2, "bounding_box_test": 3 * 2}
    assert {k: len(list((out / k).iterdir())) for k in counts} == counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_synth_occlusion_is_the_share_of_images_with_an_occluder(tmp_path, monkeypatch, share):
    """README: `cgpn synth --occlusion 0.3`: each image gets an occluder with that probability: of 700 images,
    none at 0, all at 1, and at 0.3 within 4 binomial standard deviations of 210 (sqrt(700 x 0.3 x 0.7) = 12.1)."""
    import cgpn.data.datasets.synthetic as synthetic
    from cgpn.cli import main

    painted = []
    occlude = synthetic._occlude
    monkeypatch.setattr(synthetic, "_occlude", lambda img, *a: (painted.append(img.shape), occlude(img, *a))[1])
    assert main(["-q", "synth", "--out", str(tmp_path / "s"), "--train-ids", "60", "--test-ids", "10",
                 "--images-per-id", "10", "--height", "16", "--width", "8", "--occlusion", str(share)]) == 0
    images = len(list((tmp_path / "s").rglob("*.jpg")))
    assert images == 700 and all(shape[:2] == (16, 8) for shape in painted)
    assert abs(len(painted) - share * images) <= 4 * (images * share * (1 - share)) ** 0.5

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

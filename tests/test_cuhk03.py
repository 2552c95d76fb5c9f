"""CUHK03 new protocol: the real split files, the real mini images, and a small cuhk-03.mat written here
(see ``_reid_trees.write_cuhk03_mat``); torchreid's CUHK03 reader is the reference for extraction and split."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from _reid_trees import (
    as_tuples,
    cuhk03_image,
    cuhk03_official_tree,
    same_up_to_relabel,
    torchreid_module,
    write_cuhk03_mat,
    write_images,
    write_split,
)
from cgpn.config import DataConfig
from cgpn.data.check import check_images
from cgpn.data.datasets import CUHK03, build_dataset
from cgpn.data.datasets.base import subset_stats
from cgpn.data.datasets.cuhk03 import read_protocol
from cgpn.errors import DatasetError

OFFICIAL = {  # issue 4 / the protocol's README: (ids, images)
    "labeled": {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)},
    "detected": {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)},
}


@pytest.fixture(scope="module")
def splits(shared_data: Path) -> Path:
    return shared_data / "cuhk03-splits"


# --- the real split files ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_real_split_file_counts(splits: Path, variant: str) -> None:
    protocol = read_protocol(splits / f"cuhk03_new_protocol_config_{variant}.mat")
    train, query, gallery = protocol.samples(Path("images"))
    for name, samples in (("train", train), ("query", query), ("gallery", gallery)):
        ids, images, cams = subset_stats(samples)
        assert (ids, images) == OFFICIAL[variant][name]
        assert cams == 2
    assert {s.pid for s in train} == {int(protocol.labels[i]) for i in protocol.train_idx}  # the protocol's ids
    assert {s.pid for s in query} == {s.pid for s in gallery}
    assert len({s.pid for s in query} | {int(protocol.labels[i]) for i in protocol.train_idx}) == 1467
    # one query per camera per test identity (the protocol's README)
    per_id = {}
    for s in query:
        per_id.setdefault(s.pid, []).append(s.camid)
    assert all(sorted(c) == [0, 1] for c in per_id.values())


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory: pytest.TempPathFactory, splits: Path) -> Path:
    """A root with the real split files, a stand-in cuhk-03.mat, and an image cache that is already
    complete (empty files under every name either split file lists), so nothing is extracted."""
    root = tmp_path_factory.mktemp("cuhk03_full")
    for variant in ("labeled", "detected"):
        cache = root / "images" / f"images_{variant}"  # data.cuhk03_cache=images: one folder per variant
        cache.mkdir(parents=True)
        shutil.copy(splits / f"cuhk03_new_protocol_config_{variant}.mat", root)
        for name in read_protocol(splits / f"cuhk03_new_protocol_config_{variant}.mat").filelist:
            (cache / name).touch()
    with h5py.File(root / "cuhk-03.mat", "w") as f:
        f.create_dataset("unused", data=[0])
    return root


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_reader_gives_official_counts_from_real_split(filled_cache: Path, variant: str) -> None:
    """The whole .mat path of the reader with the real split file; verify_counts=error checks issue 4's counts."""
    ds = CUHK03(filled_cache, labeled=variant == "labeled", cache_dir=filled_cache / "images",
                verify_counts="error", progress=False)
    cache = filled_cache / "images" / f"images_{variant}"
    assert {k: subset_stats(v)[:2] for k, v in (("train", ds.train), ("query", ds.query),
                                                 ("gallery", ds.gallery))} == OFFICIAL[variant]
    first = ds.query[0]
    assert Path(first.path).parent == cache and re.match(r"\d_\d{3}_[12]_\d{2}\.png$", Path(first.path).name)


# --- the real mini images (Market-style cuhk03-np folder) ------------------------------------------------


def test_real_mini_images(shared_data: Path, splits: Path) -> None:
    root = shared_data / "cuhk03-np-mini"
    ds = build_dataset("cuhk03", root, DataConfig(verify_counts="ignore"))
    assert [subset_stats(s) for s in (ds.train, ds.query, ds.gallery)] == [(50, 476, 2), (50, 100, 2), (50, 385, 2)]
    assert sorted({s.pid for s in ds.train}) == list(range(50))
    # every file agrees with the protocol: name {pid}_c{cam}s1_{index} -> labels/camId/subset of filelist[index]
    protocol = read_protocol(splits / "cuhk03_new_protocol_config_labeled.mat")
    subsets = {"train": set(protocol.train_idx), "query": set(protocol.query_idx),
               "gallery": set(protocol.gallery_idx)}
    for subset, samples in (("query", ds.query), ("gallery", ds.gallery)):
        for s in samples:
            index = int(Path(s.path).stem.split("_")[-1]) - 1
            assert index in subsets[subset]
            assert (s.pid, s.camid) == (protocol.labels[index], protocol.cam_ids[index] - 1)
    # every real image decodes; sizes within the README's range (46-201 px wide, 145-419 px high)
    check = check_images(ds, workers=2, progress=False)
    assert check.num_bad == 0 and sum(check.counts.values()) == 961
    assert check.min_size[0] >= 46 and check.max_size[0] <= 201
    assert check.min_size[1] >= 145 and check.max_size[1] <= 419
    train_index = [int(Path(s.path).stem.split("_")[-1]) - 1 for s in ds.train]
    assert set(train_index) <= subsets["train"]
    assert same_up_to_relabel(ds.train, [(s.path, protocol.labels[i], protocol.cam_ids[i] - 1)
                                         for s, i in zip(ds.train, train_index)])


def test_np_folder_variant_and_missing_subset(tmp_path: Path) -> None:
    for variant, cams in (("labeled", 1), ("detected", 2)):
        base = tmp_path / "cuhk03-np" / variant
        write_images(base / "bounding_box_train", [f"0001_c{cams}_1.png", "0002_c1_2.png"])
        write_images(base / "query", ["0005_c1_1.png"])
        write_images(base / "bounding_box_test", ["0005_c2_1.png"])
    assert CUHK03(tmp_path, labeled=True, verify_counts="ignore").dataset_dir.name == "labeled"
    detected = CUHK03(tmp_path, labeled=False, verify_counts="ignore")
    assert detected.dataset_dir.name == "detected" and {s.camid for s in detected.train} == {0, 1}
    shutil.rmtree(tmp_path / "cuhk03-np" / "detected" / "query")
    with pytest.raises(DatasetError, match=r"detected' is not a cuhk03 folder: missing query/"):
        CUHK03(tmp_path, labeled=False)


# --- cuhk-03.mat (HDF5) ----------------------------------------------------------------------------------

def test_written_mat_looks_like_matlab_v73(tmp_path: Path) -> None:
    path = tmp_path / "cuhk-03.mat"
    write_cuhk03_mat(path)
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file" and h5py.is_hdf5(path)
    with h5py.File(path, "r") as f:
        assert f["labeled"].shape == (1, 5) and f["labeled"].dtype == h5py.ref_dtype
        pair1 = f[f["labeled"][0, 0]]
        assert pair1.shape == (10, 3)
        assert f[pair1[0, 0]][:].T.shape == (7, 3, 3)  # H x W x 3 after transposing back


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_mat_extraction_matches_torchreid(tmp_path: Path, variant: str) -> None:
    ours_root, theirs_root = tmp_path / "ours", tmp_path / "theirs"
    cuhk03_official_tree(ours_root)
    shutil.copytree(ours_root, theirs_root)
    ours = CUHK03(ours_root, labeled=variant == "labeled", verify_counts="ignore", progress=False)
    theirs = torchreid_module("cuhk03").CUHK03(root=str(theirs_root), cuhk03_labeled=variant == "labeled",
                                               verbose=False)
    cache = ours_root / "cuhk03" / f"images_{variant}"  # torchreid's place for extracted images
    assert ours.dataset_dir == cache

    def rebased(samples):
        return [(str(Path(s[0]).name), s[1], s[2]) for s in samples]

    assert as_tuples(rebased(ours.query)) == as_tuples(rebased(theirs.query))
    assert as_tuples(rebased(ours.gallery)) == as_tuples(rebased(theirs.gallery))
    assert same_up_to_relabel(rebased(ours.train), rebased(theirs.train))
    # train: persons 1, 2, 4, 6 (person 2 misses an image; in detected, person 4 too); test: 3, 5, 7
    assert (len(ours.train), ours.num_train_pids, len(ours.query), len(ours.gallery)) == (
        {"labeled": 39, "detected": 38}[variant], 4, 6, 24)
    # pixels: the source arrays, and the same as torchreid's files
    for s in (*ours.train, *ours.query, *ours.gallery):
        pair, person, _, image = (int(x) for x in Path(s.path).stem.split("_"))
        pixels = np.asarray(Image.open(s.path))
        np.testing.assert_array_equal(pixels, cuhk03_image(variant, pair - 1, person - 1, image - 1))
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(theirs_root / "cuhk03" / f"images_{variant}"
                                                                    / Path(s.path).name)))
    # the cache is reused: a second read extracts nothing
    stamp = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    CUHK03(ours_root, labeled=variant == "labeled", verify_counts="ignore", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp


def test_a_killed_extractions_half_written_image_is_removed_by_the_next(tmp_path: Path) -> None:
    """Issue 13: temporaries of killed writes go the next time that output is written."""
    cuhk03_official_tree(tmp_path)
    cache = tmp_path / "cuhk03" / "images_labeled"
    cache.mkdir(parents=True)
    (cache / ".1_001_1_01.png.k2x9q0ab.tmp").write_bytes(b"half a png")  # what a SIGKILL mid-write leaves
    data = CUHK03(tmp_path, labeled=True, verify_counts="ignore", progress=False)
    assert not list(cache.glob(".*")) and (len(data.query), len(data.gallery)) == (6, 24)


def test_mat_errors(tmp_path: Path) -> None:
    base = cuhk03_official_tree(tmp_path / "a")
    release = base / "cuhk03_release"
    # a split file where cuhk-03.mat should be
    shutil.copy(base / "cuhk03_new_protocol_config_labeled.mat", release / "cuhk-03.mat")
    with pytest.raises(DatasetError, match=r"cuhk-03.mat' is not the official MATLAB v7.3 cuhk-03.mat .*"
                                           r"found 'MATLAB 5.0 MAT-file"):
        CUHK03(tmp_path / "a", progress=False)
    assert not (base / "images_labeled").exists()  # nothing written
    # an HDF5 file without the cells
    with h5py.File(release / "cuhk-03.mat", "w") as f:
        f.create_dataset("something", data=[1])
    with pytest.raises(DatasetError, match=r"is not the official .* found something"):
        CUHK03(tmp_path / "a", progress=False)
    # a v7.3 file where the split file should be
    write_cuhk03_mat(release / "cuhk-03.mat")
    shutil.copy(release / "cuhk-03.mat", base / "cuhk03_new_protocol_config_labeled.mat")
    with pytest.raises(DatasetError, match=r"is not a CUHK03 split file: .* found a MATLAB v7.3 \(HDF5\) file"):
        CUHK03(tmp_path / "a", progress=False)
    # a split file naming an image the .mat does not hold
    config = base / "cuhk03_new_protocol_config_labeled.mat"
    write_split(config, "labeled")
    values = {k: v for k, v in scipy.io.loadmat(config).items() if not k.startswith("__")}
    values["filelist"][0, 0] = np.array(["5_099_1_01.png"])
    scipy.io.savemat(config, values)
    with pytest.raises(DatasetError, match=r"lists 1 image\(s\) that the 'labeled' cell of .* does not hold, "
                                           r"e.g. 5_099_1_01.png"):
        CUHK03(tmp_path / "a", progress=False)
    # no split file
    (base / "cuhk03_new_protocol_config_labeled.mat").unlink()
    with pytest.raises(DatasetError, match=r"found cuhk-03.mat but not the split file "
                                           r"cuhk03_new_protocol_config_labeled.mat"):
        CUHK03(tmp_path / "a", progress=False)


def test_one_cache_setting_keeps_labeled_and_detected_apart(tmp_path: Path) -> None:
    """Both variants name their files alike (P_PPP_C_II.png): read labeled, detected, labeled again through
    one data.cuhk03_cache, and each still gets its own boxes."""
    root = tmp_path / "root"
    cuhk03_official_tree(root)
    cache = tmp_path / "cache"
    for variant in ("labeled", "detected", "labeled"):
        ds = CUHK03(root, labeled=variant == "labeled", cache_dir=cache, verify_counts="ignore", progress=False)
        assert ds.dataset_dir == cache / f"images_{variant}"
        for s in ds.query:
            pair, person, _, image = (int(x) for x in Path(s.path).stem.split("_"))
            np.testing.assert_array_equal(np.asarray(Image.open(s.path)),
                                          cuhk03_image(variant, pair - 1, person - 1, image - 1))

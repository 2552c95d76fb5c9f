"""Helpers for the data tests: tiny image files in the real data sets' exact layouts and names,
and torchreid's readers (installed --no-deps as a test reference) made importable."""

from __future__ import annotations

import importlib
import io
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (4, 8)) -> bytes:
    """A tiny valid JPEG (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


_JPEG = jpeg_bytes()


def write_images(folder: Path, names: list[str], data: bytes = _JPEG) -> None:
    """Write ``data`` (a tiny JPEG by default) under every name in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def market_tree(root: Path) -> Path:
    """A few ids of Market-1501 with real names: junk (-1), distractors (0000), extras to ignore."""
    base = root / "Market-1501-v15.09.15"
    write_images(base / "bounding_box_train", [
        "0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg", "0002_c2s1_000301_01.jpg",
        "0007_c2s3_070952_01.jpg", "0007_c3s3_077419_03.jpg",
        "0010_c6s4_002427_02.jpg", "0010_c1s5_006616_01.jpg", "0010_c5s2_120298_03.jpg",
        "1500_c6s3_086567_01.jpg"])
    write_images(base / "query", [
        "0001_c1s1_001051_00.jpg", "0001_c2s1_000301_00.jpg", "0003_c1s6_015971_00.jpg",
        "0004_c6s1_016091_00.jpg"])
    write_images(base / "bounding_box_test", [
        "-1_c1s1_000401_03.jpg", "-1_c3s1_000551_02.jpg", "0000_c1s1_000151_01.jpg", "0000_c6s1_002151_04.jpg",
        "0001_c1s1_001051_03.jpg", "0001_c5s1_001426_02.jpg", "0003_c3s3_064744_01.jpg",
        "0004_c4s1_016051_03.jpg", "0004_c2s1_016226_01.jpg"])
    write_images(base / "gt_bbox", ["0001_c1s1_001051_00.jpg"])  # extras: never read
    (base / "gt_query").mkdir()
    (base / "gt_query" / "0001_c1s1_001051_00_good.mat").write_bytes(b"")
    (base / "bounding_box_train" / "Thumbs.db").write_bytes(b"\0")
    return base


def duke_tree(root: Path) -> Path:
    """A few ids of DukeMTMC-reID with real names (c1..c8, distractor ids only in the gallery)."""
    base = root / "DukeMTMC-reID"
    write_images(base / "bounding_box_train", [
        "0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0003_c1_f0044158.jpg", "0003_c8_f0043916.jpg",
        "0007_c7_f0094136.jpg"])
    write_images(base / "query", ["0005_c2_f0046985.jpg", "0008_c3_f0081281.jpg"])
    write_images(base / "bounding_box_test", [
        "0005_c5_f0051781.jpg", "0005_c6_f0064711.jpg", "0008_c4_f0062436.jpg", "0008_c7_f0099236.jpg",
        "7140_c8_f0028811.jpg"])
    return base


MSMT_TRAIN = {  # list file -> lines (identity folder / name, pid)
    "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_01_0303morning_0015_1.jpg 0",
                       "0000/0000_002_07_0303morning_0036_0.jpg 0", "0001/0001_000_12_0303noon_0221_0.jpg 1",
                       "0001/0001_001_15_0303noon_0241_1.jpg 1"],
    "list_val.txt": ["0000/0000_003_07_0303morning_0036_2.jpg 0", "0002/0002_000_04_0303afternoon_1127_0.jpg 2"],
    "list_query.txt": ["0000/0000_000_03_0303morning_0016_0.jpg 0", "0001/0001_000_09_0113noon_0910_0.jpg 1"],
    "list_gallery.txt": ["0000/0000_001_10_0303morning_0022_1.jpg 0", "0000/0000_002_02_0303afternoon_1010_0.jpg 0",
                         "0001/0001_001_14_0113noon_0944_1.jpg 1", "0002/0002_000_11_0113morning_0111_0.jpg 2"],
}


def msmt_tree(root: Path, version: str = "MSMT17_V1") -> Path:
    """MSMT17 V1 (train/, test/) or V2 (mask_train_v2/, mask_test_v2/) with its four list files."""
    base = root / version
    train_dir, test_dir = ("train", "test") if version == "MSMT17_V1" else ("mask_train_v2", "mask_test_v2")
    for list_name, lines in MSMT_TRAIN.items():
        folder = base / (train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir)
        write_images(folder, [line.split()[0] for line in lines])
        (base / list_name).write_text("\n".join(lines) + "\n")
    return base


# --- cuhk-03.mat, written the way MATLAB v7.3 stores cell arrays -------------------------------------
# HDF5 with a 512-byte MATLAB header; cells are datasets of object references into ``#refs#``; arrays
# are stored transposed (an H x W x 3 image as (3, W, H), the 5 x 1 cell ``labeled`` as (1, 5)); an
# empty cell is uint64 [0 0] with ``MATLAB_empty``.

PAIRS = [3, 2, 1, 1, 1]  # persons per camera pair (the real file: 843, 440, 77, 58, 49)
EMPTY = {("labeled", 0, 1, 9), ("detected", 0, 1, 9), ("detected", 1, 0, 4)}  # (variant, pair, person, image)
MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


def cuhk03_image(variant: str, pair: int, person: int, image: int) -> np.ndarray:
    """A distinct H x W x 3 image per cell (sizes differ, so a transposition error shows)."""
    rng = np.random.default_rng([len(variant), pair, person, image])
    return rng.integers(0, 256, size=(7 + image, 3 + pair, 3), dtype=np.uint8)


def write_cuhk03_mat(path: Path) -> None:
    """A cuhk-03.mat with MATLAB v7.3's layout: cells of object references, arrays stored transposed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")

        def put(data: np.ndarray, cls: str, empty: bool = False) -> h5py.Reference:
            ds = refs.create_dataset(str(len(refs)), data=data)
            ds.attrs["MATLAB_class"] = np.bytes_(cls)
            if empty:
                ds.attrs["MATLAB_empty"] = np.uint8(1)
            return ds.ref

        for variant in ("detected", "labeled"):
            pair_refs = []
            for pair, persons in enumerate(PAIRS):
                cell = np.empty((10, persons), dtype=h5py.ref_dtype)  # MATLAB persons x 10, transposed
                for person in range(persons):
                    for image in range(10):
                        if (variant, pair, person, image) in EMPTY:
                            cell[image, person] = put(np.zeros(2, dtype=np.uint64), "double", empty=True)
                        else:
                            cell[image, person] = put(cuhk03_image(variant, pair, person, image).T, "uint8")
                pair_refs.append(put(cell, "cell"))
            top = f.create_dataset(variant, data=np.array([pair_refs], dtype=h5py.ref_dtype))  # 5 x 1 -> (1, 5)
            top.attrs["MATLAB_class"] = np.bytes_("cell")
        testsets = f.create_dataset("testsets", data=np.array([[put(np.array([[1.0, 1.0], [3.0, 2.0]]), "double")]],
                                                              dtype=h5py.ref_dtype))
        testsets.attrs["MATLAB_class"] = np.bytes_("cell")
    with path.open("r+b") as f:
        f.write(MATLAB_HEADER.ljust(124) + b"\x00\x02IM")


def write_split(path: Path, variant: str) -> None:
    """A new-protocol split file for the cells above: persons 1, 2, 4, 6 train; 3, 5, 7 test."""
    names, labels, cams = [], [], []
    label = 0
    for pair, persons in enumerate(PAIRS):
        for person in range(persons):
            label += 1
            for image in range(10):
                if (variant, pair, person, image) not in EMPTY:
                    names.append(f"{pair + 1}_{person + 1:03d}_{1 if image < 5 else 2}_{image + 1:02d}.png")
                    labels.append(label)
                    cams.append(1 if image < 5 else 2)
    labels_arr = np.array(labels)
    train = [i for i, lab in enumerate(labels) if lab in (1, 2, 4, 6)]
    query = [next(i for i, (lab, c) in enumerate(zip(labels, cams)) if lab == t and c == cam)
             for t in (3, 5, 7) for cam in (1, 2)]
    gallery = [i for i in range(len(names)) if labels_arr[i] in (3, 5, 7) and i not in query]
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = np.array([n])
    col = lambda xs, dt: np.array(xs, dtype=dt).reshape(-1, 1)  # noqa: E731
    scipy.io.savemat(path, {"filelist": filelist, "labels": col(labels, np.uint16), "camId": col(cams, np.uint8),
                            "train_idx": col([i + 1 for i in train], np.uint16),
                            "query_idx": col([i + 1 for i in query], np.uint16),
                            "gallery_idx": col([i + 1 for i in gallery], np.uint16)})


def cuhk03_official_tree(root: Path) -> Path:
    """torchreid's layout: cuhk03/cuhk03_release/cuhk-03.mat + cuhk03/cuhk03_new_protocol_config_*.mat."""
    base = root / "cuhk03"
    (base / "cuhk03_release").mkdir(parents=True)
    write_cuhk03_mat(base / "cuhk03_release" / "cuhk-03.mat")
    for variant in ("labeled", "detected"):
        write_split(base / f"cuhk03_new_protocol_config_{variant}.mat", variant)
    return base



def torchreid_module(name: str) -> types.ModuleType:
    """Import ``torchreid.reid.data.datasets.image.<name>``; cv2 / gdown / imageio (unused by the readers,
    not installed) are stubbed, imageio.imwrite by PIL."""
    for missing in ("cv2", "gdown", "imageio"):
        try:
            importlib.import_module(missing)
        except ImportError:
            stub = types.ModuleType(missing)
            if missing == "imageio":
                stub.imwrite = lambda path, array: Image.fromarray(array).save(path)
            sys.modules[missing] = stub
    return importlib.import_module(f"torchreid.reid.data.datasets.image.{name}")


def as_tuples(samples) -> list[tuple[str, int, int]]:
    """(path, pid, camid) of cgpn Samples or torchreid tuples, sorted."""
    return sorted((str(s[0]), int(s[1]), int(s[2])) for s in samples)


def same_up_to_relabel(ours, theirs, cameras: bool = True) -> bool:
    """Same images (and cameras), and the two pid labelings are one-to-one."""
    a, b = as_tuples(ours), as_tuples(theirs)
    if [(p, c if cameras else 0) for p, _, c in a] != [(p, c if cameras else 0) for p, _, c in b]:
        return False
    pairs = {(x[1], y[1]) for x, y in zip(a, b)}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})

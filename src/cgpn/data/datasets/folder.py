"""A user's own images: one sub-folder per identity, cameras from the file names or from a CSV.

Layouts (``root`` = ``data.root``):

- ``root/<identity>/<image>``: every identity folder holds its images (sub-folders allowed, e.g.
  ``person_7/cam2/0001.jpg``). The camera is the first group of ``camera_regex`` searched in the
  path inside the identity folder (default ``_c(\\d+)``: ``0007_c2_0001.jpg`` -> camera 2). The split
  is made reproducibly: an identity goes to test when a hash of (seed, name) falls in the fraction
  ``test_ids`` of the hash range (so about that fraction of the identities, at least one); each test identity gives one query image per camera, as long as a gallery image from
  another camera remains, and the rest to the gallery. Adding an identity does not move the others.
- ``root/{train,query,gallery}/<identity>/<image>``: the split is given.
- a CSV file (``csv``; relative to ``root`` or absolute) of rows ``path,pid,camid`` with an optional
  4th column ``subset`` (train | query | gallery; given split) and an optional header row
  starting with ``path``; image
  paths are relative to ``root``.

Identity names that are all integers keep their number as pid; otherwise pids are the positions of
the names in sorted order. Camera values are numbered 0..C-1 in sorted order.
"""

from __future__ import annotations

import csv as csvlib
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from cgpn.data.datasets.base import IMAGE_SUFFIXES, ReidDataset, Sample, describe_folder
from cgpn.data.datasets.split import held_out, identity_hash, pick_queries
from cgpn.errors import ConfigError, DatasetError
from cgpn.files import reading

__all__ = ["FolderDataset", "make_split"]

SPLIT_DIRS = ("train", "query", "gallery")
EXAMPLE = "0007/0007_c2_0001.jpg"

_Image = tuple[str, str, str]  # (path, identity name, camera value)


def _sort_key(value: str) -> tuple[int, int | str]:
    """Numbers in numeric order, before other names in text order."""
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)


def _pid_map(names: set[str]) -> dict[str, int]:
    ordered = sorted(names, key=_sort_key)
    numbers = [int(n) for n in ordered if n.lstrip("-").isdigit()]
    if len(numbers) == len(ordered) and len(set(numbers)) == len(numbers):
        return {n: int(n) for n in ordered}
    return {n: i for i, n in enumerate(ordered)}


def make_split(images: list[_Image], test_ids: float, seed: int) -> dict[str, list[_Image]]:
    """Split images into train / query / gallery per identity, reproducibly from ``seed`` (see module doc)."""
    by_id: dict[str, list[_Image]] = defaultdict(list)
    for image in images:
        by_id[image[1]].append(image)
    test = held_out(sorted(by_id), test_ids, seed)
    split: dict[str, list[_Image]] = {s: [] for s in SPLIT_DIRS}
    for name in sorted(set(by_id) - set(test), key=lambda n: (identity_hash(seed, n), n)):
        split["train"] += by_id[name]
    for name in test:
        rng = np.random.default_rng([seed, identity_hash(seed, name)])
        queries, gallery = pick_queries(by_id[name], lambda im: im[2], rng, camera_order=_sort_key)
        split["query"] += queries
        split["gallery"] += gallery
    return split


class FolderDataset(ReidDataset):
    """Images in identity folders (or listed in a CSV), split given or made per identity.

    Args:
        root: the folder of identity folders (or of ``train/``, ``query/``, ``gallery/``).
        camera_regex: regular expression whose first group is the camera, searched in the path
            inside the identity folder (unused with a CSV).
        csv: optional CSV of ``path,pid,camid[,subset]`` rows.
        test_ids: fraction of identities used for testing when the split is made.
        split_seed: seed of the made split.

    Example:
        >>> ds = FolderDataset("my_people", camera_regex=r"cam(\\d+)")  # doctest: +SKIP
    """

    name = "folder"
    example_name = EXAMPLE

    def __init__(self, root: str | Path, camera_regex: str = r"_c(\d+)", csv: str = "", test_ids: float = 0.5,
                 split_seed: int = 0) -> None:
        self.dataset_dir = root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"data root '{root}' is not a folder: {describe_folder(root)} (expected one "
                               f"sub-folder per identity, e.g. {root / EXAMPLE})")
        if not 0 < test_ids < 1:
            raise ConfigError(f"data.folder_test_ids must be a fraction between 0 and 1 (e.g. 0.5), got {test_ids}")
        if csv:
            images, where = self._read_csv(root, Path(csv).expanduser())
        else:
            try:
                pattern = re.compile(camera_regex)
            except re.error as err:
                raise ConfigError(f"data.folder_camera_regex {camera_regex!r} is not a regular expression: "
                                  f"{err}") from None
            split_dirs = [d for d in SPLIT_DIRS if (root / d).is_dir()]
            if split_dirs:
                missing = [d + "/" for d in SPLIT_DIRS if d not in split_dirs]
                if missing:
                    raise DatasetError(f"'{root}' has {', '.join(d + '/' for d in split_dirs)} but not "
                                       f"{', '.join(missing)} (expected train/, query/ and gallery/, each with one "
                                       f"folder per identity, e.g. query/{EXAMPLE})")
                images = {d: self._scan(root / d, pattern) for d in SPLIT_DIRS}
                where = {d: str(root / d) for d in SPLIT_DIRS}
            else:
                images = {"": self._scan(root, pattern)}
                where = dict.fromkeys(SPLIT_DIRS, str(root))
        if "" in images:
            images = make_split(images[""], test_ids, split_seed)
            if not images["query"]:
                raise DatasetError(f"'{where['query']}': no test identity has images from two cameras, so no "
                                   f"query can be made (expected identities seen by 2+ cameras, e.g. "
                                   f"0007_c1_0001.jpg and 0007_c2_0001.jpg; check data.folder_camera_regex)")
        pids = _pid_map({name for subset in images.values() for _, name, _ in subset})
        cams = {c: i for i, c in enumerate(sorted({c for s in images.values() for _, _, c in s}, key=_sort_key))}

        def samples(subset: str) -> list[Sample]:
            return sorted(Sample(p, pids[n], cams[c]) for p, n, c in images.get(subset, []))

        super().__init__(samples("train"), samples("query"), samples("gallery"), where=where,
                         identity_names={pid: name for name, pid in pids.items()})

    @staticmethod
    def _scan(folder: Path, pattern: re.Pattern[str]) -> list[_Image]:
        """(path, identity, camera) of every image under ``folder/<identity>/`` (no image is opened)."""
        with os.scandir(folder) as entries:
            identities = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not identities:
            raise DatasetError(f"'{folder}' holds no identity folder (expected one sub-folder per identity with "
                               f"its images, e.g. {folder / EXAMPLE}; {describe_folder(folder)})")
        images = []
        for name in identities:
            id_dir = os.path.join(folder, name)
            found = sorted(  # paths inside the identity folder, "/"-separated
                f if top == id_dir else os.path.relpath(os.path.join(top, f), id_dir).replace(os.sep, "/")
                for top, _, files in os.walk(id_dir) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise DatasetError(f"identity folder '{id_dir}' holds no image (expected files like "
                                   f"{EXAMPLE.split('/')[1]}; {describe_folder(Path(id_dir))})")
            for inner in found:
                path = os.path.join(id_dir, inner)
                match = pattern.search(inner)
                if match is None:
                    raise DatasetError(f"cannot find a camera in '{path}': data.folder_camera_regex "
                                       f"{pattern.pattern!r} does not match '{inner}' (expected names like "
                                       f"{EXAMPLE.split('/')[1]}, or set the regex or data.folder_csv)")
                images.append((path, name, match.group(1) if pattern.groups else match.group(0)))
        return images

    @staticmethod
    def _read_csv(root: Path, csv_path: Path) -> tuple[dict[str, list[_Image]], dict[str, str]]:
        """Images of a ``path,pid,camid[,subset]`` CSV, by subset ("" when the split is to be made)."""
        csv_path = csv_path if csv_path.is_absolute() else root / csv_path
        with reading(csv_path, "CSV file", f"data.folder_csv with rows like '{EXAMPLE},7,2'", DatasetError), \
                csv_path.open(newline="") as f:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csvlib.reader(f), start=1)
                    if any(c.strip() for c in row)]
        if rows and rows[0][1][0].lower() == "path":
            rows = rows[1:]  # header
        if not rows:
            raise DatasetError(f"CSV file '{csv_path}' lists no image (expected rows like '{EXAMPLE},7,2')")
        images: dict[str, list[_Image]] = defaultdict(list)
        listing: dict[str, set[str]] = {}
        for number, row in rows:
            if len(row) not in (3, 4) or not row[0] or (len(row) == 4 and row[3] not in SPLIT_DIRS):
                raise DatasetError(f"'{csv_path}' line {number}: expected 'path,pid,camid' or "
                                   f"'path,pid,camid,subset' (subset train|query|gallery), e.g. "
                                   f"'{EXAMPLE},7,2,query'; found '{','.join(row)}'")
            path = row[0] if os.path.isabs(row[0]) else str(root / row[0])
            folder, name = os.path.split(path)
            if folder not in listing:
                listing[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            if name not in listing[folder]:
                raise DatasetError(f"'{csv_path}' line {number} lists '{path}', which does not exist (paths are "
                                   f"relative to data.root '{root}')")
            images[row[3] if len(row) == 4 else ""].append((path, row[1], row[2]))
        if "" in images and len(images) > 1:
            raise DatasetError(f"'{csv_path}': some rows have a subset column and some do not (expected all rows "
                               f"with 3 columns, or all with 4)")
        return dict(images), dict.fromkeys(SPLIT_DIRS, str(csv_path))

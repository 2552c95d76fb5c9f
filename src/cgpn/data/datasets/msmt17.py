"""MSMT17 (Wei et al., CVPR 2018): 1,041 training and 3,060 test identities, 15 cameras.

Both releases keep images in one folder per identity and the split in list files of lines
``0000/0000_000_01_0303morning_0015_0.jpg 0`` (path, pid); the camera is the third field of the
name (01..15):

- V1: ``MSMT17_V1/{train,test}/`` + ``list_{train,val,query,gallery}.txt``;
- V2 (faces blurred): ``MSMT17_V2/{mask_train_v2,mask_test_v2}/`` + the same list files.

The official training set is ``list_train`` + ``list_val``: 32,621 images of 1,041 ids; query
11,659 and gallery 82,161 images of 3,060 ids. ``train_val=False`` trains on ``list_train`` only
(30,248 images), as torchreid and fast-reid do by default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cgpn.data.datasets.base import ReidDataset, Sample, describe_folder
from cgpn.errors import DatasetError
from cgpn.files import reading

__all__ = ["MSMT17"]

VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
NAME_RE = re.compile(r"^\d+_\d+_(\d+)_")
EXAMPLE_LINE = "0000/0000_000_01_0303morning_0015_0.jpg 0"


class MSMT17(ReidDataset):
    """MSMT17 V1 or V2 reader; ``root`` holds ``MSMT17_V1``/``MSMT17_V2`` (or is one of them).

    Example:
        >>> ds = MSMT17("~/data")  # doctest: +SKIP
        >>> len(ds.train), len(ds.query), len(ds.gallery)
        (32621, 11659, 82161)
    """

    name = "msmt17"
    num_cameras = 15
    example_name = "0000_000_01_0303morning_0015_0.jpg"

    def __init__(self, root: str | Path, train_val: bool = True, verify_counts: str = "warn") -> None:
        self.dataset_dir, (train_dir, test_dir) = self._find(Path(root).expanduser())
        self.official = {"train": (1041, 32621 if train_val else 30248), "query": (3060, 11659),
                         "gallery": (3060, 82161)}
        lists = [self.dataset_dir / n for n in LISTS]
        listing: dict[Path, set[str]] = {}
        train = self._read_list(lists[0], train_dir, listing)
        if train_val:
            train += self._read_list(lists[1], train_dir, listing)
        query = self._read_list(lists[2], test_dir, listing)
        gallery = self._read_list(lists[3], test_dir, listing)
        where = {"train": str(lists[0]), "query": str(lists[2]), "gallery": str(lists[3])}
        super().__init__(sorted(train), sorted(query), sorted(gallery), where=where,
                         verify_counts=verify_counts)

    @staticmethod
    def _find(root: Path) -> tuple[Path, tuple[str, str]]:
        """(version folder, (train folder name, test folder name)) under ``root``."""
        if not root.is_dir():
            raise DatasetError(f"data root '{root}' is not a folder: {describe_folder(root)} (set data.root to the "
                               f"folder that holds MSMT17_V1/ or MSMT17_V2/)")
        for base in (root, root / "msmt17", root / "MSMT17"):
            found = [(base / v, dirs) for v, dirs in VERSIONS.items() if (base / v).is_dir()]
            if len(found) > 1:  # which one the user means is not ours to guess
                raise DatasetError(f"'{base}' holds both {' and '.join(v + '/' for v in VERSIONS)}; set data.root to "
                                   f"the one to use, e.g. {base / 'MSMT17_V2'}")
            found += [(base, dirs) for dirs in VERSIONS.values() if any((base / d).is_dir() for d in dirs)]
            if found:
                candidate, dirs = found[0]
                missing = [d + "/" for d in dirs if not (candidate / d).is_dir()]
                missing += [n for n in LISTS if not (candidate / n).is_file()]
                if missing:
                    raise DatasetError(f"'{candidate}' is not an MSMT17 folder: missing {', '.join(missing)} "
                                       f"(expected {', '.join(d + '/' for d in dirs)} and {', '.join(LISTS)}; "
                                       f"{describe_folder(candidate)})")
                return candidate, dirs
        raise DatasetError(f"'{root}' holds no MSMT17 copy: expected MSMT17_V1/ (train/, test/, list_train.txt, "
                           f"...) or MSMT17_V2/ (mask_train_v2/, mask_test_v2/, list_train.txt, ...); "
                           f"{describe_folder(root)}")

    def _read_list(self, list_path: Path, subdir: str, listing: dict[Path, set[str]]) -> list[Sample]:
        """Samples of one list file; every listed image must exist (folders are listed, files not opened)."""
        image_dir = self.dataset_dir / subdir
        samples = []
        with reading(list_path, "MSMT17 list", f"lines like '{EXAMPLE_LINE}'", DatasetError):
            lines = list_path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            match = NAME_RE.match(Path(fields[0]).name) if len(fields) == 2 and fields[1].isdigit() else None
            if match is None:
                raise DatasetError(f"'{list_path}' line {number}: expected 'identity/file.jpg pid' like "
                                   f"'{EXAMPLE_LINE}', found '{line.strip()}'")
            cam = int(match.group(1))
            if not 1 <= cam <= self.num_cameras:
                raise DatasetError(f"'{list_path}' line {number}: camera {cam} in '{fields[0]}' is out of range "
                                   f"(expected 01..15, as in '{EXAMPLE_LINE}')")
            path = image_dir / fields[0]
            folder = path.parent
            if folder not in listing:
                listing[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            if path.name not in listing[folder]:
                raise DatasetError(f"'{list_path}' line {number} lists '{path}', which does not exist (expected "
                                   f"the images of {image_dir.name}/ beside the list; {describe_folder(folder)})")
            samples.append(Sample(str(path), int(fields[1]), cam - 1))
        if not samples:
            raise DatasetError(f"'{list_path}' lists no image (expected lines like '{EXAMPLE_LINE}')")
        return samples

"""What every data set reader returns, and the Market-1501 folder layout that most of them share.

A reader turns a folder into three sorted lists of ``Sample(path, pid, camid)``: ``train`` (pids
relabelled 0..N-1), ``query`` and ``gallery`` (original pids, junk dropped). It checks the layout
before anything else runs and says exactly what is wrong when it does not match.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

from cgpn.errors import DatasetError

__all__ = ["IMAGE_SUFFIXES", "MarketLayoutDataset", "ReidDataset", "Sample", "relabel", "subset_stats"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class Sample(NamedTuple):
    """One image: its file, identity and camera (cameras counted from 0)."""

    path: str
    pid: int
    camid: int


def relabel(samples: Iterable[Sample]) -> list[Sample]:
    """Map the pids of ``samples`` to 0..N-1 in sorted order (what the classifiers are trained on)."""
    samples = list(samples)
    mapping = {pid: label for label, pid in enumerate(sorted({s.pid for s in samples}))}
    return [s._replace(pid=mapping[s.pid]) for s in samples]


def subset_stats(samples: Sequence[Sample]) -> tuple[int, int, int]:
    """(identities, images, cameras) of a list of samples."""
    return len({s.pid for s in samples}), len(samples), len({s.camid for s in samples})


class ReidDataset:
    """Train / query / gallery lists of one data set.

    Attributes:
        name: registry name (``market1501``, ``synthetic``...).
        train: training samples, pids relabelled 0..num_train_pids-1.
        query, gallery: test samples with their original pids (distractors kept, junk dropped).
    """

    name: ClassVar[str] = "dataset"

    def __init__(self, train: list[Sample], query: list[Sample], gallery: list[Sample]) -> None:
        self.train, self.query, self.gallery = train, query, gallery

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    def summary(self) -> str:
        """A table of identities, images and cameras per subset, as torchreid prints at start."""
        rows = [("train", *subset_stats(self.train)), ("query", *subset_stats(self.query)),
                ("gallery", *subset_stats(self.gallery))]
        lines = [f"{self.name}", "  subset   |   ids | images | cameras", "  ---------+-------+--------+--------"]
        lines += [f"  {n:<8} | {i:>5} | {m:>6} | {c:>7}" for n, i, m, c in rows]
        return "\n".join(lines)


class MarketLayoutDataset(ReidDataset):
    """A data set in Market-1501's layout: ``bounding_box_train/``, ``query/``, ``bounding_box_test/``.

    File names start with ``{pid}_c{camera}`` (e.g. ``0002_c1s1_000451_00.jpg``); pid -1 marks junk
    (dropped), pid 0 distractors (kept in the gallery). ``root`` may be the data set folder itself or
    a folder that holds it under one of ``folder_names``.
    """

    folder_names: ClassVar[tuple[str, ...]] = ()
    subsets: ClassVar[tuple[str, str, str]] = ("bounding_box_train", "query", "bounding_box_test")
    filename_re: ClassVar[re.Pattern[str]] = re.compile(r"^(-?\d+)_c(\d+)")
    example_name: ClassVar[str] = "0002_c1s1_000451_00.jpg"
    junk_pids: ClassVar[tuple[int, ...]] = (-1,)
    num_cameras: ClassVar[int | None] = None  # cameras c1..cN when the data set fixes them

    def __init__(self, root: str | Path) -> None:
        self.dataset_dir = self.find_dataset_dir(Path(root).expanduser())
        train_dir, query_dir, gallery_dir = (self.dataset_dir / s for s in self.subsets)
        train = relabel(self.read_folder(train_dir))
        query = self.read_folder(query_dir)
        gallery = self.read_folder(gallery_dir)
        for subset, samples in (("train", train), ("query", query), ("gallery", gallery)):
            if not samples:
                raise DatasetError(f"{self.dataset_dir / self.subsets[('train', 'query', 'gallery').index(subset)]} "
                                   f"holds no usable image (expected names like {self.example_name})")
        super().__init__(train, query, gallery)
        logger.info("%s", self.summary())

    @classmethod
    def find_dataset_dir(cls, root: Path) -> Path:
        """``root`` itself if it holds the subset folders, else ``root/<one of folder_names>``."""
        for candidate in (root, *(root / name for name in cls.folder_names)):
            if all((candidate / s).is_dir() for s in cls.subsets):
                return candidate
        if not root.exists():
            raise DatasetError(f"data root '{root}' does not exist (set data.root to the folder that holds "
                               f"{' or '.join(cls.folder_names) or 'the data set'})")
        base = next((root / n for n in cls.folder_names if (root / n).is_dir()), root)
        missing = [s for s in cls.subsets if not (base / s).is_dir()]
        raise DatasetError(f"'{base}' is not a {cls.name} folder: missing {', '.join(s + '/' for s in missing)} "
                           f"(expected {', '.join(s + '/' for s in cls.subsets)} with images like {cls.example_name})")

    def parse_name(self, path: Path) -> tuple[int, int]:
        """(pid, camid from 0) from a file name, or a DatasetError naming the file."""
        match = self.filename_re.match(path.name)
        if match is None:
            raise DatasetError(f"cannot parse '{path}': expected a name like {self.example_name} "
                               f"(pid, then _c and the camera)")
        pid, cam = int(match.group(1)), int(match.group(2))
        if cam < 1 or (self.num_cameras is not None and cam > self.num_cameras):
            limit = f"1..{self.num_cameras}" if self.num_cameras else "1 or more"
            raise DatasetError(f"camera {cam} in '{path}' is out of range (expected {limit})")
        return pid, cam - 1

    def read_folder(self, folder: Path) -> list[Sample]:
        """Every image of ``folder`` as a Sample, junk dropped, sorted by path. No image is opened."""
        samples = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            pid, camid = self.parse_name(path)
            if pid in self.junk_pids:
                continue
            samples.append(Sample(str(path), pid, camid))
        return samples

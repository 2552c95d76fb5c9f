"""What every data set reader returns, and the Market-1501 folder layout that most of them share.

A reader turns a folder into three sorted lists of ``Sample(path, pid, camid)``: ``train`` (pids
relabelled 0..N-1), ``query`` and ``gallery`` (original pids, junk dropped). It checks the layout
before anything else runs and says exactly what is wrong when it does not match; no image is opened
while scanning (``cgpn check-data`` does that), so a 100k-image set is read in seconds.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from cgpn.config import CHOICES
from cgpn.data.datasets.split import held_out, identity_hash, pick_queries
from cgpn.errors import ConfigError, DatasetError

__all__ = [
    "IMAGE_SUFFIXES",
    "VERIFY_MODES",
    "CombinedDataset",
    "MarketLayoutDataset",
    "ReidDataset",
    "Sample",
    "describe_folder",
    "relabel",
    "scan_images",
    "subset_stats",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VERIFY_MODES = CHOICES["data.verify_counts"]
SUBSETS = ("train", "query", "gallery")


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


def scan_images(folder: Path) -> list[str]:
    """Sorted names of the image files directly in ``folder`` (by suffix; nothing is opened)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file())


def describe_folder(folder: Path, limit: int = 4) -> str:
    """A few entries of ``folder`` for an error message ("found ..."), or why there are none."""
    if not folder.exists():
        return "it does not exist"
    if not folder.is_dir():
        return "it is a file, not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


class ReidDataset:
    """Train / query / gallery lists of one data set, checked when built.

    Every subset must hold images and every query identity must appear in the gallery. When the
    class knows the official size of its data set (``official``), a copy of another size is reported
    according to ``verify_counts``: ``warn`` (log), ``error`` (DatasetError) or ``ignore``.

    Attributes:
        name: registry name (``market1501``, ``synthetic``...).
        train: training samples, pids relabelled 0..num_train_pids-1.
        train_identities: the name of each training label (its original pid, or folder name): what the
            validation split hashes, so that it does not depend on the other identities.
        query, gallery: test samples with their original pids (distractors kept, junk dropped).
        val_query, val_gallery: the validation split (``hold_out_validation``), empty until it is made.
        where: folder or file that each subset was read from (for messages).

    Example:
        >>> ds = ReidDataset([Sample("a.jpg", 0, 0)], [Sample("q.jpg", 5, 0)], [Sample("g.jpg", 5, 1)])
        >>> ds.num_train_pids
        1
    """

    name: ClassVar[str] = "dataset"
    # Official (identities, images) per subset; None where the data set has no fixed size.
    official: dict[str, tuple[int, int]] | None = None
    num_cameras: ClassVar[int | None] = None

    def __init__(self, train: list[Sample], query: list[Sample], gallery: list[Sample],
                 where: dict[str, str] | None = None, verify_counts: str = "ignore",
                 identity_names: dict[int, str] | None = None) -> None:
        """``train`` with the readers' own pids (relabelled here); ``identity_names``: pid -> a stable name
        where the pid is not one (default: the pid as text)."""
        names = identity_names or {}
        self.train_identities = [names.get(pid, str(pid)) for pid in sorted({s.pid for s in train})]
        self.train, self.query, self.gallery = relabel(train), query, gallery
        self.val_query: list[Sample] = []
        self.val_gallery: list[Sample] = []
        self.where = where or {}
        if verify_counts not in VERIFY_MODES:
            raise ConfigError(f"data.verify_counts must be one of {', '.join(VERIFY_MODES)}, got {verify_counts!r}")
        self._validate()
        self._verify_counts(verify_counts)
        logger.info("%s", self.summary())

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    def hold_out_validation(self, amount: float, seed: int = 0) -> None:
        """Move identities of the training set into a validation query and gallery (``data.val_ids``).

        Identities are chosen by a hash of their names (``split.held_out``: a fraction < 1 or a count);
        each gives one query per camera with a gallery image from another camera, the rest to the
        gallery (an identity seen by one camera only is a gallery distractor). The remaining training
        identities are relabelled 0..N-1. Validation pids are the labels before the split.
        """
        held = set(held_out(self.train_identities, amount, seed, what="validation"))
        by_label: dict[int, list[Sample]] = {}
        for sample in self.train:
            by_label.setdefault(sample.pid, []).append(sample)
        train, queries, gallery = [], [], []
        for label, name in enumerate(self.train_identities):
            if name not in held:
                train += by_label[label]
                continue
            rng = np.random.default_rng([seed, identity_hash(seed, name)])
            q, g = pick_queries(by_label[label], lambda s: s.camid, rng)
            queries += q
            gallery += g
        if not queries:
            raise DatasetError(f"none of the {len(held)} identities held out for validation (data.val_ids="
                               f"{amount:g}) has images from two cameras, so no validation query can be made "
                               f"(hold out more identities, or leave data.val_ids at 0)")
        self.train_identities = [n for n in self.train_identities if n not in held]
        self.train, self.val_query, self.val_gallery = relabel(train), sorted(queries), sorted(gallery)
        logger.info("validation split (data.val_ids=%g, data.val_seed=%d): %d of the training identities held "
                    "out: %d query and %d gallery images; training on %d identities, %d images", amount, seed,
                    len(held), len(self.val_query), len(self.val_gallery), self.num_train_pids, len(self.train))

    def split(self, name: str) -> tuple[list[Sample], list[Sample]]:
        """(query, gallery) of the ``test`` or ``val`` split."""
        if name == "test":
            return self.query, self.gallery
        if name == "val":
            if not self.val_query:
                raise ConfigError("there is no validation split: set data.val_ids (a fraction or count of the "
                                  "training identities to hold out, e.g. 0.1)")
            return self.val_query, self.val_gallery
        raise ConfigError(f"split must be test or val, got {name!r}")

    def _where(self, subset: str) -> str:
        return self.where.get(subset, f"{self.name} {subset}")

    def _validate(self) -> None:
        for subset, samples in zip(SUBSETS, (self.train, self.query, self.gallery)):
            if not samples:
                raise DatasetError(f"'{self._where(subset)}' holds no usable image for the {subset} subset "
                                   f"(expected image files such as {getattr(self, 'example_name', '0001_c1_1.jpg')})")
        gallery_pids = {s.pid for s in self.gallery}
        missing = sorted({s.pid for s in self.query} - gallery_pids)
        if missing:
            example = next(s.path for s in self.query if s.pid == missing[0])
            raise DatasetError(f"'{self._where('query')}': query identity {missing[0]} ({example}) has no image in "
                               f"'{self._where('gallery')}' ({len(missing)} query ids absent; expected every "
                               f"query id in the gallery)")

    def _verify_counts(self, mode: str) -> None:
        if mode == "ignore" or not self.official:
            return
        for subset, samples in zip(SUBSETS, (self.train, self.query, self.gallery)):
            ids, images, _ = subset_stats(samples)
            want_ids, want_images = self.official[subset]
            if (ids, images) != (want_ids, want_images):
                msg = (f"'{self._where(subset)}': {self.name} {subset} has {images:,} images of {ids:,} ids, the "
                       f"official release has {want_images:,} of {want_ids:,} (a partial or altered copy? "
                       f"set data.verify_counts=ignore to accept it)")
                if mode == "error":
                    raise DatasetError(msg)
                logger.warning("%s", msg)

    def summary(self) -> str:
        """A table of identities, images and cameras per subset, as torchreid prints at start."""
        rows = [(n, *subset_stats(s)) for n, s in zip(SUBSETS, (self.train, self.query, self.gallery))]
        if self.val_query:
            rows += [("val qry", *subset_stats(self.val_query)), ("val gal", *subset_stats(self.val_gallery))]
        lines = [f"=> {self.name} loaded", "  subset   |   ids | images | cameras",
                 "  ---------+-------+--------+--------"]
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

    def __init__(self, root: str | Path, verify_counts: str = "warn") -> None:
        self.dataset_dir = self.find_dataset_dir(Path(root).expanduser())
        train, query, gallery = self.read_layout(self.dataset_dir)
        where = {n: str(self.dataset_dir / s) for n, s in zip(SUBSETS, self.subsets)}
        super().__init__(train, query, gallery, where=where, verify_counts=verify_counts)

    @classmethod
    def read_layout(cls, dataset_dir: Path) -> tuple[list[Sample], list[Sample], list[Sample]]:
        """(train, query, gallery) of the three subset folders of ``dataset_dir``."""
        train_dir, query_dir, gallery_dir = (dataset_dir / s for s in cls.subsets)
        return cls.read_folder(train_dir), cls.read_folder(query_dir), cls.read_folder(gallery_dir)

    @classmethod
    def find_dataset_dir(cls, root: Path) -> Path:
        """``root`` if it holds the subset folders, else ``root/<name>`` or ``root/<name>/<name>`` (torchreid)."""
        nested = [root / a / b for a in cls.folder_names for b in cls.folder_names]
        for candidate in (root, *(root / name for name in cls.folder_names), *nested):
            if all((candidate / s).is_dir() for s in cls.subsets):
                return candidate
        if not root.is_dir():
            raise DatasetError(f"data root '{root}' is not a folder: {describe_folder(root)} (set data.root to the "
                               f"folder that holds {' or '.join(cls.folder_names) or 'the data set'})")
        base = next((root / n for n in cls.folder_names if (root / n).is_dir()), root)
        missing = [s for s in cls.subsets if not (base / s).is_dir()]
        raise DatasetError(f"'{base}' is not a {cls.name} folder: missing {', '.join(s + '/' for s in missing)} "
                           f"(expected {', '.join(s + '/' for s in cls.subsets)} with images like "
                           f"{cls.example_name}; {describe_folder(base)})")

    @classmethod
    def parse_name(cls, path: str) -> tuple[int, int]:
        """(pid, camid from 0) from a file's name, or a DatasetError naming the file."""
        match = cls.filename_re.match(os.path.basename(path))
        if match is None:
            raise DatasetError(f"cannot parse '{path}': expected a name like {cls.example_name} "
                               f"(pid, then _c and the camera)")
        pid, cam = int(match.group(1)), int(match.group(2))
        if cam < 1 or (cls.num_cameras is not None and cam > cls.num_cameras):
            limit = f"c1..c{cls.num_cameras}" if cls.num_cameras else "c1 or more"
            raise DatasetError(f"camera c{cam} in '{path}' is out of range (expected {limit}, "
                               f"e.g. {cls.example_name})")
        return pid, cam - 1

    @classmethod
    def read_folder(cls, folder: Path) -> list[Sample]:
        """Every image of ``folder`` as a Sample, junk dropped, sorted by path. No image is opened."""
        samples = []
        for name in scan_images(folder):
            path = os.path.join(folder, name)
            pid, camid = cls.parse_name(path)
            if pid in cls.junk_pids:
                continue
            samples.append(Sample(path, pid, camid))
        if not samples:
            raise DatasetError(f"'{folder}' holds no usable image (expected files like {cls.example_name}; "
                               f"{describe_folder(folder)})")
        return samples


class CombinedDataset(ReidDataset):
    """Several training sets as one (``data.dataset: market1501+dukemtmc``); test on the first.

    Identities of different sets never merge: the pids of set i are offset by the number of training
    identities before it, and its cameras likewise, so every (pid, camid) stays distinct.
    """

    def __init__(self, parts: Sequence[ReidDataset]) -> None:
        if len(parts) < 2:
            raise ValueError("CombinedDataset needs at least two data sets")
        self.parts = list(parts)
        self.name = "+".join(p.name for p in parts)
        train: list[Sample] = []
        names: dict[int, str] = {}
        pid_offset = cam_offset = 0
        for part in parts:
            train += [Sample(s.path, s.pid + pid_offset, s.camid + cam_offset) for s in part.train]
            names.update({pid_offset + label: f"{part.name}/{name}" for label, name in enumerate(part.train_identities)})
            pid_offset += part.num_train_pids
            cam_offset += 1 + max(s.camid for s in (*part.train, *part.query, *part.gallery))
        first = parts[0]
        where = {"train": " + ".join(p._where("train") for p in parts), "query": first._where("query"),
                 "gallery": first._where("gallery")}
        super().__init__(train, first.query, first.gallery, where=where, identity_names=names)


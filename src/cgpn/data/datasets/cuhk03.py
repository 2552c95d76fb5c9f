"""CUHK03 (Li et al., CVPR 2014) under the new protocol (Zhong et al., CVPR 2017): 767 train / 700 test ids.

Two forms are read, labeled (hand-drawn boxes, the paper's choice) or detected (DPM boxes):

(a) the official release: ``cuhk-03.mat`` (MATLAB v7.3, i.e. HDF5: cells ``labeled`` and ``detected``
    of 5 x 1, one per camera pair, each an M x 10 cell of uint8 images, H x W x 3, empty where an image
    is missing; columns 1-5 are camera 1, 6-10 camera 2) with the protocol's split file
    ``cuhk03_new_protocol_config_{labeled,detected}.mat`` (MATLAB v5: ``filelist`` names
    ``P_PPP_C_II.png`` = pair, person, camera, image; ``labels``; ``camId``; 1-based ``train_idx``,
    ``query_idx``, ``gallery_idx``). The images are written once as PNG files under those names into
    a cache folder (``images_labeled/`` beside ``cuhk03_release/`` as torchreid does, or under
    ``data.cuhk03_cache``), once: a folder that already holds every listed image is reused;
(b) the Market-style release ``cuhk03-np/{labeled,detected}/{bounding_box_train,query,bounding_box_test}``
    with names like ``0001_c1_1.png`` (pid = the protocol's label, camera 1 or 2).

Official counts: train 7,368 (labeled) / 7,365 (detected) images of 767 ids, query 1,400 of 700 ids,
gallery 5,328 / 5,332 of 700 ids.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cgpn.data.datasets.base import MarketLayoutDataset, ReidDataset, Sample, describe_folder
from cgpn.errors import DatasetError
from cgpn.files import mark_in_progress, new_file_mode, remove_abandoned

__all__ = ["CUHK03", "CUHK03Protocol", "extract_cuhk03_images", "read_protocol"]

logger = logging.getLogger(__name__)

RAW_MAT = "cuhk-03.mat"
CONFIG_MAT = "cuhk03_new_protocol_config_{variant}.mat"
FILELIST_RE = re.compile(r"^(\d)_(\d{3})_([12])_(\d{2})\.png$")
EXAMPLE_FILE = "1_001_1_01.png"
OFFICIAL = {
    "labeled": {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)},
    "detected": {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)},
}


@dataclass
class CUHK03Protocol:
    """The content of one new-protocol split file (indices 0-based here)."""

    path: Path
    filelist: list[str]  # P_PPP_C_II.png
    labels: np.ndarray  # (N,) identity 1..1467
    cam_ids: np.ndarray  # (N,) 1 or 2
    train_idx: np.ndarray
    query_idx: np.ndarray
    gallery_idx: np.ndarray

    def samples(self, image_dir: Path) -> tuple[list[Sample], list[Sample], list[Sample]]:
        """(train, query, gallery) with paths ``image_dir/<filelist name>``."""

        folder = str(image_dir)

        def pick(idx: np.ndarray) -> list[Sample]:
            return sorted(Sample(os.path.join(folder, self.filelist[i]), int(self.labels[i]), int(self.cam_ids[i]) - 1)
                          for i in idx)

        return pick(self.train_idx), pick(self.query_idx), pick(self.gallery_idx)


def read_protocol(path: Path) -> CUHK03Protocol:
    """Read and check a ``cuhk03_new_protocol_config_*.mat`` file (a DatasetError says what is wrong)."""
    from scipy.io import loadmat

    expected = f"a MATLAB v5 split file with filelist, labels, camId, train_idx, query_idx, gallery_idx " \
               f"(e.g. {CONFIG_MAT.format(variant='labeled')})"
    try:
        mat = loadmat(str(path))
    except Exception as err:  # scipy raises many kinds (MatReadError on an empty file)
        kind = "a MATLAB v7.3 (HDF5) file" if _is_hdf5(path) else (str(err).splitlines() or ["nothing readable"])[0]
        raise DatasetError(f"'{path}' is not a CUHK03 split file: expected {expected}, found {kind}") from None
    keys = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")
    missing = [k for k in keys if k not in mat]
    if missing:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "no variables"
        raise DatasetError(f"'{path}' is not a CUHK03 split file: expected {expected}, found {found}")
    filelist = [str(np.asarray(v).ravel()[0]) for v in np.asarray(mat["filelist"]).ravel()]
    bad = next((n for n in filelist if not FILELIST_RE.match(n)), None)
    if bad is not None:
        raise DatasetError(f"'{path}': filelist name '{bad}' does not parse (expected pair_person_camera_image "
                           f"like {EXAMPLE_FILE})")
    labels, cams = (np.asarray(mat[k]).ravel().astype(np.int64) for k in ("labels", "camId"))
    n = len(filelist)
    if len(labels) != n or len(cams) != n:
        raise DatasetError(f"'{path}': filelist has {n} names but labels {len(labels)} and camId {len(cams)} "
                           f"(expected one of each per image)")
    idx = {}
    for k in ("train_idx", "query_idx", "gallery_idx"):
        one_based = np.asarray(mat[k]).ravel().astype(np.int64)
        if one_based.size == 0 or one_based.min() < 1 or one_based.max() > n:
            found = f"{one_based.min()}..{one_based.max()}" if one_based.size else "none"
            raise DatasetError(f"'{path}': {k} must hold 1-based indices into filelist (1..{n}), found {found}")
        idx[k] = one_based - 1
    return CUHK03Protocol(path, filelist, labels, cams, idx["train_idx"], idx["query_idx"], idx["gallery_idx"])


def _is_hdf5(path: Path) -> bool:
    import h5py

    return h5py.is_hdf5(str(path))


def extract_cuhk03_images(mat_path: Path, variant: str, out_dir: Path, progress: bool = True) -> set[str]:
    """Write every ``variant`` image of ``cuhk-03.mat`` to ``out_dir`` as ``P_PPP_C_II.png``.

    The .mat stores MATLAB arrays transposed (HDF5 is row-major): a pair's M x 10 cell reads as
    (10, M) references, an H x W x 3 image as (3, W, H). Files appear complete or not at all
    (written to a temporary name, then renamed). Returns the names written.
    """
    import h5py

    expected = f"the official MATLAB v7.3 {RAW_MAT} with cells 'labeled' and 'detected'"
    if not _is_hdf5(mat_path):
        header = mat_path.read_bytes()[:40].decode("latin-1").split(",")[0].strip() or "an empty file"
        raise DatasetError(f"'{mat_path}' is not {expected}: found {header!r} (not HDF5; is it a split file?)")
    try:
        mat = h5py.File(mat_path, "r")
    except OSError as err:  # a truncated copy
        raise DatasetError(f"'{mat_path}' is not {expected}: {str(err).splitlines()[0]}") from None
    with mat:
        if not isinstance(mat.get(variant), h5py.Dataset) or mat[variant].dtype != h5py.ref_dtype:
            found = ", ".join(k for k in mat if not k.startswith("#")) or "no variables"
            raise DatasetError(f"'{mat_path}' is not {expected}: found {found}")
        pairs = [mat[ref] for ref in np.asarray(mat[variant]).ravel()]
        jobs = []
        for pair, cell in enumerate(pairs):
            refs = np.asarray(cell)  # (10, M)
            if refs.dtype != h5py.ref_dtype or refs.ndim != 2 or refs.shape[0] != 10:
                raise DatasetError(f"'{mat_path}': cell {variant}{{{pair + 1}}} has shape {refs.shape[::-1]} "
                                   f"(expected an M x 10 cell of images)")
            jobs += [(pair, person, image, refs[image, person])
                     for person in range(refs.shape[1]) for image in range(10)]
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned(out_dir.glob(".*.png.*.tmp"))  # images a killed extraction left half-written
        names, mode = [], new_file_mode()
        for pair, person, image, ref in tqdm(jobs, desc=f"extract {variant}", unit="img", disable=not progress):
            pixels = np.asarray(mat[ref])
            if pixels.ndim != 3 or pixels.size == 0:  # an empty cell: MATLAB stores [0 0]
                continue
            name = f"{pair + 1}_{person + 1:03d}_{1 if image < 5 else 2}_{image + 1:02d}.png"
            # a name of this process's own: under torchrun every process may extract at once (same bytes)
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                mark_in_progress(fd)  # until renamed: remove_abandoned leaves it alone
                Image.fromarray(np.ascontiguousarray(pixels.transpose(2, 1, 0)).astype(np.uint8)).save(f, format="PNG")
                os.replace(tmp, out_dir / name)
            names.append(name)
    logger.info("extracted %d %s images from %s to %s", len(names), variant, mat_path, out_dir)
    return set(names)


class _CUHK03NPLayout(MarketLayoutDataset):
    """The Market-style CUHK03-NP release (one of its ``labeled/`` or ``detected/`` folders)."""

    name = "cuhk03"
    example_name = "0001_c1_1.png"
    junk_pids = ()
    num_cameras = 2


class CUHK03(ReidDataset):
    """CUHK03 new protocol, from ``cuhk-03.mat`` + split file or from the ``cuhk03-np`` folders.

    Args:
        root: folder holding ``cuhk03-np/`` or ``cuhk-03.mat`` (directly, or under ``cuhk03/`` or
            ``cuhk03_release/``; the split files beside it or one level up).
        labeled: labeled boxes (True, the paper) or detected boxes (False).
        cache_dir: where images extracted from the .mat go (default: ``images_{variant}`` beside it).
        verify_counts: ``warn`` / ``error`` / ``ignore`` when the sizes differ from the official ones.

    Example:
        >>> ds = CUHK03("~/data", labeled=True)  # doctest: +SKIP
        >>> len(ds.train), len(ds.query), len(ds.gallery)
        (7368, 1400, 5328)
    """

    name = "cuhk03"
    num_cameras = 2
    example_name = "0001_c1_1.png"

    def __init__(self, root: str | Path, labeled: bool = True, cache_dir: str | Path | None = None,
                 verify_counts: str = "warn", progress: bool = True) -> None:
        root = Path(root).expanduser()
        self.variant = "labeled" if labeled else "detected"
        self.official = OFFICIAL[self.variant]
        folder = self._find_np_folder(root)
        if folder is not None:
            self.dataset_dir = folder
            train, query, gallery = _CUHK03NPLayout.read_layout(folder)
            where = {n: str(folder / s) for n, s in zip(("train", "query", "gallery"), _CUHK03NPLayout.subsets)}
        else:
            mat_path, config_path = self._find_mat_files(root)
            protocol = read_protocol(config_path)  # checked before anything is written
            # one folder per variant: the two use the same file names for different boxes
            image_dir = (Path(cache_dir).expanduser() / f"images_{self.variant}" if cache_dir
                         else self.default_cache(mat_path, self.variant))
            names = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
            if not names.issuperset(protocol.filelist):  # extract once; a finished cache is reused
                names |= extract_cuhk03_images(mat_path, self.variant, image_dir, progress=progress)
            absent = [n for n in protocol.filelist if n not in names]
            if absent:
                raise DatasetError(f"'{config_path}' lists {len(absent)} image(s) that the '{self.variant}' cell of "
                                   f"'{mat_path}' does not hold, e.g. {absent[0]} (expected the split file of the "
                                   f"same variant; cache '{image_dir}')")
            self.dataset_dir = image_dir
            train, query, gallery = protocol.samples(image_dir)
            where = {n: f"{config_path} ({n}_idx)" for n in ("train", "query", "gallery")}
        super().__init__(train, query, gallery, where=where, verify_counts=verify_counts)

    @staticmethod
    def default_cache(mat_path: Path, variant: str) -> Path:
        """``images_{variant}/`` beside the .mat, or beside ``cuhk03_release/`` (where torchreid puts it)."""
        base = mat_path.parent.parent if mat_path.parent.name == "cuhk03_release" else mat_path.parent
        return base / f"images_{variant}"

    def _find_np_folder(self, root: Path) -> Path | None:
        """The ``labeled``/``detected`` folder of a Market-style release under ``root``, if any."""
        candidates = [root / self.variant, root / "cuhk03-np" / self.variant, root / "cuhk03" / "cuhk03-np" / self.variant]
        if root.name == self.variant:
            candidates.insert(0, root)
        for candidate in candidates:
            if candidate.is_dir():
                _CUHK03NPLayout.find_dataset_dir(candidate)  # raises if a subset folder is missing
                return candidate
        return None

    def _find_mat_files(self, root: Path) -> tuple[Path, Path]:
        """(cuhk-03.mat, split file of this variant), or a DatasetError listing what was looked for."""
        if not root.is_dir():
            raise DatasetError(f"data root '{root}' is not a folder: {describe_folder(root)} (set data.root to the "
                               f"folder that holds cuhk03-np/ or {RAW_MAT})")
        dirs = [root, root / "cuhk03", root / "cuhk03_release", root / "cuhk03" / "cuhk03_release"]
        mat_path = next((d / RAW_MAT for d in dirs if (d / RAW_MAT).is_file()), None)
        if mat_path is None:
            raise DatasetError(f"'{root}' holds no CUHK03 copy: expected cuhk03-np/{self.variant}/ with "
                               f"bounding_box_train/, query/, bounding_box_test/ (images like {self.example_name}) "
                               f"or {RAW_MAT} with {CONFIG_MAT.format(variant=self.variant)}; {describe_folder(root)}")
        config = CONFIG_MAT.format(variant=self.variant)
        near = [mat_path.parent, mat_path.parent.parent, *dirs]
        config_path = next((d / config for d in near if (d / config).is_file()), None)
        if config_path is None:
            raise DatasetError(f"'{mat_path.parent}': found {RAW_MAT} but not the split file {config} (expected it "
                               f"beside the .mat or one folder up; it is in github.com/zhunzhong07/person-re-ranking)")
        return mat_path, config_path

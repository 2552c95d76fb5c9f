"""MOTChallenge text files: detections (``det.txt``), ground truth (``gt.txt``) and tracks, one box a line.

A line is ``frame,id,bb_left,bb_top,bb_width,bb_height,conf[,class,visibility[,z]]``: frames count from 1,
detections carry id -1, and box corners are 1-based pixels (MATLAB's convention, which MOTChallenge kept).
In memory, boxes are 0-based ``(left, top, width, height)``, so that ``image[top:top + height]`` is the box.
Ground truth uses column 7 as the "consider" flag (0: ignore) and column 8 as the class (1: pedestrian).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cgpn.errors import DatasetError
from cgpn.files import atomic_path

__all__ = ["KINDS", "MotBoxes", "read_mot", "write_mot"]

logger = logging.getLogger(__name__)

KINDS = ("detections", "ground truth", "tracks")  # what a file holds: decides which columns must make sense
_EXPECTED = {
    "detections": "frame,-1,left,top,width,height,confidence",
    "ground truth": "frame,id,left,top,width,height,flag,class,visibility",
    "tracks": "frame,id,left,top,width,height,confidence",
}


@dataclass
class MotBoxes:
    """The boxes of one MOT file, one row per line, sorted by frame (then id).

    Attributes:
        frame: (N,) int64 frame numbers, from 1.
        ids: (N,) int64 identities (-1 for detections).
        ltwh: (N, 4) float64 boxes, 0-based pixels.
        conf: (N,) float64 confidence (detections, tracks) or the consider flag (ground truth).
        cls: (N,) int64 class (ground truth: 1 pedestrian; -1 where the file has no column 8).
        vis: (N,) float64 visibility (ground truth; -1 where the file has no column 9).
    """

    frame: np.ndarray
    ids: np.ndarray
    ltwh: np.ndarray
    conf: np.ndarray
    cls: np.ndarray
    vis: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def num_frames(self) -> int:
        """The last frame with a box (0 for an empty file)."""
        return int(self.frame.max()) if len(self) else 0

    @property
    def xyxy(self) -> np.ndarray:
        """(N, 4) boxes as (x1, y1, x2, y2), 0-based."""
        return np.concatenate([self.ltwh[:, :2], self.ltwh[:, :2] + self.ltwh[:, 2:]], axis=1)

    def select(self, keep: np.ndarray) -> MotBoxes:
        """The rows where the boolean (N,) mask ``keep`` is true (or at the given indices)."""
        return MotBoxes(*(a[keep] for a in (self.frame, self.ids, self.ltwh, self.conf, self.cls, self.vis)))

    def by_frame(self, num_frames: int) -> list[np.ndarray]:
        """Row indices of each frame 1..``num_frames`` (a list of ``num_frames`` int arrays)."""
        bounds = np.searchsorted(self.frame, np.arange(1, num_frames + 2))
        return [np.arange(bounds[t], bounds[t + 1]) for t in range(num_frames)]

    @classmethod
    def from_rows(cls, frame, ids, ltwh, conf=None, classes=None, vis=None) -> MotBoxes:
        """Boxes from arrays (``conf`` 1, ``classes`` and ``vis`` -1 where not given), sorted by frame and id
        (rows with the same frame and id keep their order: detections stay in the detector's order)."""
        frame = np.asarray(frame, dtype=np.int64).reshape(-1)
        n = len(frame)
        ids = np.asarray(ids, dtype=np.int64).reshape(n)
        ltwh = np.asarray(ltwh, dtype=np.float64).reshape(n, 4)
        conf = np.ones(n) if conf is None else np.asarray(conf, dtype=np.float64).reshape(n)
        classes = np.full(n, -1, dtype=np.int64) if classes is None else np.asarray(classes, np.int64).reshape(n)
        vis = np.full(n, -1.0) if vis is None else np.asarray(vis, dtype=np.float64).reshape(n)
        order = np.lexsort((np.arange(n), ids, frame))
        return cls(frame[order], ids[order], ltwh[order], conf[order], classes[order], vis[order])


def read_mot(path: str | Path, kind: str) -> MotBoxes:
    """Read and check a MOT file; a DatasetError names the first bad line and what it should look like.

    Args:
        path: the text file.
        kind: one of ``KINDS``. Ground truth and tracks need ids >= 0, unique within a frame (the metrics
            index by them); detections ignore the id column.
    """
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    expected = _EXPECTED[kind]
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise DatasetError(f"{kind} file '{path}' is {what} (expected a MOT text file, one '{expected}' a line)")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DatasetError(f"{kind} file '{path}' is not text (expected one '{expected}' a line)") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.replace(",", " ").split()]
        except ValueError:
            values = []
        ok = (len(values) >= 6 and all(math.isfinite(v) for v in values) and values[0] >= 1
              and values[0] == int(values[0]) and values[1] == int(values[1]) and min(values[4:6]) >= 0
              and (kind == "detections" or values[1] >= 0))
        if not ok:
            raise DatasetError(f"{path}:{number}: expected '{expected}' (numbers; frame >= 1, width and height "
                               f">= 0{'' if kind == 'detections' else ', id >= 0'}), found '{line.strip()[:80]}'")
        row = (values + [-1.0] * 9)[:9]
        if len(values) < 7:
            row[6] = 1.0  # no confidence / flag column: every box counts
        rows.append(row)
    data = np.asarray(rows, dtype=np.float64).reshape(-1, 9)
    boxes = MotBoxes.from_rows(data[:, 0], data[:, 1], data[:, 2:6] - [1, 1, 0, 0], data[:, 6], data[:, 7], data[:, 8])
    if kind != "detections" and len(boxes):
        same = (np.diff(boxes.frame) == 0) & (np.diff(boxes.ids) == 0)
        if same.any():
            i = int(np.flatnonzero(same)[0])
            raise DatasetError(f"{kind} file '{path}' gives id {boxes.ids[i]} two boxes in frame {boxes.frame[i]} "
                               "(an id is one object: one box per frame)")
    return boxes


def write_mot(path: str | Path, boxes: MotBoxes, kind: str) -> Path:
    """Write ``boxes`` as a MOT file (whole or not at all); returns the path.

    Detections and tracks get ``frame,id,left,top,width,height,conf,-1,-1,-1`` (the MOTChallenge submission
    format); ground truth ``frame,id,left,top,width,height,flag,class,visibility``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    corner = boxes.ltwh[:, :2] + 1  # 1-based on disk
    lines = []
    for i in range(len(boxes)):
        head = (f"{boxes.frame[i]},{boxes.ids[i]},{corner[i, 0]:.2f},{corner[i, 1]:.2f},"
                f"{boxes.ltwh[i, 2]:.2f},{boxes.ltwh[i, 3]:.2f}")
        if kind == "ground truth":
            lines.append(f"{head},{boxes.conf[i]:g},{boxes.cls[i]},{boxes.vis[i]:.3f}")
        else:
            lines.append(f"{head},{boxes.conf[i]:.3f},-1,-1,-1")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    return Path(path)

"""Tracking metrics from the maintained implementations: py-motmetrics (IDF1, ID switches, MOTA) and
TrackEval (HOTA, DetA, AssA). Nothing here computes a metric; it only hands both libraries the same boxes.

py-motmetrics matches boxes at IoU >= 0.5 and scores the ground-truth rows whose flag (column 7) is not 0
and whose class (column 8) is pedestrian or absent, as its MOTChallenge app does. TrackEval reads the same
files through its own MOTChallenge reader, with MOT17's preprocessing (tracker boxes on distractor
classes are dropped) and HOTA averaged over IoU thresholds 0.05..0.95.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cgpn.errors import DatasetError, DependencyError
from cgpn.track.mot import MotBoxes, write_mot

__all__ = ["TrackingMetrics", "evaluate_tracking", "import_metric_libraries"]

_MOTMETRICS = {  # our field -> py-motmetrics metric name
    "idf1": "idf1", "idp": "idp", "idr": "idr", "id_switches": "num_switches", "mota": "mota", "motp": "motp",
    "false_positives": "num_false_positives", "misses": "num_misses", "gt_boxes": "num_objects",
    "fragmentations": "num_fragmentations", "gt_ids": "num_unique_objects", "mostly_tracked": "mostly_tracked",
    "mostly_lost": "mostly_lost",
}


@dataclass
class TrackingMetrics:
    """Scores of one sequence. Fractions in [0, 1] (MOTA may be negative); counts as integers."""

    idf1: float
    idp: float
    idr: float
    id_switches: int
    mota: float
    motp: float  # mean (1 - IoU) of matched boxes, py-motmetrics' definition
    false_positives: int
    misses: int
    gt_boxes: int
    fragmentations: int
    gt_ids: int
    mostly_tracked: int
    mostly_lost: int
    hota: float
    deta: float
    assa: float
    loca: float
    track_ids: int  # distinct ids in the tracker's output

    def summary(self) -> str:
        """One line for a person: the identity scores first."""
        return (f"IDF1 {100 * self.idf1:.1f}  IDsw {self.id_switches}  HOTA {100 * self.hota:.1f}  "
                f"AssA {100 * self.assa:.1f}  DetA {100 * self.deta:.1f}  MOTA {100 * self.mota:.1f}  "
                f"FP {self.false_positives}  FN {self.misses}  IDs {self.track_ids} for {self.gt_ids} people")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def import_metric_libraries():
    """(motmetrics, trackeval), or a DependencyError saying how to install them."""
    try:
        import motmetrics
        import trackeval
    except ImportError as err:
        raise DependencyError(f"tracking metrics need py-motmetrics and TrackEval ({err.name} is missing): "
                              "pip install 'cgpn[track]'") from None
    if not hasattr(motmetrics.distances.np, "asfarray"):
        motmetrics.distances.np = _numpy_with_asfarray()
    return motmetrics, trackeval


def _numpy_with_asfarray() -> types.ModuleType:
    """NumPy plus ``asfarray``, for py-motmetrics' ``distances`` module only: its latest release (1.4.0) calls
    ``np.asfarray``, which NumPy 2.0 removed. NumPy itself is left as it is."""
    shim = types.ModuleType("numpy")
    shim.__getattr__ = lambda name: getattr(np, name)  # PEP 562: everything else is NumPy's
    shim.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)
    return shim


def _frame_id_table(boxes: MotBoxes):
    """A pandas table indexed by (FrameId, Id) with X, Y, Width, Height: what py-motmetrics compares."""
    import pandas as pd

    index = pd.MultiIndex.from_arrays([boxes.frame, boxes.ids], names=["FrameId", "Id"])
    return pd.DataFrame(boxes.ltwh, index=index, columns=["X", "Y", "Width", "Height"])


def _motmetrics(gt: MotBoxes, tracks: MotBoxes, iou: float) -> dict[str, float]:
    mm, _ = import_metric_libraries()
    scored = gt.select((gt.conf != 0) & np.isin(gt.cls, (-1, 1)))
    acc = mm.utils.compare_to_groundtruth(_frame_id_table(scored), _frame_id_table(tracks), "iou", distth=1 - iou)
    summary = mm.metrics.create().compute(acc, metrics=list(_MOTMETRICS.values()), name="seq")
    return {ours: summary[theirs].iloc[0] for ours, theirs in _MOTMETRICS.items()}


def _trackeval(gt: MotBoxes, tracks: MotBoxes, num_frames: int) -> dict[str, float]:
    """HOTA, DetA, AssA, LocA through TrackEval's MOTChallenge reader (it reads files: a temporary folder)."""
    _, trackeval = import_metric_libraries()
    with tempfile.TemporaryDirectory(prefix="cgpn-trackeval-") as tmp:
        root = Path(tmp)
        gt = MotBoxes(gt.frame, gt.ids, gt.ltwh, gt.conf, np.where(gt.cls < 0, 1, gt.cls), gt.vis)  # no class: pedestrian
        write_mot(root / "gt" / "seq" / "gt" / "gt.txt", gt, "ground truth")
        write_mot(root / "trackers" / "cgpn" / "data" / "seq.txt", tracks, "tracks")
        config = {"GT_FOLDER": str(root / "gt"), "TRACKERS_FOLDER": str(root / "trackers"), "SKIP_SPLIT_FOL": True,
                  "SEQ_INFO": {"seq": num_frames}, "TRACKERS_TO_EVAL": ["cgpn"], "BENCHMARK": "MOT17",
                  "PRINT_CONFIG": False}
        with contextlib.redirect_stdout(io.StringIO()):  # TrackEval prints its progress
            dataset = trackeval.datasets.MotChallenge2DBox(config)
            data = dataset.get_preprocessed_seq_data(dataset.get_raw_seq_data("cgpn", "seq"), "pedestrian")
            res = trackeval.metrics.HOTA().eval_sequence(data)
    return {"hota": res["HOTA"].mean(), "deta": res["DetA"].mean(), "assa": res["AssA"].mean(),
            "loca": res["LocA"].mean()}


def evaluate_tracking(gt: MotBoxes, tracks: MotBoxes, iou: float = 0.5) -> TrackingMetrics:
    """Score ``tracks`` against ``gt`` (both as read by ``cgpn.track.mot.read_mot``).

    Args:
        gt: ground truth boxes (ids >= 0, one box per id and frame).
        tracks: the tracker's boxes (same rules).
        iou: the IoU at which py-motmetrics counts a box as matched (0.5 in MOTChallenge).

    Returns:
        IDF1, ID switches, MOTA, ... from py-motmetrics; HOTA, DetA, AssA, LocA from TrackEval.
    """
    if not len(gt):
        raise DatasetError("the ground truth holds no box: nothing to score against")
    if not 0 < iou < 1:
        raise DatasetError(f"the matching IoU must be in (0, 1), got {iou}")
    num_frames = max(gt.num_frames, tracks.num_frames)
    values = {**_motmetrics(gt, tracks, iou), **_trackeval(gt, tracks, num_frames)}
    ints = {"id_switches", "false_positives", "misses", "gt_boxes", "fragmentations", "gt_ids", "mostly_tracked",
            "mostly_lost"}
    values = {k: int(v) if k in ints else float(v) for k, v in values.items()}
    return TrackingMetrics(**values, track_ids=len(np.unique(tracks.ids)))

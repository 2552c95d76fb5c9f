"""A colour-histogram embedder: the appearance baseline that the tracking benchmark compares cgpn with.

Same interface as ``cgpn.track.TrackerEmbedder``: ``embedder(image, boxes_xyxy)`` -> (N, D) unit rows,
``predict(crops)`` for deep-sort-realtime. Each box is split into an upper and a lower half (clothes), and
each half gives a joint hue x saturation x value histogram; the square roots of the normalised counts make
the cosine distance of two rows the Hellinger distance of the histograms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["ColorHistogramEmbedder"]


class ColorHistogramEmbedder:
    """HSV histograms of the upper and lower half of each box, as unit rows.

    Args:
        bins: bins of hue, saturation and value (8 x 4 x 4: hue matters most for clothes).
        bgr: frames and crops are OpenCV's BGR (True, as trackers pass them) or RGB.

    Example:
        >>> emb = ColorHistogramEmbedder(bgr=False)
        >>> emb(np.zeros((100, 80, 3), np.uint8), np.array([[10, 10, 40, 90]])).shape
        (1, 256)
    """

    def __init__(self, bins: tuple[int, int, int] = (8, 4, 4), bgr: bool = True) -> None:
        self.bins, self.bgr = tuple(int(b) for b in bins), bgr
        self.embedding_dim = 2 * int(np.prod(self.bins))

    def embed_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32 unit rows for a list of (h, w, 3) uint8 crops; an empty crop gives the uniform row."""
        out = np.empty((len(crops), self.embedding_dim), dtype=np.float32)
        for i, crop in enumerate(crops):
            out[i] = self._embed(np.asarray(crop))
        return out

    def predict(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """deep-sort-realtime's embedder interface: one D-dim vector per crop."""
        return list(self.embed_crops(crops))

    def __call__(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(N, D) rows for the (N, >=4) pixel boxes (x1, y1, x2, y2) of ``image`` (H, W, 3), clipped to it."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float64)
        if boxes.size == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        h, w = image.shape[:2]
        x1, x2 = (np.clip(np.round(boxes[:, i]), 0, w).astype(int) for i in (0, 2))
        y1, y2 = (np.clip(np.round(boxes[:, i]), 0, h).astype(int) for i in (1, 3))
        return self.embed_crops([image[a:b, c:d] for a, b, c, d in zip(y1, y2, x1, x2)])

    def _embed(self, crop: np.ndarray) -> np.ndarray:
        halves = np.array_split(crop, 2, axis=0) if crop.size else [crop, crop]
        parts = [self._histogram(half) for half in halves]
        row = np.sqrt(np.concatenate(parts))
        norm = np.linalg.norm(row)
        return row / norm if norm > 0 else np.full(self.embedding_dim, self.embedding_dim ** -0.5)

    def _histogram(self, part: np.ndarray) -> np.ndarray:
        n = int(np.prod(self.bins))
        if part.size == 0:
            return np.zeros(n)
        rgb = np.ascontiguousarray(part[..., ::-1] if self.bgr else part, dtype=np.uint8)
        hsv = np.asarray(Image.fromarray(rgb).convert("HSV"), dtype=np.int64).reshape(-1, 3)
        hb, sb, vb = self.bins
        code = (hsv[:, 0] * hb >> 8) * sb * vb + (hsv[:, 1] * sb >> 8) * vb + (hsv[:, 2] * vb >> 8)
        return np.bincount(code, minlength=n) / len(code)

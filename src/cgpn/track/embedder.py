"""A trained network as the appearance encoder of a multi-object tracker.

A tracker keeps identities through crossings and occlusions by comparing an appearance feature of every
detected box. ``TrackerEmbedder`` gives those features for all boxes of a video frame in one call, under the
names the popular trackers call:

- BoxMOT (``reid_model=`` of BoT-SORT, StrongSORT, DeepOCSORT): ``get_features(xyxys, img)``;
- deep-sort-realtime: set ``tracker.embedder`` to it (the tracker calls ``predict(crops)``), or pass
  ``embeds=deepsort_embeds(frame, detections)`` to ``update_tracks``.

Crops are cut from the frame, resized to the network's input size and normalised in one batched tensor
operation (``torchvision.ops.roi_align`` over the frame: bilinear, 2 x 2 samples per output pixel), where the
network runs, then go through ``cgpn.runtime.Runtime`` (the backends of ``FeatureExtractor``).

Example (deep-sort-realtime, detections as ``[([left, top, w, h], confidence, class), ...]``):
    >>> from deep_sort_realtime.deepsort_tracker import DeepSort
    >>> tracker = DeepSort(max_age=30, embedder=None)
    >>> tracker.embedder = TrackerEmbedder("runs/demo/last.pt")
    >>> tracks = tracker.update_tracks(detections, frame=frame)     # frame: OpenCV BGR (H, W, 3) uint8
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import roi_align

from cgpn.config import Config
from cgpn.errors import ConfigError, ImageError
from cgpn.runtime import Runtime

__all__ = ["SAMPLES", "TrackerEmbedder"]

logger = logging.getLogger(__name__)

# Bilinear samples per output pixel along each axis (roi_align's sampling_ratio): 2 x 2 points averaged per
# pixel of the network's input, so that the usual 2-4x downscale of a person box does not alias much.
SAMPLES = 2


def _as_boxes(xyxys: Any) -> np.ndarray:
    """(N, >= 4) or (>= 4,) boxes -> (N, 4) float64 x1, y1, x2, y2; columns past the fourth (BoxMOT's
    confidence, class, index) are ignored."""
    if isinstance(xyxys, torch.Tensor):
        xyxys = xyxys.detach().cpu().numpy()
    try:
        boxes = np.array(xyxys, dtype=np.float64)  # a copy: clipping never changes the caller's array
    except (TypeError, ValueError):
        raise ConfigError(f"boxes must be an (N, >= 4) array of x1, y1, x2, y2 pixel coordinates, got "
                          f"{type(xyxys).__name__} that is not one") from None
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] < 4:
        raise ConfigError(f"boxes must be an (N, >= 4) array of x1, y1, x2, y2 pixel coordinates, got shape "
                          f"{boxes.shape}")
    return boxes[:, :4]


def _check_image(img: Any, what: str, empty_ok: bool = False) -> np.ndarray:
    if (not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8
            or (not empty_ok and img.size == 0)):
        found = f"shape {img.shape} {img.dtype}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ImageError(f"{what} must be an (H, W, 3) uint8 array (OpenCV's BGR; TrackerEmbedder(bgr=False) for "
                         f"RGB), got {found}")
    return img


class TrackerEmbedder:
    """Appearance features of boxes in video frames: (N, D) float32 rows of unit length.

    Args:
        checkpoint: a checkpoint written by ``cgpn train``, an ONNX file written by ``cgpn export``, or a
            network in memory (with ``config``).
        device: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
        backend: ``auto``, ``eager``, ``channels_last``, ``bf16``, ``compile`` or ``onnx`` (see ``cgpn.runtime``).
        batch_size: crops per forward pass (each also runs mirrored when flip averaging is on).
        bgr: frames and crops are in OpenCV's BGR order (BoxMOT's and deep-sort-realtime's); False for RGB.
        flip: flip averaging; ``None``: the checkpoint's own setting.
        config: settings of a network passed in memory.

    Attributes:
        embedding_dim: D; input_shape: (height, width) every crop is resized to (the checkpoint's own);
        blank: (D,) the feature of a box with no pixel in the frame.

    A box is clipped to the frame; one outside it, of zero area or with a non-finite coordinate (and an empty
    crop) gets ``blank``, the unit vector of equal coordinates 1 / sqrt(D): finite, never a zero row.

    Example:
        >>> emb = TrackerEmbedder("runs/demo/last.pt", device="cpu")
        >>> emb(frame, np.array([[100, 50, 180, 300], [400, 80, 470, 290]])).shape    # frame: BGR (H, W, 3)
        (2, 3072)
    """

    def __init__(self, checkpoint: str | Path | nn.Module, device: str = "auto", backend: str = "auto",
                 batch_size: int = 32, bgr: bool = True, flip: bool | None = None,
                 config: Config | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.runtime = Runtime(checkpoint, device=device, backend=backend, flip=flip, config=config)
        self.batch_size, self.bgr = batch_size, bgr
        self.device, self.backend = self.runtime.device, self.runtime.backend
        self.input_shape: tuple[int, int] = self.runtime.input_shape
        self.embedding_dim: int = self.runtime.feature_dim
        # crops are made where the network runs (onnxruntime takes CPU arrays)
        self._where = torch.device("cpu") if self.backend == "onnx" else self.device
        mean, std = torch.tensor(self.runtime.mean), torch.tensor(self.runtime.std)
        # (x / 255 - mean) / std on 8-bit values x, as one multiply-add
        self._scale = (1 / (255 * std)).view(1, 3, 1, 1).to(self._where)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(self._where)
        # the feature of a box with no pixel to look at: fixed, of unit length, the same for every network
        self.blank = np.full(self.embedding_dim, 1 / np.sqrt(self.embedding_dim), np.float32)

    # --- the trackers' interfaces ----------------------------------------------------------------------

    def get_features(self, xyxys: Any, img: np.ndarray) -> np.ndarray:
        """BoxMOT's interface: features (N, D) of boxes ``xyxys`` (N, >= 4: x1, y1, x2, y2 in pixels, further
        columns ignored) in the frame ``img`` (H, W, 3) uint8."""
        return self(img, xyxys)

    def predict(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """deep-sort-realtime's interface: one (D,) feature per crop (h, w, 3) uint8 cut from the frame."""
        return list(self.embed_crops(crops))

    def deepsort_embeds(self, frame: np.ndarray, detections: Sequence) -> list[np.ndarray]:
        """``embeds=`` for deep-sort-realtime's ``update_tracks(detections, embeds=...)``: one (D,) feature per
        detection ``([left, top, w, h], confidence, class)`` it keeps (w > 0 and h > 0), in its order."""
        kept = [det[0] for det in detections if det[0][2] > 0 and det[0][3] > 0]
        boxes = np.asarray(kept, dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return list(self(frame, boxes))

    # --- frames and crops ------------------------------------------------------------------------------

    def __call__(self, image: np.ndarray, boxes_xyxy: Any) -> np.ndarray:
        """Features (N, D) float32 of boxes (N, >= 4: x1, y1, x2, y2 in pixels) in ``image`` (H, W, 3) uint8."""
        frame = _check_image(image, "a frame", empty_ok=True)
        boxes = _as_boxes(boxes_xyxy)
        height, width = frame.shape[:2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        valid = np.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not valid.any():
            return self._embed(torch.empty(0), np.zeros((len(boxes), 5)), valid)
        # only the part of the frame the boxes cover becomes float, with the pixel bilinear sampling reads
        # past each edge: the same samples as over the whole frame
        x0, y0 = (max(0, int(np.floor(boxes[valid, i].min())) - 1) for i in (0, 1))
        x1, y1 = (min(n, int(np.ceil(boxes[valid, i].max())) + 1) for i, n in ((2, width), (3, height)))
        rois = np.zeros((len(boxes), 5))
        rois[:, 1:] = boxes - (x0, y0, x0, y0)
        return self._embed(self._planes(torch.from_numpy(frame[y0:y1, x0:x1])[None]), rois, valid)

    def embed_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Features (N, D) float32 of crops, each (h, w, 3) uint8 of its own size (an empty one gets ``blank``)."""
        crops = [_check_image(c, "a crop", empty_ok=True) for c in crops]
        out = np.empty((len(crops), self.embedding_dim), np.float32)
        for start in range(0, len(crops), self.batch_size):
            chunk = crops[start:start + self.batch_size]
            # one canvas per batch; each crop at its top left, with a copy of its last row and column beside it
            # so that bilinear sampling at its edge reads the crop, not the padding
            canvas = np.zeros((len(chunk), max(c.shape[0] for c in chunk) + 1, max(c.shape[1] for c in chunk) + 1,
                               3), np.uint8)
            rois = np.zeros((len(chunk), 5))
            for i, crop in enumerate(chunk):
                h, w = crop.shape[:2]
                if h and w:
                    canvas[i, :h, :w] = crop
                    canvas[i, h, :w] = crop[-1]
                    canvas[i, :h + 1, w] = canvas[i, :h + 1, w - 1]
                rois[i] = (i, 0, 0, w, h)
            valid = (rois[:, 3] > 0) & (rois[:, 4] > 0)
            out[start:start + len(chunk)] = self._embed(self._planes(torch.from_numpy(canvas)), rois, valid)
        return out

    # --- the batched path --------------------------------------------------------------------------------

    def _planes(self, pixels: torch.Tensor) -> torch.Tensor:
        """(K, H, W, 3) uint8 -> (K, 3, H, W) float32 8-bit values in RGB order where crops are made, in one pass
        (uint8 travels to a GPU: a quarter of the bytes)."""
        pixels = pixels.to(self._where, non_blocking=True)
        planes = torch.empty(pixels.shape[0], 3, *pixels.shape[1:3], device=self._where)
        for out_channel, channel in enumerate((2, 1, 0) if self.bgr else (0, 1, 2)):
            planes[:, out_channel].copy_(pixels[..., channel])
        return planes

    def _embed(self, planes: torch.Tensor, rois: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Features (N, D) of the boxes ``rois`` (N, 5: image index, x1, y1, x2, y2) of ``planes``, ``batch_size``
        at a time; rows not ``valid`` (no pixel to look at) get ``blank``."""
        out = np.empty((len(rois), self.embedding_dim), np.float32)
        out[~valid] = self.blank
        index = np.flatnonzero(valid)
        rois = torch.as_tensor(rois[index], dtype=torch.float32).to(self._where)
        for start in range(0, len(index), self.batch_size):
            part = slice(start, start + self.batch_size)
            crops = roi_align(planes, rois[part], self.input_shape, spatial_scale=1.0, sampling_ratio=SAMPLES,
                              aligned=True)  # (n, 3, H, W): box corners on pixel edges, samples at pixel centres
            out[index[part]] = self.runtime(crops.mul_(self._scale).add_(self._shift)).numpy()
        bad = ~np.isfinite(out).all(1) | (np.linalg.norm(out, axis=1) < 0.5)
        if bad.any():  # a network that gives a zero or non-finite feature: BoxMOT would divide by zero
            logger.warning("%d of %d features were zero or not finite; replaced by the blank feature",
                           int(bad.sum()), len(out))
            out[bad] = self.blank
        return out

    def __repr__(self) -> str:
        return (f"TrackerEmbedder({self.runtime.checkpoint or type(self.runtime.model).__name__}, "
                f"backend={self.backend}, device={self.device}, input {self.input_shape[0]}x{self.input_shape[1]}, "
                f"{self.embedding_dim}-d, batch_size={self.batch_size}, {'BGR' if self.bgr else 'RGB'})")

"""Synthetic occlusion of test images, to check the paper's claim (Section 1, Fig. 1) on any model and data.

At rate r, a fraction r of each image is hidden, in one of the two ways the paper names: an occluder
(a rectangle of r x the image area, of random shape and colour, anywhere in the person's box; half of the
images), or a truncated box (the top or the bottom r of the rows cut off and the rest stretched back
to full height, as a detector box that misses part of the person; a quarter each). The choice and
the geometry depend only on (seed, rate, image index), so every run and every model sees the same
occlusions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from cgpn.data.datasets.base import Sample
from cgpn.data.loader import ImageDataset, read_image
from cgpn.errors import ConfigError

__all__ = ["OCCLUSION_KINDS", "OccludedImages", "occlude", "occlusion_rng", "parse_rates"]

OCCLUSION_KINDS = ("rectangle", "top", "bottom")  # drawn with probabilities 1/2, 1/4, 1/4


def occlusion_rng(rate: float, index: int, seed: int = 0) -> np.random.Generator:
    """The random generator of image ``index`` at ``rate``: the same numbers in every run."""
    return np.random.default_rng([seed, round(rate * 1_000_000), index])


def occlude(image: Image.Image, rate: float, rng: np.random.Generator, kind: str | None = None) -> Image.Image:
    """Hide a fraction ``rate`` of ``image`` by an occluder rectangle or by top / bottom truncation.

    Args:
        image: RGB image.
        rate: fraction of the area (rectangle) or of the rows (truncation) hidden, in [0, 1).
        rng: where the kind, shape, place and colour come from (see ``occlusion_rng``).
        kind: one of ``OCCLUSION_KINDS``; drawn from ``rng`` when None.
    Returns:
        A new image of the same size (``image`` itself when ``rate`` is 0).
    """
    if not 0 <= rate < 1:
        raise ConfigError(f"occlusion rate must be in [0, 1), got {rate}")
    drawn = OCCLUSION_KINDS[rng.choice(3, p=[0.5, 0.25, 0.25])]
    kind = kind or drawn
    if kind not in OCCLUSION_KINDS:
        raise ConfigError(f"occlusion kind must be one of {', '.join(OCCLUSION_KINDS)}, got '{kind}'")
    if rate == 0:
        return image
    w, h = image.size
    if kind == "rectangle":
        # Any shape from a full-width band (height r*h) to a full-height bar (width r*w), same area.
        rh = max(1, round(rng.uniform(rate * h, h)))
        rw = min(w, max(1, round(rate * w * h / rh)))
        x0, y0 = int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1))
        pixels = np.array(image)
        colour = rng.integers(0, 256, size=3)
        patch = colour + rng.normal(0, 12, size=(rh, rw, 3))
        pixels[y0:y0 + rh, x0:x0 + rw] = patch.clip(0, 255).astype(np.uint8)
        return Image.fromarray(pixels)
    cut = min(h - 1, max(1, round(rate * h)))  # at least one row is left to stretch
    box = (0, cut, w, h) if kind == "top" else (0, 0, w, h - cut)
    return image.crop(box).resize((w, h), Image.BILINEAR)


def parse_rates(text: str) -> list[float]:
    """``"0.1,0.2,0.3"`` -> [0.1, 0.2, 0.3] (each in [0, 1)), or a ConfigError naming the bad item."""
    rates = []
    for item in text.split(","):
        try:
            rate = float(item)
        except ValueError:
            raise ConfigError(f"--occlude expects comma-separated fractions like 0.1,0.2,0.3, got '{item}'") from None
        if not 0 <= rate < 1:
            raise ConfigError(f"--occlude rates must be in [0, 1) (fraction of the image hidden), got {rate}")
        rates.append(rate)
    return rates


class OccludedImages(ImageDataset):
    """``ImageDataset`` whose images are occluded at ``rate``, deterministically per index."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, rate: float, seed: int = 0) -> None:
        super().__init__(samples, transform)
        self.rate, self.seed = rate, seed

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        sample = self.samples[index]
        image = occlude(read_image(sample.path), self.rate, occlusion_rng(self.rate, index, self.seed))
        return self.transform(image), sample.pid, sample.camid, index

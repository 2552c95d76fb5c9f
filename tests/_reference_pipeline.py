"""The test-time pipeline written out in the tests, to check cgpn's against: images resized and normalised
by hand, the network in eval mode averaged with the mirrored image (Section 4.2), and fast-reid's Python
evaluator (``fastreid_ref.load_rank``) for CMC and per-query AP. Nothing here calls cgpn's own
preprocessing, feature extraction or ranking code; nothing here is part of cgpn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastreid_ref import load_rank

# ImageNet statistics as published with torchvision's pretrained models
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def manual_input(image: str | Path | Image.Image, height: int, width: int) -> torch.Tensor:
    """(3, height, width) from an image file or a PIL image: PIL bilinear resize, scale to [0, 1], ImageNet
    mean / std."""
    img = image if isinstance(image, Image.Image) else Image.open(image)
    img = img.convert("RGB").resize((width, height), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


@torch.no_grad()
def manual_features(model: torch.nn.Module, images: Sequence[str | Path | Image.Image], height: int, width: int,
                    batch: int = 64) -> torch.Tensor:
    """(N, D) test features of image files or PIL images: mean of the network's output for the image and its
    mirror, L2-normalised."""
    model.eval()
    out = []
    for start in range(0, len(images), batch):
        x = torch.stack([manual_input(p, height, width) for p in images[start:start + batch]])
        f = (model(x) + model(x.flip(3))) / 2
        out.append(f / f.norm(dim=1, keepdim=True))
    return torch.cat(out)


def labels(samples: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(pids, camids) of a list of samples (anything with ``pid`` and ``camid``)."""
    return np.array([s.pid for s in samples]), np.array([s.camid for s in samples])


def fastreid_ranking(qf: torch.Tensor, gf: torch.Tensor, query: Sequence, gallery: Sequence,
                     max_rank: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CMC (max_rank,), AP and INP per query (NaN where no valid match)) by fast-reid's ``eval_market1501``,
    on the Euclidean distances between the (unit-length) features of the ``query`` and ``gallery`` samples."""
    (q_pids, q_cams), (g_pids, g_cams) = labels(query), labels(gallery)
    distmat = torch.cdist(qf.double(), gf.double()).numpy()
    cmc, ap, inp = load_rank().eval_market1501(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)
    valid = np.flatnonzero([((g_pids == p) & (g_cams != c)).any() for p, c in zip(q_pids, q_cams)])
    per_query = np.full((2, len(q_pids)), np.nan)
    per_query[:, valid] = ap, inp  # fast-reid lists the values of the valid queries, in order
    return np.asarray(cmc), per_query[0], per_query[1]

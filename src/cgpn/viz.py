"""Pictures: ranked lists in the layout of the paper's Fig. 5.

Each row is a query followed by its top-k gallery images, nearest first; a true match is framed green,
a wrong one red, and every tile carries its rank and distance. Gallery images excluded by the protocol
(same identity and camera as the query, junk) are left out of the list, as in evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cgpn.data.datasets.base import Sample
from cgpn.data.loader import read_image

__all__ = ["draw_ranked_lists", "ranked_gallery"]

GREEN, RED, GREY = (20, 170, 40), (210, 30, 30), (90, 90, 90)


def ranked_gallery(distances: np.ndarray, query: Sample, gallery: Sequence[Sample], topk: int) -> list[int]:
    """Indices of the ``topk`` nearest gallery items the protocol keeps for ``query`` (stable on ties)."""
    order = np.argsort(distances, kind="stable")
    keep = [i for i in order if gallery[i].pid != -1
            and not (gallery[i].pid == query.pid and gallery[i].camid == query.camid)]
    return keep[:topk]


def _tile(sample: Sample, size: tuple[int, int], frame: tuple[int, int, int], caption: str,
          font: ImageFont.ImageFont, border: int = 4) -> Image.Image:
    w, h = size
    tile = Image.new("RGB", (w, h + 16), "white")
    tile.paste(frame, (0, 0, w, h))
    tile.paste(read_image(sample.path).resize((w - 2 * border, h - 2 * border)), (border, border))
    ImageDraw.Draw(tile).text((2, h + 2), caption, fill=(0, 0, 0), font=font)
    return tile


def draw_ranked_lists(distmat: np.ndarray, query: Sequence[Sample], gallery: Sequence[Sample],
                      query_indices: Sequence[int], out: str | Path, topk: int = 10,
                      tile_size: tuple[int, int] = (64, 128)) -> Path:
    """Draw one row per query in ``query_indices`` and save the picture (PNG) to ``out``.

    Args:
        distmat: (num_query, num_gallery) distances.
        query, gallery: the samples the rows and columns of ``distmat`` stand for.
        query_indices: which queries to draw, top to bottom.
        topk: gallery images per row.
        tile_size: (width, height) of each image in pixels.
    """
    font = ImageFont.load_default()
    w, h = tile_size
    gap, label_w = 12, 0
    canvas = Image.new("RGB", (w + gap + topk * (w + 4), len(query_indices) * (h + 16 + 6) + 4), "white")
    for row, qi in enumerate(query_indices):
        y = 4 + row * (h + 22)
        q = query[qi]
        canvas.paste(_tile(q, tile_size, GREY, f"query {q.pid}", font), (label_w, y))
        for col, gi in enumerate(ranked_gallery(np.asarray(distmat[qi]), q, gallery, topk)):
            g = gallery[gi]
            frame = GREEN if g.pid == q.pid else RED
            tile = _tile(g, tile_size, frame, f"{col + 1}: {float(distmat[qi][gi]):.2f}", font)
            canvas.paste(tile, (w + gap + col * (w + 4), y))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out

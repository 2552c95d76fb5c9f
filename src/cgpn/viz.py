"""Pictures: ranked lists in the layout of the paper's Fig. 5, and Rank-1 / mAP against occlusion.

Each row of a ranked list is a query (blue frame) followed by its top-k gallery images, nearest first;
a true match is framed green, a wrong one red, and every tile carries its rank and distance. Gallery
images excluded by the protocol (same identity and camera as the query, junk) are left out of the
list, as in evaluation. A header line says what the colours mean, so the picture reads on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cgpn.data.datasets.base import Sample
from cgpn.data.loader import read_image
from cgpn.files import atomic_path

__all__ = ["BLUE", "GREEN", "RED", "draw_ranked_lists", "plot_occlusion", "ranked_gallery"]

GREEN, RED, BLUE = (20, 170, 40), (210, 30, 30), (30, 90, 210)  # true match, wrong match, query
BORDER = 4  # frame width in pixels
GAP = 16  # space between the query and its list


def ranked_gallery(distances: np.ndarray, query: Sample, gallery: Sequence[Sample], topk: int) -> list[int]:
    """Indices of the ``topk`` nearest gallery items the protocol keeps for ``query`` (stable on ties)."""
    order = np.argsort(distances, kind="stable")
    keep = [i for i in order if gallery[i].pid != -1
            and not (gallery[i].pid == query.pid and gallery[i].camid == query.camid)]
    return keep[:topk]


def _tile(sample: Sample, size: tuple[int, int], frame: tuple[int, int, int], lines: Sequence[str],
          font: ImageFont.FreeTypeFont) -> Image.Image:
    """The image inside a coloured frame, with up to two caption lines under it."""
    w, h = size
    line_h = font.size + 3
    tile = Image.new("RGB", (w, h + 2 * line_h + 2), "white")
    tile.paste(frame, (0, 0, w, h))
    tile.paste(read_image(sample.path).resize((w - 2 * BORDER, h - 2 * BORDER), Image.BILINEAR), (BORDER, BORDER))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(lines[:2]):
        draw.text((1, h + 1 + i * line_h), line, fill=(0, 0, 0), font=font)
    return tile


def draw_ranked_lists(distmat: np.ndarray, query: Sequence[Sample], gallery: Sequence[Sample],
                      query_indices: Sequence[int], out: str | Path, topk: int = 10,
                      tile_size: tuple[int, int] = (64, 128), ap: Sequence[float] | None = None,
                      title: str = "") -> Path:
    """Draw one row per query in ``query_indices`` and save the picture (PNG) to ``out``.

    Args:
        distmat: (num_query, num_gallery) distances.
        query, gallery: the samples the rows and columns of ``distmat`` stand for.
        query_indices: which queries to draw, top to bottom.
        topk: gallery images per row (fewer when the protocol leaves fewer).
        tile_size: (width, height) of each image in pixels.
        ap: (num_query,) average precision per query, printed under the query when given.
        title: first header line (e.g. the model and its Rank-1 / mAP).
    """
    w, h = tile_size
    font = ImageFont.load_default(size=max(10, min(14, w // 5)))
    small = ImageFont.load_default(size=max(9, min(12, w // 6)))
    line_h = font.size + 3
    tile_h = h + 2 * (small.size + 3) + 2  # what _tile makes
    header = [title] if title else []
    header.append(f"query (blue), then its top {topk} gallery images, nearest first: green = same identity, "
                  f"red = another; under each: rank and distance")
    head_h = 6 + len(header) * (line_h + 2)
    width = max(w + GAP + topk * (w + 4), 10 + max(int(font.getlength(t)) for t in header))
    canvas = Image.new("RGB", (width, head_h + len(query_indices) * (tile_h + 8) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(header):
        draw.text((4, 4 + i * (line_h + 2)), text, fill=(0, 0, 0), font=font)
    for row, qi in enumerate(query_indices):
        y = head_h + row * (tile_h + 8)
        q = query[qi]
        q_lines = [f"id {q.pid} cam {q.camid + 1}"]
        if ap is not None and np.isfinite(ap[qi]):
            q_lines.append(f"AP {ap[qi]:.2f}")
        canvas.paste(_tile(q, tile_size, BLUE, q_lines, small), (0, y))
        for col, gi in enumerate(ranked_gallery(np.asarray(distmat[qi]), q, gallery, topk)):
            g = gallery[gi]
            frame = GREEN if g.pid == q.pid else RED
            lines = [f"{col + 1}: {float(distmat[qi][gi]):.2f}", f"id {g.pid}"]
            canvas.paste(_tile(g, tile_size, frame, lines, small), (w + GAP + col * (w + 4), y))
    out = Path(out)
    with atomic_path(out) as tmp:
        canvas.save(tmp)
    return out


def plot_occlusion(results: Mapping[float, object], out: str | Path, title: str = "") -> Path:
    """Rank-1 and mAP (%) against the occluded fraction of the query images, saved as a PNG.

    Args:
        results: rate -> ``RankResult`` (anything with ``rank(k)`` and ``mAP``), as ``evaluate_occlusion`` returns.
        out: PNG file to write.
        title: plot title (e.g. the checkpoint).
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend stays as it is

    rates = sorted(results)
    x = [100 * r for r in rates]
    fig = Figure(figsize=(5, 3.6), dpi=120)
    ax = fig.subplots()
    ax.plot(x, [100 * results[r].rank(1) for r in rates], "o-", label="Rank-1")
    ax.plot(x, [100 * results[r].mAP for r in rates], "s--", label="mAP")
    ax.set_xlabel("query area hidden (%)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Rank-1 / mAP under synthetic occlusion", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    return out

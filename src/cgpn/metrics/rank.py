"""CMC, mAP and mINP under the single-query re-ID protocol (SPEC, "Evaluation protocol").

For each query, gallery images of the same identity *and* camera are removed, as are junk images
(pid -1). A query left with no true match is skipped and counted. CMC@k is the fraction of valid
queries whose first true match ranks within k; AP is non-interpolated (mean precision at each true
match); mINP is the mean of (number of true matches / rank of the last one). Ties in distance are
broken by gallery index (a stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RankResult", "evaluate", "pairwise_distance"]


@dataclass
class RankResult:
    """Metrics of one evaluation, with per-query details to find the worst queries.

    Attributes:
        cmc: (max_rank,) CMC curve over valid queries; ``cmc[0]`` is Rank-1.
        mAP, mINP: means over valid queries.
        num_valid, num_skipped: queries with and without a true match left after filtering.
        ap: (num_query,) average precision of each query (NaN where skipped).
        first_match: (num_query,) 0-based rank of the first true match (-1 where skipped).
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_skipped: int
    ap: np.ndarray
    first_match: np.ndarray

    def rank(self, k: int) -> float:
        """CMC at rank k (1-based)."""
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def summary(self) -> str:
        return (f"Rank-1 {100 * self.rank(1):.1f}  Rank-5 {100 * self.rank(5):.1f}  "
                f"Rank-10 {100 * self.rank(10):.1f}  mAP {100 * self.mAP:.1f}  mINP {100 * self.mINP:.1f}"
                + (f"  ({self.num_skipped} queries without a match skipped)" if self.num_skipped else ""))


def _numpy(x: object) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, block: int = 512) -> RankResult:
    """Rank every gallery item for every query and compute CMC / mAP / mINP.

    Args:
        distmat: (num_query, num_gallery) distances, smaller is closer (NumPy or torch).
        q_pids, g_pids, q_camids, g_camids: identities and cameras (1-D).
        max_rank: length of the CMC curve.
        block: queries ranked at once (bounds memory).
    """
    distmat = _numpy(distmat)
    q_pids, g_pids, q_camids, g_camids = (_numpy(a).astype(np.int64) for a in (q_pids, g_pids, q_camids, g_camids))
    num_q, num_g = distmat.shape
    if (len(q_pids), len(g_pids)) != (num_q, num_g) or len(q_camids) != num_q or len(g_camids) != num_g:
        raise ValueError(f"distmat is {num_q} x {num_g} but got {len(q_pids)} query and {len(g_pids)} gallery pids")
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    first = np.full(num_q, -1, dtype=np.int64)
    hits = np.zeros((num_q, max_rank), dtype=bool)
    for s in range(0, num_q, block):
        e = min(s + block, num_q)
        order = np.argsort(distmat[s:e], axis=1, kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        valid = (pids != -1) & ~((pids == q_pids[s:e, None]) & (cams == q_camids[s:e, None]))
        match = (pids == q_pids[s:e, None]) & valid
        rank_in_valid = np.cumsum(valid, axis=1) - 1  # position in the filtered list
        for i in range(e - s):
            pos = rank_in_valid[i][match[i]]
            if len(pos) == 0:
                continue
            q = s + i
            ap[q] = np.mean(np.arange(1, len(pos) + 1) / (pos + 1))
            inp[q] = len(pos) / (pos[-1] + 1)
            first[q] = pos[0]
            hits[q, pos[0] :] = True
    valid_q = first >= 0
    num_valid = int(valid_q.sum())
    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery (check the query/gallery identities)")
    return RankResult(cmc=hits[valid_q].mean(0), mAP=float(np.nanmean(ap)), mINP=float(np.nanmean(inp)),
                      num_valid=num_valid, num_skipped=num_q - num_valid, ap=ap, first_match=first)


def pairwise_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """(num_query, num_gallery) distances: Euclidean between L2-normalised features (``cosine``, SPEC 8)
    or between raw ones (``euclidean``)."""
    if metric == "cosine":
        qf, gf = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    elif metric != "euclidean":
        raise ValueError(f"metric must be cosine or euclidean, got {metric!r}")
    d2 = (qf * qf).sum(1, keepdim=True) + (gf * gf).sum(1)[None] - 2 * qf @ gf.T
    return d2.clamp_min(0).sqrt()

"""CMC, mAP and mINP under the single-query re-ID protocol (SPEC, "Evaluation protocol"), exact and fast.

Protocol: for each query, gallery images of the same identity *and* camera are removed, and so are junk
images (pid -1); distractors (pid 0) stay. A query left with no true match is skipped and counted.
CMC@k is the fraction of valid queries whose first true match ranks within k; AP is the non-interpolated
mean of the precision at each true match (``ap_mode="standard"``) or the official Market-1501 trapezoid
rule (``ap_mode="market"``); mINP is the mean of (number of true matches / rank of the last one).

Tie rule: gallery items are ordered by distance, and items at exactly the same distance by gallery index
(the order a stable sort gives). On tie-free inputs this is the order of any sort, so the numbers equal
fast-reid's and torchreid's evaluators.

How it is fast: AP, CMC and INP only need the rank of each true match among the valid gallery items,
i.e. how many items lie before each match. On the CPU each query row keeps only the items up to its
farthest true match (one comparison per item; for a trained network a few dozen survive), which NumPy
sorts; on a GPU the whole block of rows is sorted by value. The match distances are then located with a
binary search, and the same-identity items that precede a match (other matches, same-camera images) are
subtracted. No index sort of whole rows is done; memory is bounded by the block of queries. A CUDA
distance matrix stays on the GPU.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cgpn.config import CHOICES
from cgpn.errors import ConfigError, DatasetError

__all__ = ["AP_MODES", "METRICS", "RankResult", "evaluate", "evaluate_features", "pairwise_distance"]

AP_MODES = CHOICES["test.ap_mode"]  # non-interpolated AP | official Market-1501 trapezoid AP (SPEC)
METRICS = CHOICES["test.distance"]  # Euclidean between L2-normalised features (SPEC 8) | raw Euclidean
_TIE_CHUNK = 1 << 22  # elements scanned at once when resolving exact ties


@dataclass
class RankResult:
    """Metrics of one evaluation, with per-query details to find the worst queries.

    Attributes:
        cmc: (max_rank,) CMC curve over valid queries; ``cmc[0]`` is Rank-1.
        mAP, mINP: means over valid queries.
        num_valid, num_skipped: queries with and without a true match left after filtering.
        ap: (num_query,) average precision of each query (NaN where skipped).
        first_match: (num_query,) 0-based rank of the first true match among the valid gallery items
            (-1 where skipped).
        inp: (num_query,) inverse negative penalty of each query (NaN where skipped).
        ap_mode: ``standard`` or ``market`` (see ``AP_MODES``).
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_skipped: int
    ap: np.ndarray
    first_match: np.ndarray
    inp: np.ndarray
    ap_mode: str = "standard"

    def rank(self, k: int) -> float:
        """CMC at rank k (1-based; past the end of the curve, its last value)."""
        if k < 1:
            raise ConfigError(f"ranks count from 1, got rank {k}")
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def summary(self) -> str:
        """One line: Rank-1/5/10, mAP, mINP in percent, and the skipped queries if any."""
        name = "mAP" if self.ap_mode == "standard" else "mAP(market)"
        return (f"Rank-1 {100 * self.rank(1):.1f}  Rank-5 {100 * self.rank(5):.1f}  "
                f"Rank-10 {100 * self.rank(10):.1f}  {name} {100 * self.mAP:.1f}  mINP {100 * self.mINP:.1f}"
                + (f"  ({self.num_skipped} queries without a match skipped)" if self.num_skipped else ""))


# --- inputs ------------------------------------------------------------------------------------------


def _tensor(x: object, device: torch.device | None = None) -> torch.Tensor:
    """A torch view of a NumPy array or tensor (no copy where possible), detached, on ``device``."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t if device is None else t.to(device)


def _float(t: torch.Tensor) -> torch.Tensor:
    """Distances as float32/float64 (half precision widened exactly, integers as float64)."""
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.to(torch.float64 if not t.is_floating_point() else torch.float32)


def _features(qf: object, gf: object, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery features as (num, dim) matrices of one float dtype, at least float32 (half
    precision would round the distances), on ``qf``'s device, L2-normalised for ``cosine``."""
    qf = _tensor(qf)
    gf = _tensor(gf, qf.device)
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise DatasetError(f"features must be (num, dim) matrices of the same dim, got query {tuple(qf.shape)} "
                           f"and gallery {tuple(gf.shape)}")
    dtype = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32
    qf, gf = qf.to(dtype), gf.to(dtype)
    for name, x in (("query", qf), ("gallery", gf)):
        if not bool(torch.isfinite(x).all()):
            raise DatasetError(f"{name} features contain NaN or infinite values (a diverged network or a "
                               f"corrupt features file)")
    return _prepare(qf, metric), _prepare(gf, metric)


def _labels(name: str, x: object, size: int, what: str, device: torch.device) -> torch.Tensor:
    t = _tensor(x, device).reshape(-1)
    if t.is_floating_point() or t.dtype == torch.bool or t.numel() != size:
        raise DatasetError(f"{name} must hold one integer per {what} ({size}, e.g. np.array([1, 1, 7])), "
                           f"got {t.numel()} values of type {t.dtype}")
    return t.to(torch.int64)


def _check_settings(max_rank: int, ap_mode: str) -> None:
    if ap_mode not in AP_MODES:
        raise ConfigError(f"test.ap_mode must be one of {', '.join(AP_MODES)} (e.g. standard), got {ap_mode!r}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral) or max_rank < 1:  # np.int64 too
        raise ConfigError(f"test.max_rank must be a positive integer (e.g. 50), got {max_rank!r}")


# --- the gallery side ----------------------------------------------------------------------------------


class _Gallery:
    """Gallery identities grouped by pid, so that each query finds its same-identity items directly."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor):
        keep = g_pids != -1  # junk is removed for every query (SPEC)
        self.keep = None if bool(keep.all()) else keep.nonzero().squeeze(1)
        pids, self.cams = (g_pids, g_camids) if self.keep is None else (g_pids[keep], g_camids[keep])
        self.size = pids.numel()
        if self.size == 0:
            raise DatasetError("the gallery has no image with a valid pid (all are junk, pid -1, or it is empty)")
        self.order = torch.sort(pids, stable=True).indices  # by pid, gallery order within a pid
        self.uniq, self.counts = torch.unique_consecutive(pids[self.order], return_counts=True)
        self.starts = self.counts.cumsum(0) - self.counts

    def same_identity(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) gallery columns (after junk removal, ascending) holding each query's identity, and their mask."""
        slot = torch.searchsorted(self.uniq, q_pids).clamp_(max=self.uniq.numel() - 1)
        count = torch.where(self.uniq[slot] == q_pids, self.counts[slot], 0)
        k = torch.arange(max(int(count.max()), 1), device=q_pids.device)
        mask = k < count[:, None]
        cols = self.order[(self.starts[slot][:, None] + k).clamp_(max=self.size - 1)]
        return cols, mask


# --- one block of queries ----------------------------------------------------------------------------


def _sorts_whole_rows(device: torch.device) -> bool:
    """Whether rows are sorted whole (GPUs) rather than cut at their farthest match first (CPU)."""
    return device.type != "cpu"


def _count_before(d: torch.Tensor, m: torch.Tensor, m_col: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(B, K) number of items of each row of ``d`` that rank before the row's match t (distance ``m_t``,
    column ``m_col_t``, ascending for t < n; entries past ``n`` are left 0): closer, or as close with a
    lower column (the tie rule).

    On the CPU each row keeps only the items up to its farthest match (usually a few dozen for a trained
    network), which NumPy sorts; on a GPU the whole block is sorted by value.
    """
    if not _sorts_whole_rows(d.device):
        dn, mn, cn, nn = d.numpy(), m.numpy(), m_col.numpy(), n.numpy()
        before = np.zeros(mn.shape, dtype=np.int64)
        for i in np.flatnonzero(nn):
            row, mi = dn[i], mn[i, : nn[i]]
            keep = np.flatnonzero(row <= mi[-1])  # NaN never passes: it ranks last
            vals = row[keep]
            srt = np.sort(vals)
            lo = np.searchsorted(srt, mi)
            for k in np.flatnonzero(np.searchsorted(srt, mi, side="right") - lo > 1):  # exact ties
                lo[k] += np.count_nonzero(vals[: np.searchsorted(keep, cn[i, k])] == mi[k])
            before[i, : nn[i]] = lo
        return torch.from_numpy(before)
    srt = torch.sort(d, dim=1).values
    before = torch.searchsorted(srt, m)
    tie = (torch.arange(m.shape[1], device=d.device) < n[:, None]) & (
        torch.searchsorted(srt, m, right=True) - before > 1)
    rows, ks = tie.nonzero(as_tuple=True)  # rare: scan those rows for equal distances at lower columns
    step = max(1, _TIE_CHUNK // d.shape[1])
    ar = torch.arange(d.shape[1], device=d.device)
    for s in range(0, rows.numel(), step):
        r, k = rows[s : s + step], ks[s : s + step]
        before[r, k] += ((d[r] == m[r, k, None]) & (ar < m_col[r, k, None])).sum(1)
    return before


def _rank_block(d: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor,
                gallery: _Gallery) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of each query's true matches among its valid gallery items.

    Args:
        d: (B, G) distances to the junk-free gallery.
        q_pids, q_camids: (B,) identities and cameras of the queries.
    Returns:
        (B, K) ranks in ascending order (-1 past each query's match count) and (B,) match counts.
    """
    cols, same = gallery.same_identity(q_pids)  # (B, K) same-identity items of each query, cols ascending
    s_val = d.gather(1, cols)
    match = same & (gallery.cams[cols] != q_camids[:, None])
    n = match.sum(1)

    def stable_first(flag: torch.Tensor) -> torch.Tensor:  # permutation putting True first, order kept
        return torch.sort((~flag).to(torch.uint8), dim=1, stable=True).indices

    # same-identity items in (distance, gallery index) order, padding last; then the matches among them:
    # the position of match t in that order is the number of same-identity items that precede it
    order = torch.sort(s_val, dim=1, stable=True).indices
    order = order.gather(1, stable_first(same.gather(1, order)))
    same_before = stable_first(match.gather(1, order))  # (B, K)
    pick = order.gather(1, same_before)
    m, m_col = s_val.gather(1, pick), cols.gather(1, pick)  # match t of each query, in ranking order
    t = torch.arange(m.shape[1], device=d.device)
    valid_t = t < n[:, None]

    # all items before match t, less the same-identity ones, plus the t matches before it
    before = _count_before(d, m, m_col, n)
    return torch.where(valid_t, before - same_before + t, -1), n


def _query_metrics(pos: torch.Tensor, n: torch.Tensor, ap_mode: str) -> tuple[torch.Tensor, ...]:
    """(AP, INP, first-match rank) of each query of a block from its match ranks; NaN/-1 where n == 0."""
    t = torch.arange(pos.shape[1], device=pos.device, dtype=torch.float64)
    valid_t = pos >= 0
    r = pos.to(torch.float64)
    precision = (t + 1) / (r + 1)  # precision at each true match
    if ap_mode == "market":  # trapezoid between the precision before and at each match (compute_AP.m)
        precision = (precision + torch.where(r > 0, t / r.clamp(min=1), 1.0)) / 2
    nf = n.to(torch.float64)
    ap = torch.where(valid_t, precision, 0.0).sum(1) / nf
    last = pos.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
    inp = nf / (last.to(torch.float64) + 1)
    valid = n > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=pos.device)
    return torch.where(valid, ap, nan), torch.where(valid, inp, nan), torch.where(valid, pos[:, 0], -1)


# --- drivers ------------------------------------------------------------------------------------------


def _evaluate_blocks(rows: Callable[[int, int], torch.Tensor], num_q: int, num_g: int, q_pids: object,
                     g_pids: object, q_camids: object, g_camids: object, device: torch.device, block: int,
                     max_rank: int, ap_mode: str) -> RankResult:
    """Shared loop of ``evaluate`` and ``evaluate_features``: ``rows(s, e)`` gives (e - s, num_g) distances."""
    q_pids = _labels("q_pids", q_pids, num_q, "query", device)
    q_camids = _labels("q_camids", q_camids, num_q, "query", device)
    gallery = _Gallery(_labels("g_pids", g_pids, num_g, "gallery item", device),
                       _labels("g_camids", g_camids, num_g, "gallery item", device))
    ap, inp = np.full(num_q, np.nan), np.full(num_q, np.nan)
    first = np.full(num_q, -1, dtype=np.int64)
    for s in range(0, num_q, block):
        e = min(s + block, num_q)
        d = rows(s, e)
        if gallery.keep is not None:
            d = d.index_select(1, gallery.keep)
        pos, n = _rank_block(d, q_pids[s:e], q_camids[s:e], gallery)
        a, i, f = (x.cpu().numpy() for x in _query_metrics(pos, n, ap_mode))
        ap[s:e], inp[s:e], first[s:e] = a, i, f
    valid = first >= 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise DatasetError(f"none of the {num_q} queries has a true match in the gallery (same pid, other "
                           "camera); check that query and gallery come from the same test split")
    max_rank = min(max_rank, gallery.size)
    cmc = np.cumsum(np.bincount(np.minimum(first[valid], max_rank), minlength=max_rank + 1)[:max_rank]) / num_valid
    return RankResult(cmc=cmc, mAP=float(np.nanmean(ap)), mINP=float(np.nanmean(inp)), num_valid=num_valid,
                      num_skipped=num_q - num_valid, ap=ap, first_match=first, inp=inp, ap_mode=ap_mode)


def _block_rows(memory_mb: float, row_bytes: int) -> int:
    """Queries per block so that the block's working buffers stay within ``memory_mb``."""
    if not memory_mb > 0:
        raise ConfigError(f"test.memory_mb must be a positive number of megabytes (e.g. 512), got {memory_mb!r}")
    rows = int(memory_mb * 2**20) // row_bytes
    if rows < 1:
        raise ConfigError(f"test.memory_mb={memory_mb} is too small for a gallery this size: one query needs "
                          f"{row_bytes / 2**20:.1f} MB (set e.g. test.memory_mb={int(row_bytes / 2**20) + 64})")
    return rows


def evaluate(distmat: object, q_pids: object, g_pids: object, q_camids: object, g_camids: object,
             max_rank: int = 50, ap_mode: str = "standard", memory_mb: float = 512) -> RankResult:
    """CMC / mAP / mINP of a distance matrix under the SPEC protocol (see the module docstring).

    Args:
        distmat: (num_query, num_gallery) distances, smaller is closer: NumPy array or torch tensor (a CUDA
            tensor is evaluated on its GPU).
        q_pids, g_pids, q_camids, g_camids: identities and cameras (1-D, NumPy or torch); gallery pid -1
            is junk and removed, pid 0 (distractors) stays.
        max_rank: length of the CMC curve (at most the junk-free gallery size).
        ap_mode: ``standard`` (non-interpolated AP, the default) or ``market`` (Market-1501 trapezoid AP).
        memory_mb: working memory of one block of queries (the matrix itself is not copied).
    Returns:
        A RankResult with the curve, the means and per-query AP / first-match rank / INP.

    Example:
        >>> r = evaluate(np.array([[0.1, 0.5]]), [1], [1, 2], [0], [1, 1])
        >>> r.rank(1), r.mAP
        (1.0, 1.0)
    """
    _check_settings(max_rank, ap_mode)
    d = _float(_tensor(distmat))
    if d.dim() != 2:
        raise DatasetError(f"distmat must be a (num_query, num_gallery) matrix, got shape {tuple(d.shape)}")
    if bool(torch.isnan(d).any()):  # NaN has no place in a ranking
        raise DatasetError("distmat contains NaN (features with NaN values, e.g. from a diverged network)")
    num_q, num_g = d.shape
    # a block's rows, a junk-free copy and sorted values, plus the sort's int64 indices on the GPU path
    per_row = (3 * d.element_size() + (8 if _sorts_whole_rows(d.device) else 0)) * num_g + 64
    block = _block_rows(memory_mb, per_row)
    return _evaluate_blocks(lambda s, e: d[s:e], num_q, num_g, q_pids, g_pids, q_camids, g_camids,
                            d.device, block, max_rank, ap_mode)


def _prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric not in METRICS:
        raise ConfigError(f"test.distance must be one of {', '.join(METRICS)} (e.g. cosine), got {metric!r}")
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def _distance(qf: torch.Tensor, gf: torch.Tensor, g_sq: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(len(qf), len(gf)) Euclidean distances, ``g_sq`` the squared norms of ``gf`` (into ``out`` if given)."""
    d2 = torch.addmm(g_sq[None], qf, gf.T, alpha=-2, out=out).add_((qf * qf).sum(1, keepdim=True))
    return d2.clamp_(min=0).sqrt_()


def pairwise_distance(qf: object, gf: object, metric: str = "cosine") -> torch.Tensor:
    """(num_query, num_gallery) distances: Euclidean between L2-normalised features (``cosine``, SPEC 8)
    or between raw ones (``euclidean``). NumPy or torch inputs; the result is on ``qf``'s device."""
    qf, gf = _features(qf, gf, metric)
    return _distance(qf, gf, (gf * gf).sum(1))


def evaluate_features(qf: object, gf: object, q_pids: object, g_pids: object, q_camids: object,
                      g_camids: object, metric: str = "cosine", max_rank: int = 50, ap_mode: str = "standard",
                      memory_mb: float = 512) -> RankResult:
    """``evaluate(pairwise_distance(qf, gf, metric), ...)`` without the whole distance matrix.

    Distances are computed for one block of queries at a time against the whole gallery, so memory stays
    within ``memory_mb`` beyond the features themselves and one normalised copy of them: galleries far
    larger than Market-1501 run on a GPU or, in blocks, on the CPU. Arguments as in ``evaluate``; ``qf`` (Q, D) and
    ``gf`` (G, D) are NumPy arrays or tensors, computed on ``qf``'s device.
    """
    _check_settings(max_rank, ap_mode)
    qf, gf = _features(qf, gf, metric)
    g_sq = (gf * gf).sum(1)
    block = max(1, min(qf.shape[0], _block_rows(memory_mb, 4 * gf.shape[0] * qf.element_size() + 64)))
    buffer = torch.empty(block * gf.shape[0], dtype=qf.dtype, device=qf.device)  # reused by every block

    def rows(s: int, e: int) -> torch.Tensor:
        return _distance(qf[s:e], gf, g_sq, out=buffer[: (e - s) * gf.shape[0]].view(e - s, gf.shape[0]))

    return _evaluate_blocks(rows, qf.shape[0], gf.shape[0], q_pids, g_pids, q_camids, g_camids, qf.device,
                            block, max_rank, ap_mode)

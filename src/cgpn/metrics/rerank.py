"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
CVPR 2017), exact and memory-bounded.

The re-ranked distance of the paper's reference code (as in fast-reid's ``evaluation/rerank.py``):
original distance d(i, j)^2 divided by the largest of row i over queries and gallery; the k1-reciprocal
neighbours R(i, k1) of every item, expanded by the R(c, k1/2) of its members that share more than 2/3 of
their items with R(i, k1); V(i, j) = exp(-d) normalised over that set; V averaged over the k2 nearest
neighbours (query expansion); Jaccard distance 1 - sum min(V_i, V_j) / sum max(V_i, V_j); final distance
(1 - lambda) * Jaccard + lambda * original.

Every step needs only the top-(k1 + 1) neighbours of each item, so instead of the dense (N, N) matrices
of the reference code (N = queries + gallery; about 9 GB at Market-1501 size) this computes distances in
symmetric tiles once, keeping each row's nearest ``W`` neighbours and its maximum; V is sparse, and the
Jaccard term of a query only touches gallery items that share a neighbour with it. Memory is the output,
a copy of the features and bounded working blocks; tiles run on the features' device (CUDA included).
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
import torch

from cgpn.errors import ConfigError, DatasetError
from cgpn.metrics.rank import _features

__all__ = ["rerank"]

def _check(k1: int, k2: int, lambda_value: float) -> None:
    for name, v in (("test.rerank_k1", k1), ("test.rerank_k2", k2)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:  # np.int64 too
            raise ConfigError(f"{name} must be a positive integer (e.g. 20 for k1, 6 for k2), got {v!r}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ConfigError(f"test.rerank_lambda must be within [0, 1] (e.g. 0.3), got {lambda_value!r}")


_GROUP = 8  # columns summarised by one minimum when screening a tile for new near neighbours


def _group_min(d: torch.Tensor, along_rows: bool) -> torch.Tensor:
    """Minimum of each run of ``_GROUP`` consecutive entries of every row of ``d`` (``along_rows``) or of
    every column: (lines, groups), the last group possibly shorter."""
    dim = 1 if along_rows else 0
    full = d.shape[dim] // _GROUP * _GROUP
    parts = []
    if full:
        parts.append(d[:, :full].unfold(1, _GROUP, _GROUP).amin(2) if along_rows
                     else d[:full].view(-1, _GROUP, d.shape[1]).amin(1).T)
    if full < d.shape[dim]:
        parts.append((d[:, full:] if along_rows else d[full:].T).amin(1, keepdim=True))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _neighbours(f: torch.Tensor, num_query: int, width: int, tile: int):
    """One pass over all pairs of items in symmetric tiles.

    Diagonal tiles come first and give every item a provisional nearest list by a plain top-k; each
    other tile is computed once and serves its rows and (transposed) its columns, screened by the minimum
    of each run of ``_GROUP`` entries against the line's current width-th best, so only the few closer
    items are extracted.

    Returns:
        (N, width) squared distances of each item's nearest items and (N, width) their indices, both in
        ascending order; (N,) the largest squared distance of each row; (Q, G) squared query-gallery
        distances (the item itself is at distance 0).
    """
    n = f.shape[0]
    sq = (f * f).sum(1)
    best_v = torch.full((n, width), float("inf"), device=f.device)
    best_i = torch.zeros((n, width), dtype=torch.int64, device=f.device)
    row_max = torch.zeros(n, device=f.device)
    qg = torch.empty((num_query, n - num_query), device=f.device)
    group = torch.arange(_GROUP, device=f.device)

    def fold(lines: torch.Tensor | slice, v: torch.Tensor, i: torch.Tensor) -> None:
        v, j = torch.topk(torch.cat([best_v[lines], v], 1), width, dim=1, largest=False, sorted=False)
        best_i[lines] = torch.cat([best_i[lines], i], 1).gather(1, j)
        best_v[lines] = v

    def screen(r0: int, d: torch.Tensor, c0: int, along_rows: bool) -> None:
        """Fold tile ``d`` into the lists of its rows (items r0..; entries are items c0..) or, if not
        ``along_rows``, of its columns."""
        lines, size = (d.shape[0], d.shape[1]) if along_rows else (d.shape[1], d.shape[0])
        rows = slice(r0, r0 + lines)
        torch.maximum(row_max[rows], d.amax(1 if along_rows else 0), out=row_max[rows])
        bound = best_v[rows].amax(1)
        r, g = (_group_min(d, along_rows) < bound[:, None]).nonzero(as_tuple=True)
        if r.numel() == 0:
            return
        cols = g[:, None] * _GROUP + group  # (k, _GROUP) entries of each group; the last may be short
        inside = cols < size
        cols.clamp_(max=size - 1)
        vals = d[r[:, None], cols] if along_rows else d[cols, r[:, None]]
        k, e = ((vals < bound[r, None]) & inside).nonzero(as_tuple=True)  # the closer items themselves
        line, col, val = r[k], cols[k, e], vals[k, e]  # line ascending
        uniq, count = torch.unique_consecutive(line, return_counts=True)
        slot = torch.arange(line.numel(), device=d.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
        at = torch.repeat_interleave(torch.arange(uniq.numel(), device=d.device), count)
        v = torch.full((uniq.numel(), int(count.max())), float("inf"), device=d.device)
        i = torch.zeros(v.shape, dtype=torch.int64, device=d.device)
        v[at, slot] = val
        i[at, slot] = col + c0
        fold(uniq + r0, v, i)

    buffer = torch.empty(min(tile, n) ** 2, device=f.device)  # reused: fresh large tensors cost page faults

    def distances(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        d = buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        torch.addmm(sq[None, c0:c1], f[r0:r1], f[c0:c1].T, alpha=-2, out=d).add_(sq[r0:r1, None])
        if r0 < num_query and c1 > num_query:  # query rows x gallery columns: the output's base
            g0 = max(c0, num_query)
            qg[r0 : min(r1, num_query), g0 - num_query : c1 - num_query] = d[: num_query - r0, g0 - c0 :]
        return d

    starts = range(0, n, tile)
    for r0 in starts:
        r1 = min(r0 + tile, n)
        d = distances(r0, r1, r0, r1).fill_diagonal_(0)
        row_max[r0:r1] = d.amax(1)
        v, i = torch.topk(d, min(width, r1 - r0), dim=1, largest=False, sorted=False)
        fold(slice(r0, r1), v, i + r0)
    for r0 in starts:
        for c0 in range(r0 + tile, n, tile):
            r1, c1 = min(r0 + tile, n), min(c0 + tile, n)
            d = distances(r0, r1, c0, c1)
            screen(r0, d, c0, True)
            screen(c0, d, r0, False)
    qg.clamp_(min=0)
    best_v, order = torch.sort(best_v.clamp_(min=0), dim=1)
    return best_v, best_i.gather(1, order), row_max, qg


def _reciprocal(rank: torch.Tensor, k: int, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows), k) mask of which of each row's first k neighbours have the row among their first k."""
    fwd = rank[rows, :k]
    return (rank[fwd, :k] == rows[:, None, None]).any(2)


def _expanded_sets(f: torch.Tensor, best_v: torch.Tensor, best_i: torch.Tensor, k1: int, block: int,
                   chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, squared distances) of the expanded k-reciprocal sets R*(i) of every item (unique cols).

    Distances come from each row's nearest list where the column is in it, else are computed directly.
    """
    n = best_i.shape[0]
    kh = min(int(np.around(k1 / 2.0)) + 1, n)  # the reference code's round-half-to-even k1/2
    k1 = min(k1 + 1, n)
    idx_sorted, perm = torch.sort(best_i, dim=1)  # for look-ups by column
    val_sorted = best_v.gather(1, perm)
    all_rows = torch.arange(n, device=f.device)
    half_ok = torch.cat([_reciprocal(best_i, kh, all_rows[s : s + block]) for s in range(0, n, block)])
    out_r, out_c, out_d, miss = [], [], [], []
    member = torch.zeros((min(block, n), n), dtype=torch.bool, device=f.device)  # R(i, k1) as bitmaps
    for s in range(0, n, block):
        rows = all_rows[s : s + block]
        line = torch.arange(rows.numel(), device=f.device)[:, None]
        cand, ok = best_i[rows, :k1], _reciprocal(best_i, k1, rows)  # R(i, k1): (b, k1), valid where ok
        c_set, c_ok = best_i[cand, :kh], half_ok[cand] & ok[:, :, None]  # R(c, k1/2) of each member c
        member[line, cand] = ok
        inside = member[line[:, :, None], c_set] & c_ok  # members of R(c, k1/2) also in R(i, k1)
        member[line, cand] = False
        take = c_ok & ((inside.sum(2) > (2.0 / 3) * c_ok.sum(2).double())[..., None])
        cols = torch.cat([torch.where(ok, cand, -1), torch.where(take, c_set, -1).flatten(1)], 1)
        cols = torch.sort(cols, dim=1).values
        keep = (cols >= 0) & torch.cat([torch.ones_like(ok[:, :1]), cols[:, 1:] != cols[:, :-1]], 1)
        pos = torch.searchsorted(idx_sorted[rows], cols).clamp_(max=best_i.shape[1] - 1)
        found = idx_sorted[rows].gather(1, pos) == cols
        r, c = keep.nonzero(as_tuple=True)
        out_r.append(rows[r])
        out_c.append(cols[r, c])
        out_d.append(val_sorted[rows].gather(1, pos)[r, c])
        miss.append(~found[r, c])
    rows, cols, dist, miss = torch.cat(out_r), torch.cat(out_c), torch.cat(out_d), torch.cat(miss).nonzero().squeeze(1)
    sq = (f * f).sum(1)
    fr, fc = (torch.empty((min(chunk, miss.numel()), f.shape[1]), device=f.device) for _ in range(2))
    for s in range(0, miss.numel(), chunk):  # pairs beyond the nearest lists (about a tenth)
        m = miss[s : s + chunk]
        r, c = rows[m], cols[m]
        a, b = torch.index_select(f, 0, r, out=fr[: m.numel()]), torch.index_select(f, 0, c, out=fc[: m.numel()])
        dist[m] = (sq[r] + sq[c] - 2 * a.mul_(b).sum(1)).clamp_(min=0)
    return rows, cols, dist


def _sparse_v(rows: torch.Tensor, cols: torch.Tensor, sq_dist: torch.Tensor, row_max: torch.Tensor,
              best_i: torch.Tensor, k2: int) -> sp.csr_matrix:
    """V: exp(-original distance) over each expanded set, normalised per row, then (k2 > 1) averaged
    over each item's k2 nearest neighbours (the query expansion), as an (N, N) sparse matrix."""
    n = row_max.numel()
    w = torch.exp(-(sq_dist / row_max[rows]))
    w = (w / torch.zeros(n, device=w.device).index_add_(0, rows, w)[rows]).cpu().numpy()
    v = sp.csr_matrix((w, (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n, n))
    if k2 == 1:
        return v
    kq = min(k2, n)
    near = best_i[:, :kq].cpu().numpy().ravel()
    mean = sp.csr_matrix((np.full(n * kq, 1 / kq, dtype=np.float32), (np.repeat(np.arange(n), kq), near)),
                         shape=(n, n))
    return (mean @ v).tocsr()


def _jaccard_into(out: torch.Tensor, v: sp.csr_matrix, row_max: torch.Tensor, lambda_value: float,
                  budget: int) -> None:
    """Turn ``out`` (Q, G squared query-gallery distances) into the final distances in place:
    lambda * d^2 / row max + (1 - lambda) * Jaccard distance, the Jaccard term from shared neighbours."""
    nq, ng = out.shape
    dev = out.device
    vq, vg = v[:nq], v[nq:].T.tocsr()  # vg row l: the gallery items j with V(j, l) > 0

    def put(*arrays: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(a.astype(np.int64) if a.dtype.kind == "i" else a).to(dev) for a in arrays]

    q_ptr, q_col, q_val, g_ptr, g_col, g_val = put(vq.indptr, vq.indices, vq.data, vg.indptr, vg.indices, vg.data)
    reach = (g_ptr[1:] - g_ptr[:-1])[q_col]  # gallery items each query entry reaches
    per_query = np.zeros(nq + 1, dtype=np.int64)
    np.add.at(per_query, np.repeat(np.arange(nq), np.diff(vq.indptr)) + 1, reach.cpu().numpy())
    cum = np.cumsum(per_query)  # expanded pairs before each query
    q_row = torch.repeat_interleave(torch.arange(nq, device=dev), q_ptr[1:] - q_ptr[:-1])
    max_rows = min(nq, max(1, budget // (16 * ng)))
    scale = lambda_value / row_max[:nq]
    t_buf, den_buf = (torch.empty(max_rows * ng, device=dev) for _ in range(2))
    s = 0
    while s < nq:  # blocks of queries bounded in rows and in expanded pairs
        e = int(np.searchsorted(cum, cum[s] + max(1, budget // 64), side="right")) - 1
        e = min(max(e, s + 1), s + max_rows, nq)
        p0, p1 = int(vq.indptr[s]), int(vq.indptr[e])
        count = reach[p0:p1]
        src = torch.repeat_interleave(torch.arange(p0, p1, device=dev), count)
        start = torch.cumsum(count, 0) - count
        at = g_ptr[q_col[src]] + torch.arange(src.numel(), device=dev) - start[src - p0]
        t = t_buf[: (e - s) * ng].zero_()  # sum over shared l of min(V(i, l), V(j, l))
        t.index_add_(0, (q_row[src] - s) * ng + g_col[at], torch.minimum(q_val[src], g_val[at]))
        t = t.view(e - s, ng)
        t.div_(torch.neg(t, out=den_buf[: t.numel()].view_as(t)).add_(2))  # Jaccard = 1 - t / (2 - t)
        out[s:e].mul_(scale[s:e, None]).add_(1 - lambda_value).sub_(t, alpha=1 - lambda_value)
        s = e


def rerank(qf: object, gf: object, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
           metric: str = "cosine", memory_mb: float = 512) -> torch.Tensor:
    """(num_query, num_gallery) k-reciprocal re-ranked distances of query and gallery features.

    Equal to fast-reid's ``re_ranking(d(q, g), d(q, q), d(g, g), k1, k2, lambda_value)`` with d =
    ``cgpn.metrics.pairwise_distance(..., metric)`` (to float32 rounding, and up to the order of exactly
    equal distances, which neither defines), without any (N, N) matrix.

    Args:
        qf, gf: (Q, D) and (G, D) features, NumPy or torch; computed on ``qf``'s device (CUDA included).
        k1, k2, lambda_value: the paper's k1 (reciprocal neighbours), k2 (query expansion) and lambda
            (weight of the original distance); defaults as in the paper.
        metric: ``cosine`` (Euclidean between L2-normalised features, SPEC 8) or ``euclidean``.
        memory_mb: working memory of the blocks (the output and a copy of the features come on top).
    Returns:
        float32 tensor (Q, G), smaller is closer, on ``qf``'s device.

    Example:
        >>> d = rerank(torch.randn(5, 16), torch.randn(40, 16))
        >>> tuple(d.shape)
        (5, 40)
    """
    _check(k1, k2, lambda_value)
    qf, gf = (x.float() for x in _features(qf, gf, metric))
    if len(qf) == 0 or len(gf) == 0:
        raise DatasetError(f"features must be non-empty, got query {tuple(qf.shape)} and gallery {tuple(gf.shape)}")
    if not memory_mb > 0:
        raise ConfigError(f"test.memory_mb must be a positive number of megabytes (e.g. 512), got {memory_mb!r}")
    f = torch.cat([qf, gf])
    n, nq = len(f), len(qf)
    budget = int(memory_mb * 2**20)
    tile = max(1, min(2048, int((budget / 8) ** 0.5)) // _GROUP) * _GROUP  # a tile and its temporaries
    # k1 + 1 neighbours make the reciprocal sets; the query expansion averages over k2 (which may be more)
    best_v, best_i, row_max, out = _neighbours(f, nq, min(n, max(k1 + 1, k2)), tile)
    width = min(n, k1 + 1)
    rows, cols, sq_dist = _expanded_sets(f, best_v[:, :width], best_i[:, :width], k1,
                                         block=min(512, max(1, budget // (n + 8192))),
                                         chunk=max(1, budget // (16 * f.shape[1])))
    v = _sparse_v(rows, cols, sq_dist, row_max, best_i, k2)
    del best_v, best_i, rows, cols, sq_dist
    _jaccard_into(out, v, row_max, lambda_value, budget)
    return out

"""Exact search of a flat gallery: the k highest inner products of each query, as ``faiss.IndexFlatIP`` gives them.

One pass over an fp32 gallery of N x D values reads 4 N D bytes, which bounds the latency of a search of
one or a few queries by the machine's memory bandwidth (1.23 GB, about 70 ms, for 100,000 CGPN features on
a 2-core Xeon). ``Bf16FirstPass`` reads half of that: bf16 scores of the whole gallery, each within a
proven bound of its exact value, then fp32 scores of the few rows that can still reach a query's top k.
Its results are those of the fp32 search: it is a faster way to compute them, not an approximation.

Example:
    >>> scores, rows = exact_search(gallery, queries, k=10)                      # (Q, k) each
    >>> scores, rows = exact_search(gallery, queries, k=10, first_pass=Bf16FirstPass(gallery))
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cgpn.engine.precision import cpu_has_native_bf16

__all__ = ["BF16_MAX_QUERIES", "BF16_MIN_VALUES", "Bf16FirstPass", "exact_search"]

logger = logging.getLogger(__name__)

BF16_MIN_VALUES = 2**24  # auto: galleries of at least this many values (64 MB of fp32; below, a pass is fast anyway)
BF16_MAX_QUERIES = 8  # auto: batches of at most this many queries; larger ones are compute-bound, and torch's bf16
# matrix multiply on a 2-core AVX512-BF16 Xeon was no faster than fp32 there (32 queries: 136-184 ms vs 137 ms)
_UNIT = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
_CHUNK = 8192  # gallery rows converted at a time (no full-size fp32 temporary)


class Bf16FirstPass:
    """A bf16 copy of a flat gallery and the bound on how far its scores can be from the exact ones.

    For a query q and a row g, with q~ and g~ their bf16 roundings, q.g - q~.g~ = (q - q~).g + q~.(g - g~),
    so |q.g - q~.g~| <= |q - q~| |g| + |q~| max_g |g - g~| (Cauchy-Schwarz), plus the rounding of the fp32
    sums (D 2^-24 |q~| |g~| for each of the two searches) and of the bf16 result (2^-8 of it). Every row whose
    upper bound reaches the k-th highest lower bound is scored again in fp32: no row of the exact top k
    is missed. ``__init__`` checks on a sample that this machine's bf16 matrix multiply sums in fp32, as the
    bound assumes (``usable`` is False otherwise, and the search stays fp32).
    """

    def __init__(self, gallery: torch.Tensor) -> None:
        n, d = gallery.shape
        self.vectors = torch.empty((n, d), dtype=torch.bfloat16)
        err = norm = low_norm = 0.0
        with torch.inference_mode():
            for start in range(0, n, _CHUNK):
                rows = gallery[start:start + _CHUNK]
                low = rows.to(torch.bfloat16)
                self.vectors[start:start + _CHUNK] = low
                err = max(err, _max_norm(rows.double() - low.double()))
                norm, low_norm = max(norm, _max_norm(rows.double())), max(low_norm, _max_norm(low.double()))
        self.dim, self.row_error, self.row_norm, self.low_norm = d, err, norm, low_norm
        self.sum_error = 2 * d * 2.0**-24 / (1 - d * 2.0**-24)  # relative error of an fp32 sum of d products, twice
        self.usable = self._sums_in_fp32()
        if not self.usable:
            logger.warning("this machine's bf16 matrix multiply does not sum in fp32: exact search stays fp32")

    @staticmethod
    def pays(gallery: torch.Tensor, queries: int) -> bool:
        """Whether ``first_pass=auto`` uses it: native bf16, a large gallery, a batch of few queries."""
        return gallery.numel() >= BF16_MIN_VALUES and queries <= BF16_MAX_QUERIES and cpu_has_native_bf16()

    def bounds(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, slack), each (Q, N) fp32: bf16 scores and how far each may be from the fp32 search's."""
        low = queries.to(torch.bfloat16)
        q_err = (queries.double() - low.double()).norm(dim=1, keepdim=True)
        q_norm = low.double().norm(dim=1, keepdim=True)
        larger = torch.maximum(q_norm, queries.double().norm(dim=1, keepdim=True)) * max(self.row_norm, self.low_norm)
        fixed = q_err * self.row_norm + q_norm * self.row_error + self.sum_error * larger  # both sums: fp32, bf16
        scores = torch.nn.functional.linear(low, self.vectors).float()
        # 1e-6 of margin, relative and absolute: the fp32 arithmetic of the bound itself (an ulp of 1 is 1.2e-7)
        slack = scores.abs() * (_UNIT / (1 - _UNIT) + 1e-6) + fixed.float() * (1 + 1e-6) + 1e-6
        return scores, slack

    def _sums_in_fp32(self) -> bool:
        """Whether bf16 scores of 8 random queries and up to 4,096 rows stay within the bound (checked in fp64)."""
        rows = self.vectors[:4096]
        queries = torch.randn(8, self.dim, generator=torch.Generator().manual_seed(0))
        queries = (queries / queries.norm(dim=1, keepdim=True)).to(torch.bfloat16)
        with torch.inference_mode():
            got = torch.nn.functional.linear(queries, rows).double()
        exact = queries.double() @ rows.double().T
        allowed = exact.abs() * _UNIT / (1 - _UNIT) + self.sum_error / 2 * queries.double().norm(dim=1, keepdim=True) \
            * self.low_norm
        return bool(((got - exact).abs() <= allowed * (1 + 1e-6) + 1e-12).all())


def _max_norm(x: torch.Tensor) -> float:
    return float(x.norm(dim=1).max()) if len(x) else 0.0


def exact_search(gallery: torch.Tensor, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
                 first_pass: Bf16FirstPass | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k highest inner products of each query row with the (N, D) fp32 ``gallery``: (Q, k) scores,
    highest first (ties: lower row first), and rows (-1 where fewer rows are ``allowed``).

    With ``first_pass``, the rows of each query's top k are found from its bf16 bounds and scored in fp32
    (the same results; a query whose bounds leave more than a quarter of the gallery is scored in full).
    """
    q = torch.from_numpy(queries)
    mask = None if allowed is None else torch.from_numpy(np.asarray(allowed, dtype=bool))
    with torch.inference_mode():
        if first_pass is not None and first_pass.usable:
            values, rows = _searched_from_bounds(gallery, q, k, mask, first_pass)
        else:
            values, rows = _top(q @ gallery.T, k, mask)  # (Q, N): 2 N D flops per query, one BLAS call
    order = np.lexsort((rows, -values), axis=1)  # topk leaves the order of equal scores unspecified
    values, rows = np.take_along_axis(values, order, 1), np.take_along_axis(rows, order, 1)
    missing = ~np.isfinite(values)
    return np.where(missing, -np.finfo(np.float32).max, values), np.where(missing, -1, rows)


def _top(scores: torch.Tensor, k: int, mask: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    if mask is not None:
        scores[:, ~mask] = -np.inf
    top = torch.topk(scores, k, dim=1)
    return top.values.numpy(), top.indices.numpy()


def _searched_from_bounds(gallery: torch.Tensor, queries: torch.Tensor, k: int, mask: torch.Tensor | None,
                          first_pass: Bf16FirstPass) -> tuple[np.ndarray, np.ndarray]:
    scores, slack = first_pass.bounds(queries)
    lower, upper = scores - slack, scores + slack
    if mask is not None:
        lower[:, ~mask] = -np.inf
        upper[:, ~mask] = -np.inf
    kth_lower = torch.topk(lower, k, dim=1).values[:, -1:]  # k rows are at least this good
    reach = upper >= kth_lower  # every row of the exact top k (an allowed row, when k are allowed)
    values, rows = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    for i, query in enumerate(queries):
        candidates = reach[i].nonzero().squeeze(1)  # at least k: the k rows of the k-th lower bound
        if not torch.isfinite(kth_lower[i]).all() or len(candidates) > len(gallery) // 4:
            (values[i],), (rows[i],) = _top(query[None] @ gallery.T, k, mask)  # fewer than k allowed, or loose
            continue
        top = torch.topk(gallery[candidates] @ query, k)
        values[i], rows[i] = top.values.numpy(), candidates[top.indices].numpy()
    return values, rows

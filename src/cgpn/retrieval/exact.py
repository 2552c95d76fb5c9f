"""Exact search of a flat gallery: the k highest inner products of each query, as ``faiss.IndexFlatIP`` gives them.

One pass over an fp32 gallery of N x D values reads 4 N D bytes, which bounds the latency of a search of
one or a few queries by the machine's memory bandwidth (1.23 GB, about 60 ms, for 100,000 CGPN features on
a 2-core Xeon). A first pass reads a compact copy instead: scores of the whole gallery, each within a proven
bound of the fp32 search's, then fp32 scores of the few rows that can still reach a query's top k. Its
results are the exact top k of fp32 scores (equal to the full fp32 search's up to the last bit of fp32
rounding, which differs between BLAS calls): a faster way to compute them, not an approximation.

- ``Int8FirstPass``: int8 rows (a quarter of the bytes) and int32 sums, exact; each query is written as two
  int8 vectors, so its own rounding leaves no error worth the name. On a 2-core AVX512-VNNI Xeon 2-3.5x
  faster than the fp32 pass for 1-8 queries and 1.3x for 32 (benchmarks/serve_load.py). The product is
  ``torch._int_mm`` (underscored, but the op torchao's int8 matrix multiplies build on): a self-check at
  construction decides whether it is used, so a torch without it, or with a kernel that is not exact,
  falls back to the fp32 search.
- ``Bf16FirstPass``: bf16 rows (half the bytes) and torch's bf16 matrix multiply, where that sums in fp32.

Example:
    >>> scores, rows = exact_search(gallery, queries, k=10)                      # (Q, k) each
    >>> scores, rows = exact_search(gallery, queries, k=10, first_pass=Int8FirstPass(gallery))
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cgpn.engine.precision import cpu_has_int8_dot, cpu_has_native_bf16

__all__ = ["BF16_MAX_QUERIES", "MIN_VALUES", "Bf16FirstPass", "FirstPass", "Int8FirstPass", "exact_search"]

logger = logging.getLogger(__name__)

MIN_VALUES = 2**24  # auto: galleries of at least this many values (64 MB of fp32; below, a pass is fast anyway)
BF16_MAX_QUERIES = 8  # auto: bf16 for batches of at most this many queries; larger ones are compute-bound, and torch's
# bf16 matrix multiply on a 2-core AVX512-BF16 Xeon was no faster than fp32 there (32 queries: 136-184 vs 137 ms)
INT8_MAX_DIM = (2**31 - 1) // 127**2  # int32 sums of this many products of int8 codes in [-127, 127] cannot overflow
_UNIT = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
_CHUNK = 64  # gallery rows converted at a time: fp64 temporaries that stay in cache (1.6 s for 100,000 x 3072 vs 4.3 s at 1,024)
_MARGIN = 1e-6  # relative margin for the fp32 arithmetic of scores and bounds (an ulp of 1 is 1.2e-7)


def _sum_error(d: int) -> float:
    """Bound on the relative error of an fp32 sum of d products (gamma_d = d u / (1 - d u), u = 2^-24)."""
    return d * 2.0**-24 / (1 - d * 2.0**-24)


class FirstPass:
    """Scores of a whole gallery from a compact copy of it, with a bound on how far each may be from the
    score the fp32 search gives: ``bounds(queries)`` -> (scores, slack), each (Q, N) fp32. ``usable`` is False
    when a construction-time check finds that this machine's kernel breaks the bound's assumptions."""

    name: str
    usable: bool

    def bounds(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def pays(gallery: torch.Tensor, queries: int) -> bool:
        """Whether ``first_pass=auto`` takes this pass for a search of ``queries`` queries of ``gallery``."""
        raise NotImplementedError


class Int8FirstPass(FirstPass):
    """An int8 copy of a flat gallery (a scale per row) and the bound on how far its scores can be from the
    fp32 search's.

    A query q is written as q~ = a s + b t (a, b int8 vectors: q's codes and those of what they leave out),
    a row g as g~ = c r; ``torch._int_mm`` sums a.c and b.c exactly in int32 (|sum| <= 127^2 D), so the score
    q~.g~ is exact up to the fp32 scaling. Then |q.g - q~.g~| <= |q - q~| |g| + |q~| |g - g~| (Cauchy-Schwarz;
    |g - g~| per row, kept in fp64 when the copy is made), plus the rounding of the fp32 search's own sum
    (gamma_D |q| |g|). ``__init__`` checks on sample and extreme codes that the int8 kernel's sums are exact
    (no 16-bit saturation), as the bound assumes.
    """

    name = "int8"

    def __init__(self, gallery: torch.Tensor) -> None:
        n, d = gallery.shape
        self.codes = torch.empty((n, d), dtype=torch.int8)
        self.scales = torch.empty(n)
        norm, error = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
        with torch.inference_mode():
            for start in range(0, n, _CHUNK):
                rows = gallery[start:start + _CHUNK]
                codes, scales = _int8_rows(rows)
                self.codes[start:start + _CHUNK], self.scales[start:start + _CHUNK] = codes, scales
                norm[start:start + _CHUNK] = rows.double().norm(dim=1)
                error[start:start + _CHUNK] = (rows.double() - codes.double() * scales.double()[:, None]).norm(dim=1)
        self.dim, self.sum_error = d, _sum_error(d)
        self.rows = torch.stack([_up(norm), _up(error)])  # (2, N) fp32, rounded up: |g| and |g - g~|
        finite = bool(torch.isfinite(self.rows).all())
        self.usable = d <= INT8_MAX_DIM and finite and self._sums_exact()
        if not self.usable:
            logger.warning("int8 first pass not used (%s): exact search stays fp32", "the gallery holds inf or NaN"
                           if not finite else f"{d} dims: int32 sums could overflow" if d > INT8_MAX_DIM else
                           "this machine's int8 matrix multiply does not sum exactly")

    @staticmethod
    def pays(gallery: torch.Tensor, queries: int) -> bool:
        """A large gallery on a CPU with int8 dot-product instructions (any number of queries)."""
        return gallery.numel() >= MIN_VALUES and cpu_has_int8_dot()

    def bounds(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, slack), each (Q, N) fp32: scores of the int8 copy and how far each may be from the fp32 search's."""
        high, high_scale = _int8_rows(queries)
        low, low_scale = _int8_rows(queries - high.float() * high_scale[:, None])
        parts = (high.double() * high_scale.double()[:, None], low.double() * low_scale.double()[:, None])
        written = parts[0] + parts[1]
        q_error, q_norm = (queries.double() - written).norm(dim=1), queries.double().norm(dim=1)
        sums = torch._int_mm(torch.cat([high, low]), self.codes.T)  # (2Q, N), exact
        count = len(queries)
        scores = sums[:count].float().mul_(high_scale[:, None]).add_(sums[count:].float().mul_(low_scale[:, None]))
        scores.mul_(self.scales)
        # the fp32 arithmetic of the scores: a few roundings of at most (|a s| + |b t|)(|g| + |g - g~|)
        arithmetic = 2 * _MARGIN * (parts[0].norm(dim=1) + parts[1].norm(dim=1))
        per_norm = q_error + self.sum_error * q_norm + arithmetic  # times |g|
        per_error = written.norm(dim=1) + arithmetic  # times |g - g~|
        slack = torch.stack([_up(per_norm), _up(per_error)], dim=1) @ self.rows
        return scores, slack.mul_(1 + _MARGIN)

    def _sums_exact(self) -> bool:
        """Whether int8 sums of random and extreme codes (all +-127: a 16-bit partial sum would saturate)
        against up to 256 gallery rows equal the int64 ones."""
        extreme = torch.full((3, self.dim), 127, dtype=torch.int8)
        extreme[1] = -127
        extreme[2, ::2] = -127
        rows = torch.cat([self.codes[:256], extreme])
        queries = torch.cat([torch.randint(-127, 128, (5, self.dim), dtype=torch.int8,
                                           generator=torch.Generator().manual_seed(0)), extreme])
        try:
            got = torch._int_mm(queries, rows.T)
        except (RuntimeError, NotImplementedError, AttributeError) as err:  # a build without the CPU kernel
            logger.info("torch._int_mm unavailable: %s", err)
            return False
        return bool(torch.equal(got.long(), queries.long() @ rows.long().T))


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in [-127, 127] and a scale per row (the row's largest magnitude / 127; 1 for a zero row)."""
    scales = x.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(x / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


def _up(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> fp32, rounded up (a bound stays a bound)."""
    low = x.float()
    return torch.where(low.double() < x, torch.nextafter(low, torch.tensor(float("inf"))), low)


class Bf16FirstPass(FirstPass):
    """A bf16 copy of a flat gallery and the bound on how far its scores can be from the exact ones.

    For a query q and a row g, with q~ and g~ their bf16 roundings, q.g - q~.g~ = (q - q~).g + q~.(g - g~),
    so |q.g - q~.g~| <= |q - q~| |g| + |q~| max_g |g - g~| (Cauchy-Schwarz), plus the rounding of the fp32
    sums (D 2^-24 |q~| |g~| for each of the two searches) and of the bf16 result (2^-8 of it). Every row whose
    upper bound reaches the k-th highest lower bound is scored again in fp32: no row of the exact top k
    is missed. ``__init__`` checks on a sample that this machine's bf16 matrix multiply sums in fp32, as the
    bound assumes (``usable`` is False otherwise, and the search stays fp32).
    """

    name = "bf16"

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
        self.sum_error = 2 * _sum_error(d)  # the fp32 sums of both searches
        self.usable = self._sums_in_fp32()
        if not self.usable:
            logger.warning("this machine's bf16 matrix multiply does not sum in fp32: exact search stays fp32")

    @staticmethod
    def pays(gallery: torch.Tensor, queries: int) -> bool:
        """Whether ``first_pass=auto`` uses it: native bf16, a large gallery, a batch of few queries."""
        return gallery.numel() >= MIN_VALUES and queries <= BF16_MAX_QUERIES and cpu_has_native_bf16()

    def bounds(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, slack), each (Q, N) fp32: bf16 scores and how far each may be from the fp32 search's."""
        low = queries.to(torch.bfloat16)
        q_err = (queries.double() - low.double()).norm(dim=1, keepdim=True)
        q_norm = low.double().norm(dim=1, keepdim=True)
        larger = torch.maximum(q_norm, queries.double().norm(dim=1, keepdim=True)) * max(self.row_norm, self.low_norm)
        fixed = q_err * self.row_norm + q_norm * self.row_error + self.sum_error * larger  # both sums: fp32, bf16
        scores = torch.nn.functional.linear(low, self.vectors).float()
        # 1e-6 of margin, relative and absolute: the fp32 arithmetic of the bound itself (an ulp of 1 is 1.2e-7)
        slack = scores.abs() * (_UNIT / (1 - _UNIT) + _MARGIN) + fixed.float() * (1 + _MARGIN) + _MARGIN
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
                 first_pass: FirstPass | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k highest inner products of each query row with the (N, D) fp32 ``gallery``: (Q, k) scores,
    highest first (ties: lower row first), and rows (-1 where fewer rows are ``allowed``).

    With ``first_pass``, the rows of each query's top k are found from its bounds and scored in fp32
    (the same rows, up to fp32 rounding; a query whose bounds leave more than a quarter of the gallery is
    scored in full).
    """
    if k == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    q = torch.from_numpy(queries)
    mask = None if allowed is None else torch.from_numpy(np.asarray(allowed, dtype=bool))
    with torch.inference_mode():
        if first_pass is not None and first_pass.usable:
            values, rows = _searched_from_bounds(gallery, q, k, mask, first_pass)
        else:
            values, rows = _top(q @ gallery.T, k, mask)  # (Q, N): 2 N D flops per query, one BLAS call
    order = np.lexsort((rows, -values), axis=1)  # equal scores: lower row first
    values, rows = np.take_along_axis(values, order, 1), np.take_along_axis(rows, order, 1)
    missing = ~np.isfinite(values)
    return np.where(missing, -np.finfo(np.float32).max, values), np.where(missing, -1, rows)


def _top(scores: torch.Tensor, k: int, mask: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    if mask is not None:
        scores[:, ~mask] = -np.inf
    return _highest(scores, k)


def _highest(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Values and columns of the k highest scores of each row; of scores tied at the k-th, the lower columns
    (``topk`` picks among them in no specified order; a stable sort of the rows where that matters)."""
    top = torch.topk(scores, k, dim=1)
    values, columns = top.values, top.indices
    kth = values[:, -1:]  # -inf: fewer than k allowed rows, whose order no result keeps (they come back as -1)
    for i in (((scores >= kth).sum(dim=1) > k) & kth.isfinite().squeeze(1)).nonzero().squeeze(1).tolist():
        ordered = torch.sort(scores[i], descending=True, stable=True)
        values[i], columns[i] = ordered.values[:k], ordered.indices[:k]
    return values.numpy(), columns.numpy()


def _searched_from_bounds(gallery: torch.Tensor, queries: torch.Tensor, k: int, mask: torch.Tensor | None,
                          first_pass: FirstPass) -> tuple[np.ndarray, np.ndarray]:
    scores, slack = first_pass.bounds(queries)
    lower, upper = scores - slack, scores + slack
    if mask is not None:
        lower[:, ~mask] = -np.inf
        upper[:, ~mask] = -np.inf
    kth_lower = torch.topk(lower, k, dim=1).values[:, -1:]  # k rows are at least this good
    reach = (upper >= kth_lower) | upper.isnan()  # every row of the exact top k (an allowed row, when k are
    # allowed); NaN: a bound that overflowed
    counts = reach.sum(dim=1)
    found = reach.nonzero()[:, 1].split(counts.tolist())  # one scan for all queries: rows per query, ascending
    values, rows = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    for i, (query, candidates) in enumerate(zip(queries, found)):  # at least k each: those of the k-th lower bound
        if not torch.isfinite(kth_lower[i]).all() or len(candidates) > len(gallery) // 4:
            (values[i],), (rows[i],) = _top(query[None] @ gallery.T, k, mask)  # fewer than k allowed, or loose
            continue
        (values[i],), (best,) = _highest((gallery.index_select(0, candidates) @ query)[None], k)
        rows[i] = candidates[best].numpy()  # candidates ascend: ties keep the lower row
    return values, rows

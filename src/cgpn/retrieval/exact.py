"""Exact search of a flat gallery: the k highest inner products of each query, as ``faiss.IndexFlatIP`` gives them.

One pass over an fp32 gallery of N x D values reads 4 N D bytes, which bounds the latency of a search of
one or a few queries by the machine's memory bandwidth (1.23 GB, about 60 ms, for 100,000 CGPN features on
a 2-core Xeon). A first pass reads a compact copy instead: scores of the whole gallery, each within a proven
bound of the fp32 search's; the rows whose first score is within twice the widest bound of the k-th are
bounded one by one, and those that can still reach a query's top k are scored again (the k best first,
whose k-th exact score then rules out more of the rest), summed in fp64 and rounded to fp32. Its results are
the exact top k of fp32 scores (equal to the full fp32 search's up to the last bit of fp32 rounding, which
differs between BLAS calls; copies of a row score equally): a faster way to compute them, not an
approximation.

- ``Int8FirstPass``: int8 rows (a quarter of the bytes) and int32 sums, exact; each query is written as two
  int8 vectors, so its own rounding leaves no error worth the name. The product is oneDNN's quantized linear
  on a gallery packed once (``OneDnnInt8Product``), else ``torch._int_mm``: a self-check at construction
  picks the first that sums exactly here, so a torch without either, or a kernel that is not exact, leaves
  the search fp32. On a 2-core AVX512-VNNI Xeon 2-3x faster than the fp32 pass for 1-4 queries and 1.5x for
  32 (benchmarks/serve_load.py).
- ``Bf16FirstPass``: bf16 rows (half the bytes) and torch's bf16 matrix multiply, where that sums in fp32.
  On a 2-core AMX Xeon the fastest of the three from 2 queries up (32 queries of 100,000 x 3072: 43-45 ms,
  int8 58-62, fp32 114-118), so which pass a search takes is best timed on the machine (``fastest_first_pass``,
  what ``GalleryIndex.prepare`` does for a server).

The fp32 product itself (``fp32_scores``) is one BLAS call in whichever operand order is faster on the
machine, timed once per process and batch size on a slice of the gallery: the same sums in another order,
up to 4.5x apart (MKL on a 2-core AMD EPYC, 100,000 x 3072, 4 queries: 332 ms as ``q @ g.T``, 73 ms as
``(g @ q.T).T``).

Example:
    >>> scores, rows = exact_search(gallery, queries, k=10)                      # (Q, k) each
    >>> scores, rows = exact_search(gallery, queries, k=10, first_pass=Int8FirstPass(gallery))
    >>> scores = fp32_scores(gallery_tensor, query_tensor)                     # (Q, N)
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from cgpn.engine.precision import cpu_has_int8_dot, cpu_has_native_bf16

__all__ = ["BF16_EMULATED_MAX_QUERIES", "INT8_PRODUCTS", "MIN_VALUES", "Bf16FirstPass", "FirstPass", "FirstScores",
           "Int8FirstPass", "Int8Product", "IntMmInt8Product", "OneDnnInt8Product", "batch_bucket", "batch_sizes",
           "exact_int8_product",
           "exact_search", "fastest_first_pass", "fp32_scores", "gallery_first_is_faster"]

logger = logging.getLogger(__name__)

MIN_VALUES = 2**24  # auto: galleries of at least this many values (64 MB of fp32; below, a pass is fast anyway)
BF16_EMULATED_MAX_QUERIES = 2  # auto, on a CPU without native bf16: torch emulates the product, which still reads
# half the bytes (2-core AMD EPYC, AVX2, 100,000 x 3072: 1 query 38 vs 98 ms, 2 queries 68-74 vs 135 ms; 4 queries
# 129-132 vs 161-274 ms, too close to call; 8 and more, slower than fp32)
INT8_MAX_DIM = (2**31 - 1) // (255 * 127)  # int32 sums of this many products of codes cannot overflow, even where
# a kernel shifts the query's codes to unsigned (0..255), as u8 x s8 instructions take them
_UNIT = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
_CHUNK = 64  # gallery rows converted at a time: fp64 temporaries that stay in cache (codes of 100,000 x 3072 in 1.6 s
# vs 4.3 s at 1,024; packing them for oneDNN takes another second)
_OVERFLOW = 1e36  # a query whose scores, or the products they are made of, could come near fp32's largest value
# (3.4e38) is searched in fp32
_MARGIN = 1e-6  # relative margin for the fp32 arithmetic of scores and bounds (an ulp of 1 is 1.2e-7)
_LAYOUT_ROWS = 8192  # gallery rows the two operand orders are timed on (a slice's ratio follows the whole's:
# AMD EPYC, 4 queries, 3.4x on 16,384 of 100,000 rows and 4.5x on all)
_gallery_first: dict[tuple[int, int], bool] = {}  # (D, batch size bucket) -> whether (g @ q.T).T is faster here


def _sum_error(d: int) -> float:
    """Bound on the relative error of an fp32 sum of d products (gamma_d = d u / (1 - d u), u = 2^-24)."""
    return d * 2.0**-24 / (1 - d * 2.0**-24)


class FirstScores(NamedTuple):
    """A first pass's scores of a batch of queries, and how far each may be from the fp32 search's."""

    values: torch.Tensor  # (Q, N) fp32
    widest: torch.Tensor  # (Q,) fp64: the most any row's score may be off (inf: search that query in fp32)
    slack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (queries, rows) of (query, row) pairs -> fp64
    # bound of each pair's error


class FirstPass:
    """Scores of a whole gallery from a compact copy of it, with a bound on how far each may be from the
    score the fp32 search gives (``scores(queries)``). ``usable`` is False when a construction-time check
    finds that this machine's kernel breaks the bound's assumptions."""

    name: str
    usable: bool

    def scores(self, queries: torch.Tensor) -> FirstScores:
        raise NotImplementedError

    @staticmethod
    def pays(gallery: torch.Tensor, queries: int) -> bool:
        """Whether this pass can be faster than the fp32 pass for ``queries`` queries of ``gallery`` on this
        machine (``first_pass=auto`` takes the first that can, or the fastest of them where it was timed)."""
        raise NotImplementedError


class Int8Product:
    """(M, D) int8 codes -> (M, N) fp32: their exact int32 sums with a gallery's int8 rows, times each row's scale."""

    name: str

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OneDnnInt8Product(Int8Product):
    """oneDNN's quantized linear on a weight packed once (the op torch's x86 int8 inference compiles to): the
    codes shifted to unsigned (zero point 128), as VNNI's u8 x s8 instructions take them. On a 2-core VNNI
    Xeon, 100,000 x 3072 rows: 19 ms for 8 codes against 27 with ``torch._int_mm``, about the same for 64."""

    name = "onednn"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
        self.scales, self.zero_points = scales, torch.zeros(len(codes), dtype=torch.long)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        unsigned = (codes.to(torch.int16) + 128).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(unsigned, 1.0, 128, self.packed, self.scales, self.zero_points,
                                                  None, 1.0, 0, torch.float32, "none", [], "")


class IntMmInt8Product(Int8Product):
    """``torch._int_mm`` (int8 x int8 -> int32; the op torchao's int8 matrix multiplies build on)."""

    name = "int_mm"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes, self.scales = codes, scales

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(codes, self.codes.T).float().mul_(self.scales)


INT8_PRODUCTS: tuple[type[Int8Product], ...] = (OneDnnInt8Product, IntMmInt8Product)  # tried in this order


def exact_int8_product(codes: torch.Tensor, scales: torch.Tensor) -> Int8Product | None:
    """The first of ``INT8_PRODUCTS`` that sums exactly on this machine, made for ``codes``; None if none does.

    Checked on up to 256 of the rows and on extreme codes (all +-127: a kernel summing pairs of u8 x s8
    products in 16 bits, as pre-VNNI x86 instructions do, saturates there) against int64 sums."""
    extreme = torch.full((3, codes.shape[1]), 127, dtype=torch.int8)
    extreme[1] = -127
    extreme[2, ::2] = -127
    rows = torch.cat([codes[:256], extreme])
    sample = torch.cat([torch.randint(-127, 128, (5, codes.shape[1]), dtype=torch.int8,
                                      generator=torch.Generator().manual_seed(0)), extreme])
    expected = (sample.long() @ rows.long().T).double()
    for kind in INT8_PRODUCTS:
        try:
            product = kind(rows, torch.ones(len(rows)))
            got = [product(sample).double(), product(sample[-2:]).double()]  # kernels differ by shape: 8 and 2 codes
        except (RuntimeError, NotImplementedError, AttributeError) as err:  # a build without the op
            logger.info("int8 product %s unavailable: %s", kind.name, err)
            continue
        if all(bool(((x - y).abs() <= y.abs() * 2.0**-24).all()) for x, y in zip(got, [expected, expected[-2:]])):
            return kind(codes, scales)  # int32 sums, rounded once to fp32
        logger.info("int8 product %s does not sum exactly on this machine", kind.name)
    return None


class Int8FirstPass(FirstPass):
    """An int8 copy of a flat gallery (a scale per row) and the bound on how far its scores can be from the
    fp32 search's.

    A query q is written as q~ = a s + b t (a, b int8 vectors: q's codes and those of what they leave out),
    a row g as g~ = c r; an ``Int8Product`` sums a.c and b.c exactly in int32, so the score q~.g~ is exact
    up to the fp32 scaling. Then |q.g - q~.g~| <= |q - q~| |g| + |q~| |g - g~| (Cauchy-Schwarz; |g - g~| per
    row, kept in fp64 when the copy is made), plus the rounding of the fp32 search's own sum (gamma_D |q| |g|).
    ``__init__`` picks the first product whose sums of sample and extreme codes are exact (no 16-bit
    saturation), as the bound assumes; with none, ``usable`` is False.
    """

    name = "int8"

    def __init__(self, gallery: torch.Tensor) -> None:
        n, d = gallery.shape
        codes, scales = torch.empty((n, d), dtype=torch.int8), torch.empty(n)
        self.norm, self.error = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
        with torch.inference_mode():
            for start in range(0, n, _CHUNK):
                rows = gallery[start:start + _CHUNK]
                chunk = slice(start, start + _CHUNK)
                codes[chunk], scales[chunk] = _int8_rows(rows)
                self.norm[chunk] = rows.double().norm(dim=1)
                self.error[chunk] = (rows.double() - codes[chunk].double() * scales[chunk].double()[:, None]).norm(dim=1)
        self.sum_error = _sum_error(d)
        self.widest_norm, self.widest_error = (float(x.max()) if n else 0.0 for x in (self.norm, self.error))
        finite = math.isfinite(self.widest_norm) and math.isfinite(self.widest_error)
        self.product = exact_int8_product(codes, scales) if finite and d <= INT8_MAX_DIM else None
        self.usable = self.product is not None
        if not self.usable:
            logger.warning("int8 first pass not used (%s): exact search stays fp32", "the gallery holds inf or NaN"
                           if not finite else f"{d} dims: int32 sums could overflow" if d > INT8_MAX_DIM else
                           "this machine's int8 matrix multiplies do not sum exactly")

    @staticmethod
    def pays(gallery: torch.Tensor, queries: int) -> bool:
        """A large gallery on a CPU with int8 dot-product instructions (any number of queries)."""
        return gallery.numel() >= MIN_VALUES and cpu_has_int8_dot()

    def scores(self, queries: torch.Tensor) -> FirstScores:
        """Scores of the int8 copy, and how far each may be from the fp32 search's."""
        high, high_scale = _int8_rows(queries)
        low, low_scale = _int8_rows(queries - high.float() * high_scale[:, None])
        parts = (high.double() * high_scale.double()[:, None], low.double() * low_scale.double()[:, None])
        written = parts[0] + parts[1]
        q_error, q_norm = (queries.double() - written).norm(dim=1), queries.double().norm(dim=1)
        products = self.product(torch.cat([high, low]))  # (2Q, N): exact sums times each row's scale
        count = len(queries)
        values = products[:count].mul_(high_scale[:, None]).addcmul_(products[count:], low_scale[:, None])
        # the fp32 arithmetic of the scores: a few roundings of at most (|a s| + |b t|)(|g| + |g - g~|)
        parts_norm = parts[0].norm(dim=1) + parts[1].norm(dim=1)
        per_norm = (q_error + self.sum_error * q_norm + 2 * _MARGIN * parts_norm) * (1 + _MARGIN)  # times |g|
        per_error = (written.norm(dim=1) + 2 * _MARGIN * parts_norm) * (1 + _MARGIN)  # times |g - g~|
        widest = per_norm * self.widest_norm + per_error * self.widest_error
        # every value made on the way is at most the largest of |a s| + |b t|, |a| and |b| (the products are
        # scaled by the row first: |a.c| r <= |a| |g~|) times |g~| <= |g| + |g - g~| (Cauchy-Schwarz)
        largest = torch.stack([parts_norm, high.float().norm(dim=1).double(), low.float().norm(dim=1).double()]).amax(0)
        safe = largest * (self.widest_norm + self.widest_error) < _OVERFLOW
        return FirstScores(values, torch.where(safe, widest, math.inf),
                           lambda i, rows: per_norm[i] * self.norm[rows] + per_error[i] * self.error[rows])


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in [-127, 127] and a scale per row (the row's largest magnitude / 127; 1 for a zero row)."""
    scales = x.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(x / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


class Bf16FirstPass(FirstPass):
    """A bf16 copy of a flat gallery and the bound on how far its scores can be from the exact ones.

    For a query q and a row g, with q~ and g~ their bf16 roundings, q.g - q~.g~ = (q - q~).g + q~.(g - g~),
    so |q.g - q~.g~| <= |q - q~| |g| + |q~| max_g |g - g~| (Cauchy-Schwarz), plus the rounding of the fp32
    sums (D 2^-24 |q~| |g~| for each of the two searches) and of the bf16 result (2^-8 of it). ``__init__``
    checks on a sample that this machine's bf16 matrix multiply sums in fp32, as the bound assumes
    (``usable`` is False otherwise, and the search stays fp32).
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
        """A large gallery on a CPU with native bf16 (any number of queries), or 1-2 queries where it is emulated."""
        return gallery.numel() >= MIN_VALUES and (cpu_has_native_bf16() or queries <= BF16_EMULATED_MAX_QUERIES)

    def scores(self, queries: torch.Tensor) -> FirstScores:
        """bf16 scores, and how far each may be from the fp32 search's."""
        low = queries.to(torch.bfloat16)
        q_err = (queries.double() - low.double()).norm(dim=1)
        q_norm = low.double().norm(dim=1)
        larger = torch.maximum(q_norm, queries.double().norm(dim=1)) * max(self.row_norm, self.low_norm)
        fixed = q_err * self.row_norm + q_norm * self.row_error + self.sum_error * larger  # both sums: fp32, bf16
        # 1e-6 of margin, relative and absolute: the arithmetic of the bound itself (an ulp of 1 is 1.2e-7)
        fixed = fixed * (1 + _MARGIN) + _MARGIN
        relative = _UNIT / (1 - _UNIT) + _MARGIN  # the bf16 rounding of a score, of its size
        values = torch.nn.functional.linear(low, self.vectors).float()
        widest = values.abs().amax(dim=1).double() * relative + fixed
        return FirstScores(values, torch.where(larger < _OVERFLOW, widest, math.inf),
                           lambda i, rows: values[i, rows].double().abs() * relative + fixed[i])

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


def fp32_scores(gallery: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(Q, N) inner products of fp32 ``queries`` with the (N, D) ``gallery``, one BLAS call in whichever
    operand order (``q @ g.T`` or ``(g @ q.T).T``) this machine does faster for this many queries."""
    return _product(gallery, queries, len(queries) > 0 and gallery_first_is_faster(gallery, len(queries)))


def gallery_first_is_faster(gallery: torch.Tensor, count: int) -> bool:
    """Whether this machine does the fp32 product of ``count`` queries with ``gallery`` faster as ``(g @ q.T).T``:
    timed at the first question for each feature size and batch size bucket (1, 2, 4, ..., 64), then remembered;
    False without timing for a gallery under ``MIN_VALUES`` (fast either way)."""
    if gallery.numel() < MIN_VALUES:
        return False
    key = (gallery.shape[1], batch_bucket(count))
    if key not in _gallery_first:
        _gallery_first[key] = _timed_gallery_first(gallery[:_LAYOUT_ROWS], key[1])
        logger.debug("fp32 product of %d queries: %s", key[1], "(g @ q.T).T" if _gallery_first[key] else "q @ g.T")
    return _gallery_first[key]


def batch_bucket(count: int) -> int:
    """The batch size a speed choice of ``count`` queries is made for: 1, 2, 4, ..., 64 (more: 64)."""
    return min(64, 1 << (count - 1).bit_length())


def batch_sizes(max_queries: int) -> list[int]:
    """The batch sizes speed choices are timed at for batches of up to ``max_queries``: 1, 2, 4, ... and
    ``max_queries`` itself, at most 64 (one of each ``batch_bucket``; 64 stands for every larger batch)."""
    last, sizes = min(max_queries, batch_bucket(max_queries)), [1]
    while sizes[-1] < last:
        sizes.append(min(2 * sizes[-1], last))
    return sizes


def fastest_first_pass(gallery: torch.Tensor, candidates: Sequence[FirstPass], count: int,
                       k: int = 10) -> FirstPass | None:
    """The fastest exact search of ``count`` queries of ``gallery`` on this machine: one of the usable
    ``candidates``, or None for the fp32 pass. Each is timed on ``count`` rows of the gallery spread over it,
    the best of 2 searches after an untimed one, all in turns (so that a machine whose speed drifts slows all
    alike). Which pass wins depends on the CPU, not only its flags: on a 2-core AMX Xeon bf16 took 45 ms for
    32 queries of 100,000 x 3072 and int8 59, on a 2-core AVX512-VNNI Xeon without AMX bf16 was no faster
    than fp32 there."""
    options = [None, *(c for c in candidates if c.usable)]
    if len(options) == 1:
        return None
    queries = gallery[torch.linspace(0, len(gallery) - 1, count).long()].numpy()
    best = [math.inf] * len(options)
    for turn in range(3):
        for i, option in enumerate(options):
            start = time.perf_counter()
            exact_search(gallery, queries, k, first_pass=option)
            if turn:
                best[i] = min(best[i], time.perf_counter() - start)
    logger.debug("exact search of %d queries: %s", count, ", ".join(
        f"{o.name if o else 'fp32'} {1000 * t:.0f} ms" for o, t in zip(options, best)))
    return options[int(np.argmin(best))]


def _product(gallery: torch.Tensor, queries: torch.Tensor, gallery_first: bool) -> torch.Tensor:
    return (gallery @ queries.T).T.contiguous() if gallery_first else queries @ gallery.T


def _timed_gallery_first(rows: torch.Tensor, count: int) -> bool:
    """Whether ``(rows @ q.T).T`` beats ``q @ rows.T`` for ``count`` queries: the best of 3 runs of each, taken
    in turns after one of each (so that a machine whose speed drifts slows both alike)."""
    queries = rows[torch.arange(count) % len(rows)].contiguous()  # values do not change a product's speed
    best = {False: math.inf, True: math.inf}
    for turn in range(8):
        gallery_first = bool(turn % 2)
        start = time.perf_counter()
        _product(rows, queries, gallery_first)
        if turn >= 2:
            best[gallery_first] = min(best[gallery_first], time.perf_counter() - start)
    return best[True] < best[False]


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
            values, rows = _top(fp32_scores(gallery, q), k, mask)  # (Q, N): 2 N D flops per query
    order = np.lexsort((rows, -values), axis=1)  # equal scores: lower row first
    values, rows = np.take_along_axis(values, order, 1), np.take_along_axis(rows, order, 1)
    missing = np.isneginf(values) | np.isnan(values)  # fewer allowed rows than k (a +inf score is a score)
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
    first, count = first_pass.scores(queries), len(queries)
    if mask is not None:
        first.values[:, ~mask] = -np.inf
    # At least k rows have first scores of at least kth (a value at most the k-th highest): their lower bounds
    # are at least kth - widest, and a row of the exact top k has an upper bound of at least the k-th lower
    # bound, so a first score of at least kth - 2 widest (a little more taken off for the fp64 arithmetic).
    # Only the rows above that floor are bounded one by one.
    floor = _down(_kth_at_most(first.values, k).double() - 2.000001 * first.widest)
    full = ~torch.isfinite(floor)  # fewer than k allowed rows, or a query whose scores could overflow
    floor[full] = np.nan  # no row is >= NaN, not even one scored +inf
    pairs = torch.from_numpy(np.flatnonzero((first.values >= floor[:, None]).numpy()))  # query-major: rows ascend
    which, rows = pairs // first.values.shape[1], pairs % first.values.shape[1]  # (torch's nonzero: 4x the time)
    loose = torch.bincount(which, minlength=count) > len(gallery) // 4  # a bound this loose gains nothing
    if loose.any():
        full |= loose
        which, rows = which[~loose[which]], rows[~loose[which]]
    values, found = np.full((count, k), -np.inf, np.float32), np.full((count, k), -1, np.int64)
    if len(which):
        score, slack = first.values[which, rows].double(), first.slack(which, rows)
        kth_lower = _by_query(score - slack, which, count).topk(k, dim=1).values[:, -1]  # k rows are this good
        reach = score + slack >= kth_lower[which]  # every row of the exact top k (at least k rows per query)
        which, rows, score, slack = which[reach], rows[reach], score[reach], slack[reach]
        # Each query's k rows of highest first scores are scored first: k rows score at least the k-th of them,
        # so a row that can only score less is not scored at all (random rows: a third of them scored)
        seed = _highest_pairs(score, which, count, k)
        exact = torch.full((len(which),), -math.inf)
        exact[seed] = _rescored(gallery, queries, which[seed], rows[seed])
        kth = _by_query(exact[seed], which[seed], count).topk(k, dim=1).values[:, -1]
        rest = ~seed & (score + slack >= kth[which].double())
        exact[rest] = _rescored(gallery, queries, which[rest], rows[rest])
        kept = seed | rest
        which, rows = which[kept], rows[kept]
        values, columns = _highest(_by_query(exact[kept], which, count), k)
        found = _by_query(rows, which, count, -1).gather(1, torch.from_numpy(columns)).numpy()  # ties: lower row
    full = full.nonzero()[:, 0]  # no usable bound, or a loose one: rank the fp32 scores in full
    if len(full):
        values[full.numpy()], found[full.numpy()] = _top(fp32_scores(gallery, queries[full]), k, mask)
    return values, found


def _kth_at_most(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``scores``, a value at most its k-th highest: the k-th highest of the maxima of at least 32 k
    blocks of columns (k of them are k different columns' values). One pass over the scores instead of
    ``topk``'s selection (32 x 100,000: 0.6 vs 4.4 ms). Block j holds columns j, j + B, j + 2 B, ... (B
    blocks), so the neighbouring rows of a gallery sorted by identity, where a query's top k often sit,
    fall in different blocks, and the value is the k-th highest unless two of the top k share one. Rows
    with fewer than k finite block maxima get their exact k-th highest."""
    n = scores.shape[1]
    width = n // (32 * k)  # columns per block
    if width < 8:
        return torch.topk(scores, k, dim=1).values[:, -1]
    blocks = n // width
    maxima = scores.unfold(1, blocks, blocks).amax(1)  # (Q, B): over the windows of B columns
    tail = n - width * blocks  # fewer than B columns left: column j of them into block j
    if tail:
        maxima[:, :tail] = torch.maximum(maxima[:, :tail], scores[:, width * blocks:])
    kth = torch.topk(maxima, k, dim=1).values[:, -1]
    few = torch.isneginf(kth).nonzero()[:, 0]  # e.g. a camera filter that leaves few rows
    if len(few):
        kth[few] = torch.topk(scores[few], k, dim=1).values[:, -1]
    return kth


def _highest_pairs(x: torch.Tensor, which: torch.Tensor, count: int, k: int) -> torch.Tensor:
    """Mask of the k pairs of highest ``x`` of each query that has pairs (at least k of them)."""
    counts = torch.bincount(which, minlength=count)
    top = _by_query(x, which, count).topk(k, dim=1).indices + (counts.cumsum(0) - counts)[:, None]
    chosen = torch.zeros(len(which), dtype=torch.bool)
    chosen[top[counts > 0].flatten()] = True
    return chosen


def _by_query(x: torch.Tensor, which: torch.Tensor, count: int, fill: float = -np.inf) -> torch.Tensor:
    """Values of (query, row) pairs, grouped by query (``which``, ascending), as a (count, most pairs) matrix
    padded with ``fill``."""
    counts = torch.bincount(which, minlength=count)
    position = torch.arange(len(which)) - (counts.cumsum(0) - counts)[which]
    out = torch.full((count, int(counts.max()) if len(which) else 0), fill, dtype=x.dtype)
    out[which, position] = x
    return out


_RESCORE_ROWS = 1024  # rows gathered at a time into one buffer: a fresh tensor per query costs page faults
# (32 queries x 308 rows of 3072: 56 ms with fresh tensors, 13 ms through one buffer, 2-core Xeon)


def _rescored(gallery: torch.Tensor, queries: torch.Tensor, which: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp32 scores of the (query, row) pairs: each row's inner product with its query, summed in fp64 and
    rounded once to fp32. Equal rows so score equally wherever they sit, in one call or in two (an fp32
    matrix-vector product rounds a row by its place in the block: copies of a row at the k-th place came back
    in that order, not lowest row first)."""
    out = torch.empty(len(rows), dtype=torch.float64)
    wide = queries.double()
    starts = torch.searchsorted(which, torch.arange(len(queries) + 1)).tolist()
    most = max((end - start for start, end in itertools.pairwise(starts)), default=0)  # a chunk is one query's
    buffer = torch.empty((min(_RESCORE_ROWS, most), gallery.shape[1]))
    buffer64 = torch.empty(buffer.shape, dtype=torch.float64)
    for i, (start, end) in enumerate(itertools.pairwise(starts)):
        for chunk in range(start, end, _RESCORE_ROWS):
            stop = min(chunk + _RESCORE_ROWS, end)
            block = torch.index_select(gallery, 0, rows[chunk:stop], out=buffer[:stop - chunk])
            torch.mv(buffer64[:stop - chunk].copy_(block), wide[i], out=out[chunk:stop])
    return out.float()


def _down(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> fp32, rounded down (a floor stays a floor)."""
    low = x.float()
    return torch.where(low.double() > x, torch.nextafter(low, torch.tensor(-math.inf)), low)

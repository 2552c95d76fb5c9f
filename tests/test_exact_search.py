"""The int8 and bf16 first passes of exact search (retrieval.exact): the same results as a float64 brute force
and as FAISS's IndexFlatIP, on galleries made to defeat them (near-ties below int8's and bf16's resolution, rows
of unequal length, camera filters that leave fewer than k rows), and a safe fall-back where a bound cannot hold."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from cgpn.engine import precision
from cgpn.errors import ConfigError
from cgpn.retrieval import FeatureFile, GalleryIndex, IndexSettings
from cgpn.retrieval import exact as exact_module
from cgpn.retrieval import index as index_module
from cgpn.retrieval.exact import Bf16FirstPass, Int8FirstPass, exact_search

PASSES = [Int8FirstPass, Bf16FirstPass]


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(gallery: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None):
    """Rows of the k highest float64 inner products (allowed rows only), highest first."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.where(np.isfinite(np.take_along_axis(scores, rows, 1)), rows, -1)


def _near_ties(d: int = 256, n: int = 5000, ties: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A query, and a gallery where ``ties`` rows score within 6e-4 of each other (bf16 resolves about 4e-3
    at a score of 1), 1e-5 apart: only fp32 can order them."""
    rng = np.random.default_rng(seed)
    query = _unit(1, d, seed + 1)
    other = rng.standard_normal((ties, d)).astype(np.float64)
    other -= (other @ query[0].astype(np.float64))[:, None] * query[0]  # orthogonal to the query
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    cos = 0.95 - 1e-5 * rng.permutation(ties)  # distinct, 1e-5 apart
    close = cos[:, None] * query[0] + np.sqrt(1 - cos[:, None] ** 2) * other
    gallery = np.concatenate([_unit(n - ties, d, seed + 2) * 0.5, close]).astype(np.float32)  # random rows score low
    gallery = gallery[rng.permutation(n)]
    return gallery / np.linalg.norm(gallery, axis=1, keepdims=True), query


def _made(kind: type, gallery: np.ndarray):
    """``kind`` made for ``gallery``, its construction-time check passed. Skipped only for int8 on a CPU without
    int8 dot products (VNNI, AMX), whose u8 x s8 instructions may saturate 16-bit sums: there the check keeps
    the search fp32, as test_an_int8_kernel_that_does_not_sum_exactly_is_not_used shows."""
    first = kind(torch.from_numpy(gallery))
    if not first.usable and kind is Int8FirstPass and not precision.cpu_has_int8_dot():
        pytest.skip("this CPU has no int8 dot-product instructions and its int8 kernel failed the exactness check")
    assert first.usable
    return first


@pytest.fixture
def full_scans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Shapes of the fp32 score matrices ranked in full: a first pass that did its job leaves none."""
    shapes: list[tuple[int, int]] = []
    ranked = exact_module._top

    def spy(scores: torch.Tensor, k: int, mask: torch.Tensor | None):
        shapes.append(tuple(scores.shape))
        return ranked(scores, k, mask)

    monkeypatch.setattr(exact_module, "_top", spy)
    return shapes


@pytest.mark.parametrize("kind", PASSES)
@pytest.mark.parametrize("k", [1, 10, 100])
def test_first_pass_equals_brute_force_and_faiss(kind: type, k: int, full_scans: list) -> None:
    gallery, queries = _unit(20_000, 256, 0), _unit(8, 256, 1)
    first = _made(kind, gallery)
    scores, rows = exact_search(torch.from_numpy(gallery), queries, k, first_pass=first)
    assert full_scans == []
    np.testing.assert_array_equal(rows, _brute_force(gallery, queries, k))
    peer = faiss.IndexFlatIP(256)
    peer.add(gallery)
    peer_scores, peer_rows = peer.search(queries, k)
    np.testing.assert_array_equal(rows, peer_rows)
    np.testing.assert_allclose(scores, peer_scores, atol=1e-6)


@pytest.mark.parametrize("kind", PASSES)
def test_first_pass_orders_rows_closer_than_it_can_tell_apart(kind: type, full_scans: list) -> None:
    gallery, query = _near_ties()
    first = _made(kind, gallery)
    top60 = _brute_force(gallery, query, 60)[0]
    rough = first.scores(torch.from_numpy(query)).values
    assert (np.diff(rough[0, top60].numpy()) >= 0).sum() > 20  # its scores alone tie or misorder many neighbours
    _, rows = exact_search(torch.from_numpy(gallery), query, 60, first_pass=first)
    np.testing.assert_array_equal(rows[0], top60)
    assert full_scans == []


@pytest.mark.parametrize("kind", PASSES)
def test_first_pass_with_rows_of_unequal_length_and_a_camera_filter(kind: type, full_scans: list) -> None:
    """The bound scales with the rows' lengths (zero rows included); a filter leaving fewer than k rows pads
    with -1 as FAISS does."""
    rng = np.random.default_rng(3)
    gallery = _unit(6000, 128, 4) * rng.uniform(0.2, 3.0, (6000, 1)).astype(np.float32)
    gallery[::500] = 0
    queries = _unit(5, 128, 5) * np.float32(7.0)
    first = _made(kind, gallery)
    for allowed in (rng.random(6000) < 0.3, np.arange(6000) < 4):
        _, rows = exact_search(torch.from_numpy(gallery), queries, 10, allowed, first_pass=first)
        np.testing.assert_array_equal(rows, _brute_force(gallery, queries, 10, allowed))
    assert (rows[:, 4:] == -1).all()
    assert full_scans == [(5, 6000)]  # 4 allowed rows, k 10: the five queries ranked in full, in one product


@pytest.mark.parametrize("kind", PASSES)
def test_a_camera_filter_whose_rows_sit_together_needs_no_full_scan(kind: type, full_scans: list) -> None:
    """Allowed rows in one run of the gallery (a gallery sorted by camera): fewer finite block maxima than k."""
    gallery, queries = _unit(20_000, 128, 6), _unit(4, 128, 7)
    allowed = (np.arange(20_000) >= 7_000) & (np.arange(20_000) < 7_040)
    _, rows = exact_search(torch.from_numpy(gallery), queries, 10, allowed, first_pass=_made(kind, gallery))
    np.testing.assert_array_equal(rows, _brute_force(gallery, queries, 10, allowed))
    assert full_scans == []


@pytest.mark.parametrize("n", [10_000, 10_007, 500])
def test_kth_at_most_is_a_floor_of_the_kth_score_and_exact_for_neighbouring_top_rows(n: int) -> None:
    """Block j of the B blocks holds columns j, j + B, ...: the top k of a gallery sorted by identity (side by
    side) fall in k blocks, and the value is exact; k top columns B apart share a block, and it is lower."""
    k, rng = 5, np.random.default_rng(n)
    width = n // (32 * k)  # columns per block; under 8: torch.topk itself
    scores = torch.from_numpy(rng.standard_normal((6, n)).astype(np.float32))
    scores[0] = scores[0].round(decimals=1)  # many ties
    scores[1, 40:40 + k] = 10 + torch.arange(k, dtype=torch.float32)  # the top k side by side
    scores[2] = -np.inf
    scores[2, -3:] = 1.0  # fewer than k finite scores: the k-th highest is -inf
    scores[3] = -np.inf
    scores[3, 100:100 + k + 1] = torch.arange(1, k + 2, dtype=torch.float32)  # k + 1 finite scores, side by side
    scores[4, -k:] = 20 + torch.arange(k, dtype=torch.float32)  # side by side in the last columns
    if width >= 8:
        scores[5, 3::n // width][:k] = 30 + torch.arange(k, dtype=torch.float32)  # all in block 3
    kth = torch.from_numpy(np.sort(scores.numpy(), axis=1)[:, -k])
    got = exact_module._kth_at_most(scores, k)
    assert (got <= kth).all()
    assert got[1] == 10 and got[2] == -np.inf and got[3] == 2.0 and got[4] == 20
    assert got[5] < 30 if width >= 8 else got[5] == kth[5]


def test_a_bf16_multiply_that_does_not_sum_in_fp32_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound assumes fp32 sums; a kernel summing in bf16 is caught at construction and the search stays fp32."""
    def bf16_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.bfloat16)
        for start in range(0, a.shape[1], 16):  # partial sums rounded to bf16
            out = (out.float() + a[:, start:start + 16].float() @ b[:, start:start + 16].float().T).bfloat16()
        return out

    gallery, query = _near_ties(d=128, n=3000)
    monkeypatch.setattr(exact_module.torch.nn.functional, "linear", bf16_sums)
    first = Bf16FirstPass(torch.from_numpy(gallery))
    assert not first.usable
    _, rows = exact_search(torch.from_numpy(gallery), query, 60, first_pass=first)
    np.testing.assert_array_equal(rows, _brute_force(gallery, query, 60))


class _SaturatingProduct(exact_module.Int8Product):
    """An int8 kernel of the kind x86's u8 x s8 instruction before VNNI (vpmaddubsw) makes: the query's codes
    shifted by 128 to unsigned, pairs of products summed in int16 with saturation, then 128 times the rows'
    sums taken off."""

    name = "saturating"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes, self.scales = codes.long(), scales

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        pairs = (codes.long() + 128)[:, None, :] * self.codes[None, :, :]
        pairs = pairs.view(len(codes), len(self.codes), -1, 2).sum(-1).clamp(-2**15, 2**15 - 1)
        return (pairs.sum(-1) - 128 * self.codes.sum(1)).float() * self.scales


def test_an_int8_kernel_that_does_not_sum_exactly_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound assumes exact int32 sums; a kernel saturating in 16 bits is caught at construction, as are a
    gallery holding NaN and a feature size whose int32 sums could overflow; the search stays exact."""
    gallery, query = _near_ties(d=128, n=3000)
    monkeypatch.setattr(exact_module, "INT8_PRODUCTS", (_SaturatingProduct,))
    first = Int8FirstPass(torch.from_numpy(gallery))
    assert not first.usable
    _, rows = exact_search(torch.from_numpy(gallery), query, 60, first_pass=first)
    np.testing.assert_array_equal(rows, _brute_force(gallery, query, 60))
    monkeypatch.undo()
    broken = gallery.copy()
    broken[7, 3] = np.nan
    assert not Int8FirstPass(torch.from_numpy(broken)).usable
    monkeypatch.setattr(exact_module, "INT8_MAX_DIM", 127)
    assert not Int8FirstPass(torch.from_numpy(gallery)).usable
    monkeypatch.undo()
    _made(Int8FirstPass, gallery)  # the real kernels, on a CPU with int8 dot products


def _available(kind: type) -> bool:
    try:
        kind(torch.zeros((2, 8), dtype=torch.int8), torch.ones(2))(torch.zeros((1, 8), dtype=torch.int8))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


@pytest.mark.parametrize("kind", exact_module.INT8_PRODUCTS)
def test_each_int8_product_sums_exactly_and_serves_the_search(kind: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every int8 kernel the pass may pick: products equal int64 sums times the row scales (fp32 rounding
    only), and a search through it equals the brute force's rows."""
    if not _available(kind):
        pytest.skip(f"{kind.name}: this torch build lacks the op")
    rng = np.random.default_rng(12)
    codes = torch.from_numpy(rng.integers(-127, 128, (700, 300), dtype=np.int8))
    scales = torch.from_numpy(rng.uniform(0.01, 2.0, 700).astype(np.float32))
    sample = torch.from_numpy(rng.integers(-127, 128, (9, 300), dtype=np.int8))
    expected = (sample.long() @ codes.long().T).double() * scales.double()
    monkeypatch.setattr(exact_module, "INT8_PRODUCTS", (kind,))
    gallery, query = _near_ties(d=128, n=3000)
    first = _made(Int8FirstPass, gallery)
    assert first.product.name == kind.name
    got = kind(codes, scales)(sample).double()
    assert got.shape == (9, 700)
    assert ((got - expected).abs() <= expected.abs() * 2.0**-22).all()
    _, rows = exact_search(torch.from_numpy(gallery), query, 60, first_pass=first)
    np.testing.assert_array_equal(rows, _brute_force(gallery, query, 60))


@pytest.mark.parametrize("kind", PASSES)
def test_queries_whose_scores_could_overflow_are_searched_in_fp32(kind: type, full_scans: list) -> None:
    """Rows and queries of length 1e18: first-pass scores near fp32's largest value could overflow, so those
    queries skip the bound and rank the fp32 scores in full (still the brute force's rows)."""
    gallery, queries = _unit(2000, 64, 13) * np.float32(1e18), _unit(3, 64, 14) * np.float32(1e18)
    _, rows = exact_search(torch.from_numpy(gallery), queries, 10, first_pass=_made(kind, gallery))
    np.testing.assert_array_equal(rows, _brute_force(gallery, queries, 10))
    assert full_scans == [(3, 2000)]  # the three queries in one product


@pytest.mark.parametrize("product", exact_module.INT8_PRODUCTS)
def test_int8_products_that_could_overflow_before_the_query_scale_are_not_trusted(
        product: type, full_scans: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of elements 3.3e38 whose code sum times its scale (made before the query's scale of 8e-8) overflows
    although its score (2.6e33) does not, beside rows that score less: the best row still comes first."""
    if not _available(product):
        pytest.skip(f"{product.name}: this torch build lacks the op")
    monkeypatch.setattr(exact_module, "INT8_PRODUCTS", (product,))
    step = 1e-5 / 127
    query = step * np.array([[127, 126.6, 126.4, 126.4]])  # codes 127, 127, 126, 126 and a residual
    best = np.array([127, 127, -127, -127]) * 2.6e36  # code sums 254 (high) and -3 x 127^2 (low): inf and -inf
    other = query[0] / np.linalg.norm(query[0]) * (query[0] @ best) / np.linalg.norm(query[0])
    gallery = np.array([best, *(other * np.linspace(0.95, -1.0, 40)[:, None])]).astype(np.float32)
    query = query.astype(np.float32)
    _, rows = exact_search(torch.from_numpy(gallery), query, 2, first_pass=_made(Int8FirstPass, gallery))
    np.testing.assert_array_equal(rows, _brute_force(gallery, query, 2))
    assert full_scans == [(1, 41)]


@pytest.mark.parametrize("kind", PASSES)
def test_a_score_that_overflows_to_inf_is_the_best_not_a_missing_row(kind: type) -> None:
    """A query of 3e38 whose product with one row overflows: that row comes first, as in the fp32 search."""
    gallery = _unit(40, 8, 17) * np.float32(0.1)
    gallery[3, 0] = 5.0
    query = np.zeros((1, 8), np.float32)
    query[0, 0] = 3e38
    scores, rows = exact_search(torch.from_numpy(gallery), query, 5, first_pass=kind(torch.from_numpy(gallery)))
    np.testing.assert_array_equal(rows, exact_search(torch.from_numpy(gallery), query, 5)[1])
    assert rows[0, 0] == 3 and scores[0, 0] == np.inf


@pytest.mark.parametrize("name", ["int8", "bf16"])
def test_index_first_pass_setting(name: str, tmp_path: Path) -> None:
    """first_pass is kept in the index file and used when asked, giving the brute force's rows; auto leaves
    small galleries fp32; an unknown value is a ConfigError."""
    gallery, queries = _unit(3000, 64, 6), _unit(4, 64, 7)
    GalleryIndex.build(FeatureFile([f"{i}.jpg" for i in range(3000)], gallery),
                       IndexSettings(first_pass=name)).save(tmp_path / "g.faiss")
    index = GalleryIndex.load(tmp_path / "g.faiss", mmap=True)
    assert index.settings.first_pass == name and index.first_pass(4).name == name
    np.testing.assert_array_equal(index.search(queries, 20)[1], _brute_force(gallery, queries, 20))
    index.settings.first_pass = "auto"
    assert index.first_pass(1) is None  # 192,000 values: below MIN_VALUES
    with pytest.raises(ConfigError, match="--first-pass must be one of auto, int8, bf16, off, got 'fp16'"):
        GalleryIndex.build(FeatureFile(["a.jpg"], gallery[:1]), IndexSettings(first_pass="fp16"))


@pytest.mark.parametrize(("flags", "native", "queries", "expected"), [
    ({"avx512_vnni", "avx512_bf16"}, True, 32, "int8"), ({"avx_vnni"}, False, 1, "int8"), (set(), True, 4, "bf16"),
    (set(), True, 64, "bf16"), (set(), False, 2, "bf16"), (set(), False, 3, None)])
def test_auto_takes_int8_on_cpus_with_int8_dot_products_else_bf16_where_it_can_pay(
        flags: set, native: bool, queries: int, expected: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto on a large gallery (MIN_VALUES lowered here), where nothing was timed: int8 where /proc/cpuinfo lists
    VNNI or AMX int8, else bf16 on a CPU with native bf16 and for up to 2 queries where it is emulated, else fp32."""
    monkeypatch.setattr(exact_module, "MIN_VALUES", 1000)
    monkeypatch.setattr(precision, "cpu_info", lambda: ("test CPU", frozenset(flags), 2))
    monkeypatch.setattr(exact_module, "cpu_has_native_bf16", lambda: native)
    gallery = _unit(500, 32, 8)
    index = GalleryIndex.build(FeatureFile([f"{i}.jpg" for i in range(500)], gallery), IndexSettings())
    chosen = index.first_pass(queries)
    assert (chosen.name if chosen else None) == expected


@pytest.mark.parametrize("kind", [None, *PASSES])
def test_rows_tied_at_the_kth_score_come_lowest_row_first(kind: type | None) -> None:
    """20 copies of the best row, k = 5: the five lowest of those rows, as a stable sort ranks them (topk alone
    picks among equal scores in no specified order); k = 0 gives empty results."""
    gallery, query = _unit(3000, 64, 9), _unit(1, 64, 10)
    copies = np.sort(np.random.default_rng(11).choice(3000, 20, replace=False))
    gallery[copies] = query[0]
    first = None if kind is None else kind(torch.from_numpy(gallery))
    _, rows = exact_search(torch.from_numpy(gallery), query, 5, first_pass=first)
    np.testing.assert_array_equal(rows[0], copies[:5])
    scores, rows = exact_search(torch.from_numpy(gallery), query, 0, first_pass=first)
    assert scores.shape == rows.shape == (1, 0)


@pytest.mark.parametrize("kind", PASSES)
@pytest.mark.parametrize("seed", range(6))
def test_copies_of_a_row_across_the_kth_place_come_lowest_row_first(kind: type, seed: int) -> None:
    """30 copies of a row ranked 4th to 33rd, k = 10: the 7 lowest copies, after the 3 better rows. Copies
    re-scored in fp32 blocks came back by where they sat in the block (last-bit rounding); fp64 sums don't."""
    rng = np.random.default_rng(seed)
    d = int(rng.choice([64, 128, 256, 300]))
    gallery, query = _unit(4000, d, seed), _unit(1, d, seed + 100)
    copies = np.sort(rng.choice(4000, 30, replace=False))
    better = rng.choice(np.setdiff1d(np.arange(4000), copies), 3, replace=False)
    row = query[0] * 0.8 + _unit(1, d, seed + 200)[0] * 0.6
    gallery[copies], gallery[better] = row / np.linalg.norm(row), query[0]
    _, rows = exact_search(torch.from_numpy(gallery), query, 10, first_pass=_made(kind, gallery))
    np.testing.assert_array_equal(rows[0], np.concatenate([np.sort(better), copies[:7]]))


@pytest.mark.parametrize("gallery_first", [False, True])
def test_both_operand_orders_of_the_fp32_product_give_the_brute_force(gallery_first: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``fp32_scores`` as ``q @ g.T`` or ``(g @ q.T).T``: the same scores up to fp32 rounding, the same rows,
    with and without a camera filter, for every batch size bucket."""
    monkeypatch.setattr(exact_module, "MIN_VALUES", 1000)
    monkeypatch.setattr(exact_module, "_gallery_first", {})
    monkeypatch.setattr(exact_module, "_timed_gallery_first", lambda rows, count: gallery_first)
    gallery = _unit(3000, 64, seed=7)
    allowed = np.random.default_rng(8).random(3000) < 0.3
    for count in (1, 3, 8, 33):
        queries = _unit(count, 64, seed=count)
        scores = exact_module.fp32_scores(torch.from_numpy(gallery), torch.from_numpy(queries))
        exact = queries.astype(np.float64) @ gallery.astype(np.float64).T
        assert scores.shape == (count, 3000) and scores.is_contiguous()
        assert np.abs(scores.numpy() - exact).max() < 64 * 2.0**-24 * 2  # gamma_d for unit rows, with room
        for mask in (None, allowed):
            _, rows = exact_search(torch.from_numpy(gallery), queries, 10, mask)
            assert (rows == _brute_force(gallery, queries, 10, mask)).all()
    assert set(exact_module._gallery_first) == {(64, 1), (64, 4), (64, 8), (64, 64)}


@pytest.mark.parametrize("slower", [False, True])
def test_the_faster_operand_order_is_taken_and_timed_once_per_batch_size(slower: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    product = exact_module._product

    def timed(gallery: torch.Tensor, queries: torch.Tensor, gallery_first: bool) -> torch.Tensor:
        if gallery_first == slower:
            time.sleep(0.01)
        return product(gallery, queries, gallery_first)

    monkeypatch.setattr(exact_module, "_product", timed)
    monkeypatch.setattr(exact_module, "MIN_VALUES", 1000)
    monkeypatch.setattr(exact_module, "_gallery_first", {})
    gallery = torch.from_numpy(_unit(2000, 32, seed=1))
    exact_module.fp32_scores(gallery, gallery[:5])
    assert exact_module._gallery_first == {(32, 8): not slower}
    monkeypatch.setattr(exact_module, "_timed_gallery_first", lambda *a: pytest.fail("timed again"))
    exact_module.fp32_scores(gallery, gallery[:7])  # the same bucket (5..8 queries)
    monkeypatch.setattr(exact_module, "MIN_VALUES", 10**9)
    exact_module.fp32_scores(gallery, gallery[:100])  # a small gallery: q @ g.T, nothing timed


def test_prepare_times_every_batch_size_a_server_can_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GalleryIndex.prepare(48)``: the operand order of 1, 2, 4, ..., 32 and 48 (bucket 64) queries timed at
    once, the first passes auto takes made; later searches time nothing."""
    monkeypatch.setattr(exact_module, "MIN_VALUES", 1000)
    monkeypatch.setattr(exact_module, "_gallery_first", {})
    timed = []
    monkeypatch.setattr(exact_module, "_timed_gallery_first", lambda rows, count: timed.append(count) or False)
    monkeypatch.setattr(exact_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_info", lambda: ("test CPU", frozenset(), 2))  # no int8 dot products
    gallery = _unit(3000, 32, 9)
    index = GalleryIndex.build(FeatureFile([f"{i}.jpg" for i in range(3000)], gallery), IndexSettings())
    index.prepare(48)
    assert timed == [1, 2, 4, 8, 16, 32, 64]
    assert set(index._first_passes) == {"bf16"}  # 1-2 queries where bf16 is emulated
    monkeypatch.setattr(exact_module, "_timed_gallery_first", lambda *a: pytest.fail("timed in a search"))
    for count in (1, 3, 17, 48):
        assert (index.search(gallery[:count], 5)[1][:, 0] == np.arange(count)).all()
    # a larger --max-batch: searches of 64 queries stand for every larger batch (bucket 64), none of more is timed
    searched = []
    monkeypatch.setattr(index_module, "fastest_first_pass", lambda g, candidates, count: searched.append(count))
    GalleryIndex.build(FeatureFile([f"{i}.jpg" for i in range(3000)], gallery), IndexSettings()).prepare(1000)
    assert searched == [1, 2, 4, 8, 16, 32, 64]


def test_prepare_takes_the_fastest_search_for_each_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``prepare`` timed them, auto takes for each batch size the search that ran fastest (here made slow
    on purpose: the fp32 product always, int8 for 4 queries or more, bf16 for fewer), and the results stay
    exact; a pass slower than fp32 everywhere is not taken."""
    import time

    monkeypatch.setattr(exact_module, "MIN_VALUES", 1000)
    monkeypatch.setattr(exact_module, "_timed_gallery_first", lambda rows, count: False)
    monkeypatch.setattr(precision, "cpu_info", lambda: ("test CPU", frozenset({"avx512_vnni"}), 2))
    monkeypatch.setattr(exact_module, "cpu_has_native_bf16", lambda: True)
    slow = {"fp32": lambda count: True, "int8": lambda count: count >= 4, "bf16": lambda count: count < 4}
    fp32 = exact_module.fp32_scores
    monkeypatch.setattr(exact_module, "fp32_scores", lambda g, q: (time.sleep(0.03) if slow["fp32"](len(q)) else None)
                        or fp32(g, q))
    for kind in PASSES:
        monkeypatch.setattr(kind, "scores", lambda self, q, scores=kind.scores: (
            time.sleep(0.03) if slow[self.name](len(q)) else None) or scores(self, q))
    gallery = _unit(3000, 32, 12)
    names = [f"{i}.jpg" for i in range(3000)]
    index = GalleryIndex.build(FeatureFile(names, gallery), IndexSettings())
    index.prepare(24)
    assert index._fastest == {1: "int8", 2: "int8", 4: "bf16", 8: "bf16", 16: "bf16", 32: "bf16"}
    for count, expected in ((1, "int8"), (3, "bf16"), (24, "bf16"), (40, "bf16")):  # 40: the largest bucket timed
        assert index.first_pass(count).name == expected
        queries = _unit(count, 32, 13 + count)
        np.testing.assert_array_equal(index.search(queries, 10)[1], _brute_force(gallery, queries, 10))
    slow.update(fp32=lambda count: False, int8=lambda count: True, bf16=lambda count: True)
    again = GalleryIndex.build(FeatureFile(names, gallery), IndexSettings())
    again.prepare(4)
    assert again._fastest == {1: None, 2: None, 4: None} and again.first_pass(3) is None

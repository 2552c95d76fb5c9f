"""cgpn.metrics.rank against fast-reid's evaluators (Python and Cython), a hand-worked case, a literal port
of the official Market-1501 AP code, and a brute-force stable-sort reference for the tie rule."""

from __future__ import annotations

from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
import torch

import cgpn.metrics.rank as rank_mod
from _memory import HAS_PROC, peak_above_start
from cgpn.errors import ConfigError, DatasetError
from cgpn.metrics.rank import evaluate, evaluate_features, pairwise_distance
from fastreid_ref import build_rank_cy, load_rank


@pytest.fixture(scope="session")
def rank_cy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """fast-reid's Cython evaluator, compiled once (kept in pytest's cache folder when there is one)."""
    cache = getattr(request.config, "cache", None)
    return build_rank_cy(Path(cache.mkdir("fastreid_rank_cy")) if cache else tmp_path_factory.mktemp("rank_cy"))


@pytest.fixture(scope="session")
def fr_rank():
    return load_rank()


# --- references written here ---------------------------------------------------------------------------


def market_ap(index: np.ndarray, good: set[int], junk: set[int]) -> float:
    """compute_AP.m of the official Market-1501 evaluation code, line by line."""
    ap, old_recall, old_precision = 0.0, 0.0, 1.0
    intersect, j, good_now, ngood = 0, 0, 0, len(good)
    for n in index:
        flag = n in good
        good_now += flag
        if n in junk:
            continue
        intersect += flag
        recall, precision = intersect / ngood, intersect / (j + 1)
        ap += (recall - old_recall) * ((old_precision + precision) / 2)
        old_recall, old_precision = recall, precision
        j += 1
        if good_now == ngood:
            return ap
    return ap


def brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
    """The protocol written as plainly as possible: stable sort per query, filter, walk the list."""
    aps, market, inps, firsts = [], [], [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        junk = (g_pids[order] == -1) | ((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        good = g_pids[order][~junk] == q_pids[i]
        if not good.any():
            aps.append(np.nan), market.append(np.nan), inps.append(np.nan), firsts.append(-1)
            continue
        ranks = np.flatnonzero(good) + 1  # 1-based ranks of the true matches among valid items
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
        firsts.append(ranks[0] - 1)
        good_set = set(np.flatnonzero((g_pids == q_pids[i]) & (g_cams != q_cams[i])).tolist())
        junk_set = set(np.flatnonzero((g_pids == -1) | ((g_pids == q_pids[i]) & (g_cams == q_cams[i]))).tolist())
        market.append(market_ap(order, good_set, junk_set))
    firsts = np.array(firsts)
    valid = firsts >= 0
    cmc = np.array([(firsts[valid] <= k).mean() for k in range(max_rank)])
    return cmc, np.array(aps), np.array(market), np.array(inps), firsts


# --- random tie-free cases ----------------------------------------------------------------------------


def random_case(seed: int, nq: int, ng: int, nid: int, ncam: int, junk: float = 0.0, distractors: float = 0.0):
    """Tie-free float32 distances (a permutation of distinct integers) and labels, with the edge cases:
    a query whose identity is only in its own camera, one whose identity is not in the gallery at all,
    junk (pid -1) and distractors (pid 0)."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, nid + 1, nq)
    g_pids = rng.integers(1, nid + 1, ng)
    q_cams, g_cams = rng.integers(0, ncam, nq), rng.integers(0, ncam, ng)
    g_pids[rng.random(ng) < distractors] = 0
    g_pids[rng.random(ng) < junk] = -1
    if nq > 2:
        q_pids[0] = nid + 1  # only in the query's own camera
        g_pids[:3], g_cams[:3], q_cams[0] = nid + 1, 0, 0
        q_pids[1] = nid + 2  # not in the gallery
    distmat = rng.permutation(nq * ng).reshape(nq, ng).astype(np.float32)
    return distmat, q_pids, g_pids, q_cams, g_cams


CASES = [  # seed, queries, gallery, identities, cameras, junk, distractor fractions
    (0, 1, 40, 3, 2, 0.0, 0.0),  # a single query
    (1, 12, 60, 4, 2, 0.1, 0.2),
    (2, 50, 400, 20, 6, 0.05, 0.1),
    (3, 100, 150, 60, 3, 0.0, 0.3),  # many queries without a valid match
    (4, 200, 2000, 100, 6, 0.1, 0.15),
]


@pytest.mark.parametrize("case", CASES)
def test_equals_fastreid_python_and_cython(case, rank_cy, fr_rank):
    distmat, q_pids, g_pids, q_cams, g_cams = random_case(*case)
    keep = g_pids != -1  # fast-reid never sees junk (its data sets drop it); cgpn removes it itself
    args = (distmat[:, keep], q_pids, g_pids[keep], q_cams, g_cams[keep])
    max_rank = 10
    r = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    cy_cmc, cy_ap, cy_inp = rank_cy.evaluate_cy(*args, max_rank)
    py_cmc, py_ap, py_inp = fr_rank.eval_market1501(*args, max_rank)
    valid = r.first_match >= 0
    assert r.num_valid == len(cy_ap) == len(py_ap)
    assert r.num_skipped == len(q_pids) - r.num_valid
    if len(q_pids) > 2:
        assert r.first_match[0] == -1 and r.first_match[1] == -1  # the two queries without a valid match
    for cmc, ap, inp in ((cy_cmc, cy_ap, cy_inp), (py_cmc, py_ap, py_inp)):
        np.testing.assert_allclose(r.cmc, cmc, atol=1e-6, rtol=0)
        np.testing.assert_allclose(r.ap[valid], ap, atol=1e-6, rtol=0)
        np.testing.assert_allclose(r.inp[valid], inp, atol=1e-6, rtol=0)
        assert abs(r.mAP - np.mean(ap)) < 1e-6 and abs(r.mINP - np.mean(inp)) < 1e-6


@pytest.mark.parametrize("case", CASES[1:4])
def test_market_ap_and_brute_force(case):
    distmat, q_pids, g_pids, q_cams, g_cams = random_case(*case)
    cmc, ap, market, inp, first = brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    r = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    rm = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10, ap_mode="market")
    np.testing.assert_array_equal(r.first_match, first)
    np.testing.assert_allclose(r.ap, ap, atol=1e-9, rtol=0)
    np.testing.assert_allclose(rm.ap, market, atol=1e-9, rtol=0)
    np.testing.assert_allclose(r.inp, inp, atol=1e-9, rtol=0)
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-12, rtol=0)
    assert np.nanmean(market) != pytest.approx(np.nanmean(ap))  # the two AP rules do differ


def test_hand_case():
    #            g0    g1    g2    g3    g4    g5    g6    g7
    g_pids = [1, 2, 1, -1, 0, 1, 3, 1]
    g_cams = [0, 1, 1, 1, 2, 2, 0, 1]
    distmat = np.array([
        [0.05, 0.10, 0.20, 0.25, 0.30, 0.40, 0.50, 0.60],  # q0: pid 1, cam 0
        [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80],  # q1: pid 2, cam 1
        [0.90, 0.80, 0.70, 0.05, 0.60, 0.50, 0.10, 0.40],  # q2: pid 3, cam 1
    ])
    # q0: g0 (same pid, same cam) and g3 (junk) are removed; the valid list is g1 g2* g4 g5* g6 g7*
    #     (* = true match), so the matches rank 2, 4, 6 (the pid-0 distractor g4 counts as a wrong match).
    #     AP = (1/2 + 2/4 + 3/6) / 3 = 1/2;  INP = 3/6 = 1/2;  first match at rank 2.
    #     Market AP: (precision before + precision at) / 2 per match, averaged:
    #     ((0/1 + 1/2)/2 + (1/3 + 2/4)/2 + (2/5 + 3/6)/2) / 3 = (1/4 + 5/12 + 9/20) / 3 = 67/180.
    # q1: its only pid-2 image (g1) is in its own camera: no valid match, skipped.
    # q2: g3 (junk, closest) is removed, so g6 (pid 3, cam 0) is first: AP = INP = Market AP = 1.
    # Over the 2 valid queries: Rank-1 = 1/2, Rank-2 = 1, mAP = mINP = (1/2 + 1)/2 = 3/4,
    # Market mAP = (67/180 + 1)/2 = 247/360.
    labels = (np.array([1, 2, 3]), np.array(g_pids), np.array([0, 1, 1]), np.array(g_cams))
    r = evaluate(distmat, *labels, max_rank=4)
    assert (r.num_valid, r.num_skipped) == (2, 1)
    assert r.first_match.tolist() == [1, -1, 0]
    np.testing.assert_allclose(r.cmc, [1 / 2, 1, 1, 1])
    assert r.mAP == pytest.approx(float(F(3, 4))) and r.mINP == pytest.approx(float(F(3, 4)))
    np.testing.assert_allclose(r.ap, [0.5, np.nan, 1.0])
    rm = evaluate(distmat, *labels, max_rank=4, ap_mode="market")
    assert rm.ap[0] == pytest.approx(float(F(67, 180))) and rm.mAP == pytest.approx(float(F(247, 360)))
    assert rm.cmc.tolist() == r.cmc.tolist() and rm.mINP == r.mINP
    assert "mAP(market) 68.6" in rm.summary() and "1 queries without a match skipped" in r.summary()


def test_tie_rule_is_stable_by_gallery_index():
    # every distance equal: items are ranked in gallery order
    #   g0 (pid 4, cam 1), g1 (2), g2 (1, cam 1), g3 (3), g4 (1, cam 2), g5 (4, cam 2), g6 (3), g7 (2)
    # q0 (pid 1, cam 0): matches g2, g4 at ranks 3 and 5: AP = (1/3 + 2/5)/2 = 11/30, INP = 2/5
    # q1 (pid 4, cam 0): matches g0, g5 at ranks 1 and 6: AP = (1/1 + 2/6)/2 = 2/3,   INP = 2/6
    g_pids = np.array([4, 2, 1, 3, 1, 4, 3, 2])
    g_cams = np.array([1, 1, 1, 1, 2, 2, 1, 1])
    distmat = np.full((2, 8), 0.5, dtype=np.float32)
    r = evaluate(distmat, np.array([1, 4]), g_pids, np.array([0, 0]), g_cams, max_rank=3)
    assert r.first_match.tolist() == [2, 0]
    np.testing.assert_allclose(r.ap, [11 / 30, 2 / 3])
    np.testing.assert_allclose(r.inp, [2 / 5, 2 / 6])
    # partial ties everywhere (distances from a handful of values): the brute-force stable sort agrees
    rng = np.random.default_rng(7)
    distmat = rng.integers(0, 4, size=(30, 300)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 8, 30), rng.integers(-1, 8, 300)
    q_cams, g_cams = rng.integers(0, 3, 30), rng.integers(0, 3, 300)
    cmc, ap, _, inp, first = brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    r = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    np.testing.assert_array_equal(r.first_match, first)
    np.testing.assert_allclose(r.ap, ap, atol=1e-12)
    np.testing.assert_allclose(r.inp, inp, atol=1e-12)
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-12)


def test_numpy_torch_float64_and_blocks_agree(rank_cy):
    distmat, q_pids, g_pids, q_cams, g_cams = random_case(2, 50, 400, 20, 6, 0.0, 0.1)
    ref = evaluate(distmat, q_pids, g_pids, q_cams, g_cams)
    variants = [
        evaluate(torch.from_numpy(distmat), *(torch.from_numpy(a) for a in (q_pids, g_pids, q_cams, g_cams))),
        evaluate(distmat.astype(np.float64), q_pids, g_pids, q_cams, g_cams),
        evaluate(distmat, q_pids, g_pids, q_cams, g_cams, memory_mb=0.02),  # blocks of a few queries
    ]
    for r in variants:
        np.testing.assert_allclose(r.ap, ref.ap, atol=1e-12)
        np.testing.assert_array_equal(r.first_match, ref.first_match)
        np.testing.assert_array_equal(r.cmc, ref.cmc)
    cmc, _, _ = rank_cy.evaluate_cy(distmat, q_pids, g_pids, q_cams, g_cams, 50)
    np.testing.assert_allclose(ref.cmc, cmc, atol=1e-6)


def test_evaluate_features_equals_distance_path(rank_cy):
    # +-1 features in 16-d: norms are 4, so normalised values, dot products and distances are exact in
    # float32 whatever the block shapes; the many exact ties also exercise the tie rule on this path
    rng = np.random.default_rng(3)
    qf = rng.choice([-1.0, 1.0], (80, 16)).astype(np.float32)
    gf = rng.choice([-1.0, 1.0], (700, 16)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 30, 80), rng.integers(-1, 30, 700)
    q_cams, g_cams = rng.integers(0, 4, 80), rng.integers(0, 4, 700)
    for metric in ("cosine", "euclidean"):
        distmat = pairwise_distance(qf, gf, metric).numpy()
        r = evaluate(distmat, q_pids, g_pids, q_cams, g_cams)
        rf = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, memory_mb=0.2)
        np.testing.assert_allclose(rf.ap, r.ap, atol=1e-12)
        np.testing.assert_array_equal(rf.first_match, r.first_match)
        cmc, ap, _, _, _ = brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50)
        np.testing.assert_allclose(rf.ap, ap, atol=1e-12)
        np.testing.assert_allclose(rf.cmc, cmc, atol=1e-12)
    # and on continuous (tie-free) features against fast-reid
    qf, gf = rng.standard_normal((80, 32)).astype(np.float32), rng.standard_normal((700, 32)).astype(np.float32)
    rf = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, memory_mb=0.2)
    distmat = pairwise_distance(qf, gf).numpy()
    keep = g_pids != -1
    cmc, ap, inp = rank_cy.evaluate_cy(distmat[:, keep], q_pids, g_pids[keep], q_cams, g_cams[keep], 50)
    np.testing.assert_allclose(rf.cmc, cmc, atol=1e-6)
    np.testing.assert_allclose(rf.ap[rf.first_match >= 0], ap, atol=1e-6)
    np.testing.assert_allclose(rf.inp[rf.first_match >= 0], inp, atol=1e-6)


def test_gallery_without_any_match(rank_cy):
    distmat, q_pids, _, q_cams, g_cams = random_case(1, 12, 60, 4, 2)
    g_pids = np.full(60, 99)
    with pytest.raises(DatasetError, match="none of the 12 queries"):
        evaluate(distmat, q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(AssertionError):  # fast-reid refuses too
        rank_cy.evaluate_cy(distmat, q_pids, g_pids, q_cams, g_cams, 10)


def test_user_errors():
    distmat, q_pids, g_pids, q_cams, g_cams = random_case(1, 12, 60, 4, 2)
    with pytest.raises(ConfigError, match=r"test.ap_mode .*standard.*'trapezoid'"):
        evaluate(distmat, q_pids, g_pids, q_cams, g_cams, ap_mode="trapezoid")
    with pytest.raises(DatasetError, match="g_pids must hold one integer per gallery item"):
        evaluate(distmat, q_pids, g_pids[:-1], q_cams, g_cams)
    with pytest.raises(ConfigError, match=r"test\.memory_mb"):
        evaluate_features(np.ones((2, 4)), np.ones((10**6, 4)), [1, 2], np.ones(10**6, int), [0, 0],
                          np.ones(10**6, int), memory_mb=1)
    with pytest.raises(ConfigError, match=r"test\.distance"):
        pairwise_distance(np.ones((2, 4)), np.ones((3, 4)), metric="manhattan")


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_blockwise_memory_is_bounded():
    # 1,000 x 30,000: the whole distance matrix would be 120 MB; blocks of 8 MB must stay far below
    rng = np.random.default_rng(0)
    qf = torch.from_numpy(rng.standard_normal((1000, 16), dtype=np.float32))
    gf = torch.from_numpy(rng.standard_normal((30000, 16), dtype=np.float32))
    q_pids, g_pids = rng.integers(0, 300, 1000), rng.integers(0, 300, 30000)
    q_cams, g_cams = rng.integers(0, 6, 1000), rng.integers(0, 6, 30000)
    evaluate_features(qf[:20], gf, q_pids[:20], g_pids, q_cams[:20], g_cams, memory_mb=8)  # warm up
    peak, _ = peak_above_start(lambda: evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, memory_mb=8))
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MB"
    distmat = pairwise_distance(qf[:300], gf).numpy()  # 36 MB, not copied by evaluate
    peak, _ = peak_above_start(lambda: evaluate(distmat, q_pids[:300], g_pids, q_cams[:300], g_cams,
                                                memory_mb=8))
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.0f} MB"


def test_whole_row_sort_path_on_cpu(monkeypatch, rank_cy):
    # the GPU algorithm (sort whole rows of a block) run on the CPU: same numbers, ties included
    monkeypatch.setattr(rank_mod, "_sorts_whole_rows", lambda device: True)
    distmat, q_pids, g_pids, q_cams, g_cams = random_case(*CASES[4])
    keep = g_pids != -1
    r = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    cmc, ap, inp = rank_cy.evaluate_cy(distmat[:, keep], q_pids, g_pids[keep], q_cams, g_cams[keep], 10)
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-6)
    np.testing.assert_allclose(r.ap[r.first_match >= 0], ap, atol=1e-6)
    distmat = np.random.default_rng(1).integers(0, 3, size=distmat.shape).astype(np.float32)  # ties
    _, ap, market, inp, first = brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    r = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10, ap_mode="market", memory_mb=0.5)
    np.testing.assert_array_equal(r.first_match, first)
    np.testing.assert_allclose(r.ap, market, atol=1e-12)
    np.testing.assert_allclose(r.inp, inp, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stays_on_gpu_and_agrees():
    distmat, q_pids, g_pids, q_cams, g_cams = random_case(4, 200, 2000, 100, 6, 0.1, 0.15)
    ref = evaluate(distmat, q_pids, g_pids, q_cams, g_cams)
    cuda = [torch.from_numpy(a).cuda() for a in (distmat, q_pids, g_pids, q_cams, g_cams)]
    r = evaluate(*cuda)
    np.testing.assert_allclose(r.ap, ref.ap, atol=1e-12)
    np.testing.assert_array_equal(r.first_match, ref.first_match)
    rng = np.random.default_rng(0)  # +-1 features: exact distances on any device (see above)
    qf = torch.from_numpy(rng.choice([-1.0, 1.0], (300, 16)).astype(np.float32))
    gf = torch.from_numpy(rng.choice([-1.0, 1.0], (3000, 16)).astype(np.float32))
    labels = [rng.integers(0, 50, 300), rng.integers(0, 50, 3000), rng.integers(0, 4, 300), rng.integers(0, 4, 3000)]
    rf = evaluate_features(qf.cuda(), gf.cuda(), *labels, memory_mb=1)
    rc = evaluate(pairwise_distance(qf, gf), *labels)
    np.testing.assert_allclose(rf.ap, rc.ap, atol=1e-12)
    np.testing.assert_array_equal(rf.first_match, rc.first_match)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_pairwise_distance_equals_scipy(metric):
    """Against scipy's cdist (on unit-length rows for cosine, SPEC 8), in float64."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(3)
    qf, gf = rng.standard_normal((7, 12)), 3 * rng.standard_normal((30, 12))
    a, b = (qf / np.linalg.norm(qf, axis=1, keepdims=True), gf / np.linalg.norm(gf, axis=1, keepdims=True)) \
        if metric == "cosine" else (qf, gf)
    np.testing.assert_allclose(pairwise_distance(qf, gf, metric).numpy(), cdist(a, b), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_are_ranked_in_float32(dtype):
    """Half-precision features (e.g. from autocast) are widened before the distances are taken: the result
    is that of the same values in float32, not of distances rounded to 8-11 bits."""
    rng = np.random.default_rng(4)
    qf = torch.from_numpy(rng.standard_normal((40, 64)).astype(np.float32)).to(dtype)
    gf = torch.from_numpy(rng.standard_normal((400, 64)).astype(np.float32)).to(dtype)
    q_pids, g_pids = rng.integers(0, 20, 40), rng.integers(0, 20, 400)
    q_cams, g_cams = np.zeros(40, int), np.ones(400, int)
    got = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams)
    want = evaluate_features(qf.float(), gf.float(), q_pids, g_pids, q_cams, g_cams)
    np.testing.assert_array_equal(got.ap, want.ap)
    assert pairwise_distance(qf, gf.double()).dtype == torch.float64  # mixed: the wider type


def test_nan_features_or_distances_are_one_clear_error():
    qf, gf = np.ones((2, 4)), np.ones((3, 4))
    qf[1, 2] = np.nan
    with pytest.raises(DatasetError, match="query features contain NaN"):
        evaluate_features(qf, gf, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
    d = np.full((2, 3), 0.5)
    d[0, 1] = np.nan
    with pytest.raises(DatasetError, match="distmat contains NaN"):
        evaluate(d, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
    with pytest.raises(ConfigError, match="ranks count from 1, got rank 0"):
        evaluate(np.full((1, 2), 0.5), [1], [1, 2], [0], [1, 1]).rank(0)

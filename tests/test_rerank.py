"""cgpn.metrics.rerank against fast-reid's re_ranking (evaluation/rerank.py), its wiring into evaluation
and the CLI, and its memory bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from _memory import HAS_PROC, peak_above_start
from cgpn.config import Config, apply_overrides
from cgpn.engine import evaluation
from cgpn.errors import ConfigError
from cgpn.metrics.rank import evaluate, pairwise_distance
from cgpn.metrics.rerank import rerank
from fastreid_ref import load_rerank


@pytest.fixture(scope="module")
def re_ranking():
    return load_rerank().re_ranking


def clustered(seed: int, nq: int, ng: int, dim: int, ids: int):
    """Features of ``ids`` identities (centre + noise) with labels and cameras, like a network's output."""
    rng = np.random.default_rng(seed)
    pids = rng.integers(0, ids, nq + ng)
    x = rng.standard_normal((ids, dim))[pids] + 0.8 * rng.standard_normal((nq + ng, dim))
    cams = rng.integers(0, 4, nq + ng)
    x = torch.from_numpy(x.astype(np.float32))
    return x[:nq], x[nq:], pids[:nq], pids[nq:], cams[:nq], cams[nq:]


def scipy_distance(a, b, metric="cosine"):
    """The distances by an independent route: scipy's cdist, on unit-length rows for ``cosine`` (SPEC 8)."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    if metric == "cosine":
        a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    return cdist(a, b).astype(np.float32)


def reference(re_ranking, qf, gf, k1, k2, lam, metric="cosine"):
    dist = [scipy_distance(a, b, metric) for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    return re_ranking(*dist, k1=k1, k2=k2, lambda_value=lam)


@pytest.mark.parametrize(("seed", "nq", "ng", "dim", "ids", "k1", "k2", "lam", "memory_mb"), [
    (0, 30, 200, 16, 20, 20, 6, 0.3, 512),  # the paper's settings, one tile
    (1, 50, 700, 32, 60, 20, 6, 0.3, 0.1),  # tiles of 80 items: screening across tiles, short last groups
    (2, 10, 90, 8, 9, 7, 3, 0.5, 0.02),  # tiles of 32
    (3, 40, 300, 16, 30, 9, 1, 0.0, 512),  # k2 = 1: no query expansion; lambda 0: Jaccard only
    (4, 3, 12, 8, 4, 20, 6, 0.3, 512),  # fewer items than k1 + 1
    (5, 1, 64, 8, 8, 20, 6, 1.0, 512),  # a single query; lambda 1: original distance only
    (7, 10, 100, 16, 10, 4, 6, 0.3, 512),  # k2 > k1 + 1: the query expansion reaches past the k1 lists
    (8, 20, 150, 16, 15, 3, 30, 0.3, 0.1),  # ... far past, in small tiles
])
def test_equals_fastreid(re_ranking, seed, nq, ng, dim, ids, k1, k2, lam, memory_mb):
    qf, gf, q_pids, g_pids, q_cams, g_cams = clustered(seed, nq, ng, dim, ids)
    ref = reference(re_ranking, qf, gf, k1, k2, lam)
    out = rerank(qf, gf, k1=k1, k2=k2, lambda_value=lam, memory_mb=memory_mb)
    assert out.shape == (nq, ng) and out.dtype == torch.float32
    assert np.abs(out.numpy() - ref).max() <= 1e-5
    if len(set(q_pids) & set(g_pids)):
        r, rr = evaluate(out, q_pids, g_pids, q_cams, g_cams), evaluate(ref, q_pids, g_pids, q_cams, g_cams)
        assert abs(r.mAP - rr.mAP) <= 1e-4 and abs(r.rank(1) - rr.rank(1)) <= 1e-4


def test_euclidean_and_numpy_inputs(re_ranking):
    qf, gf, *_ = clustered(6, 20, 150, 12, 15)
    ref = reference(re_ranking, qf, gf, 20, 6, 0.3, metric="euclidean")
    out = rerank(qf.numpy(), gf.numpy(), metric="euclidean")
    assert np.abs(out.numpy() - ref).max() <= 1e-5


def test_rerank_improves_a_hard_case():
    # the point of re-ranking: with clustered identities it lifts mAP over the plain distances
    qf, gf, q_pids, g_pids, q_cams, g_cams = clustered(7, 60, 600, 16, 40)
    plain = evaluate(pairwise_distance(qf, gf), q_pids, g_pids, q_cams, g_cams)
    reranked = evaluate(rerank(qf, gf), q_pids, g_pids, q_cams, g_cams)
    assert reranked.mAP > plain.mAP


def test_settings_are_checked():
    qf, gf, *_ = clustered(0, 3, 10, 4, 3)
    with pytest.raises(ConfigError, match=r"test\.rerank_k1"):
        rerank(qf, gf, k1=0)
    with pytest.raises(ConfigError, match=r"test\.rerank_lambda"):
        rerank(qf, gf, lambda_value=1.5)
    with pytest.raises(ConfigError, match=r"test\.distance"):
        rerank(qf, gf, metric="manhattan")


def test_evaluation_uses_rerank_when_configured(re_ranking):
    qf, gf, q_pids, g_pids, q_cams, g_cams = clustered(8, 25, 250, 16, 20)
    t = evaluation.TestFeatures(qf, gf, q_pids, g_pids, q_cams, g_cams)
    cfg = apply_overrides(Config(), ["test.rerank=true", "test.rerank_k1=10", "test.rerank_k2=3",
                                     "test.rerank_lambda=0.2", "test.ap_mode=market"])
    got = evaluation.rank_test_features(t, cfg)
    want = evaluate(reference(re_ranking, qf, gf, 10, 3, 0.2), q_pids, g_pids, q_cams, g_cams, ap_mode="market")
    assert got.ap_mode == "market"
    np.testing.assert_allclose(got.ap, want.ap, atol=1e-6)
    plain = evaluation.rank_test_features(t, Config())
    np.testing.assert_allclose(plain.ap, evaluate(pairwise_distance(qf, gf), q_pids, g_pids, q_cams, g_cams).ap,
                               atol=1e-6)


def test_cli_rerank_flag_is_the_setting():
    from cgpn.cli import _shorthands, build_parser

    args = build_parser().parse_args(["eval", "--rerank", "--set", "test.rerank_k1=15"])
    cfg = apply_overrides(Config(), _shorthands(args))
    assert cfg.test.rerank is True and cfg.test.rerank_k1 == 15
    assert apply_overrides(Config(), _shorthands(build_parser().parse_args(["eval"]))).test.rerank is False


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_memory_is_bounded():
    # 1,000 queries x 7,000 gallery: the reference code's dense (8,000 x 8,000) matrices would take
    # about 1.3 GB; cgpn needs the 28 MB output, a copy of the features and small blocks
    qf, gf, *_ = clustered(9, 1000, 7000, 32, 500)
    rerank(qf[:10], gf[:300], memory_mb=8)  # warm up

    peak, out = peak_above_start(lambda: rerank(qf, gf, memory_mb=8))
    assert out.shape == (1000, 7000)
    assert peak < 96 * 2**20, f"peak {peak / 2**20:.0f} MB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu(re_ranking):
    qf, gf, *_ = clustered(10, 40, 500, 32, 40)
    out = rerank(qf.cuda(), gf.cuda(), memory_mb=0.5)
    assert out.is_cuda
    assert np.abs(out.cpu().numpy() - reference(re_ranking, qf, gf, 20, 6, 0.3)).max() <= 1e-5

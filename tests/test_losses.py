"""Eq. 1-4 against brute-force computations written out in the test."""

from __future__ import annotations

import math

import pytest
import torch

from cgpn.config import LossConfig
from cgpn.losses import CGPNLoss, batch_hard_triplet_loss, cross_entropy_loss, global_supervision_loss
from cgpn.model import build_model


def _brute_force_triplet(x: torch.Tensor, y: torch.Tensor, margin: float) -> float:
    """Eq. 2 with explicit loops: farthest positive and closest negative per anchor, mean over anchors."""
    total = 0.0
    n = len(x)
    for a in range(n):
        pos = max(math.dist(x[a].tolist(), x[p].tolist()) for p in range(n) if y[p] == y[a])
        neg = min(math.dist(x[a].tolist(), x[k].tolist()) for k in range(n) if y[k] != y[a])
        total += max(0.0, margin + pos - neg)
    return total / n


@pytest.mark.parametrize("seed", range(3))
def test_batch_hard_triplet_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=g)
    y = torch.arange(4).repeat_interleave(4)[torch.randperm(16, generator=g)]
    assert batch_hard_triplet_loss(x, y, 1.2).item() == pytest.approx(_brute_force_triplet(x, y, 1.2), rel=1e-5)


def test_triplet_is_zero_when_identities_are_far_apart():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet_loss(x, y, 1.2).item() == 0.0


def test_cross_entropy_sums_features_of_batch_means():
    logits = [torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])]
    y = torch.tensor([0, 1])
    # feature 1: -log(e^2/(e^2+2)) and -log(e/(e+2)); feature 2: log 3 twice
    f1 = (-math.log(math.e**2 / (math.e**2 + 2)) - math.log(math.e / (math.e + 2))) / 2
    f2 = math.log(3)
    assert cross_entropy_loss(logits, y).item() == pytest.approx(f1 + f2, rel=1e-6)


def test_mse_reductions():
    pred, target = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # squared errors: [[1, 4], [4, 9]] -> mean 4.5; per-sample sums 5 and 13 -> batch mean 9
    assert global_supervision_loss([(pred, target)], "mean").item() == pytest.approx(4.5)
    assert global_supervision_loss([(pred, target)] * 2, "sum").item() == pytest.approx(18.0)


@pytest.mark.parametrize("detach", [True, False])
def test_mse_targets_detached_by_default(detach):
    pred = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4, requires_grad=True)
    global_supervision_loss([(pred, target)], "mean", detach_target=detach).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert (target.grad is None) == detach


def test_detached_targets_do_not_pull_the_trunk_through_the_halves():
    """With detached targets, the MSE gradient reaches the branch only through the 1x1 convs."""
    torch.manual_seed(0)
    model = build_model("cgpn", 4, backbone="resnet18", pretrained=False)
    x = torch.randn(2, 3, 64, 32)
    grads = {}
    for detach in (True, False):
        model.zero_grad()
        out = model(x)
        global_supervision_loss(out.supervision, detach_target=detach).backward()
        grads[detach] = model.branches[0].layer4[1].bn2.weight.grad.clone()
        conv_grad = model.branches[0].global_convs[0].weight.grad
        assert conv_grad is not None and conv_grad.abs().sum() > 0
    assert not torch.allclose(grads[True], grads[False])


def _by_hand_terms(model, x: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0):
    """One training forward, and eq. 1-3 recomputed from what the network gives out, per loss setting.

    Cross-entropy by hand over all 12 logits (log-sum-exp minus the target logit; with label smoothing e,
    (1 - e) of that plus e of the mean over classes); the batch-hard triplet of fast-reid over the 3 reduced
    global features (SPEC 4); the MSE of eq. 3 from each branch's map T, caught with a forward hook:
    f_g_p = GMP(conv_p(T)), f_gl_p = GMP of half p of T, squared error averaged over elements (``mean``) or
    summed over channels and averaged over the batch (``sum``) (SPEC 5).
    """
    from _fastreid_triplet import fastreid_triplet_loss

    maps = {}
    hooks = [b.register_forward_hook(lambda m, i, t, k=k: maps.__setitem__(k, t)) for k, b in enumerate(model.branches)]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    logits = [out.logits[n] for n in model.feature_names]
    assert len(logits) == 12  # 3 global + 9 local features (Section 3.1)
    rows = torch.arange(len(y))
    ce = sum(((torch.logsumexp(z, 1) - z[rows, y]) * (1 - smoothing)
              + smoothing * (torch.logsumexp(z, 1)[:, None] - z).mean(1)).mean() for z in logits)
    tri = sum(fastreid_triplet_loss(out.features[f"g{i}"], y, margin=1.2, norm_feat=False, hard_mining=True)
              for i in (1, 2, 3))
    errors = []
    for k, branch in enumerate(model.branches):
        t = maps[k]  # (B, c, h, w)
        h = t.shape[2]
        for p, conv in enumerate(branch.global_convs):
            f_g = conv(t).amax(dim=(2, 3))
            f_gl = t[:, :, p * h // 2:(p + 1) * h // 2].amax(dim=(2, 3))  # upper half for p = 0, lower for 1
            errors.append((f_g - f_gl) ** 2)
    assert len(errors) == 6  # 3 branches x 2 halves (eq. 3: B = 3, M = 2)
    terms = {"ce": ce.item(), "triplet": tri.item(), "mse": sum(e.mean() for e in errors).item(),
             "mse_sum": sum(e.sum(1).mean() for e in errors).item()}
    return out, terms


def test_total_is_ce_triplet_and_mse_recomputed_from_the_outputs():
    """Eq. 4, each term recomputed from the network's outputs independently of cgpn.losses: the paper's
    setting (unit weights, plain CE, MSE mean), and label smoothing with other weights and MSE sum."""
    torch.manual_seed(0)
    model = build_model("cgpn", 4, backbone="resnet18", pretrained=False)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    x = torch.randn(8, 3, 64, 32)
    x[:, :, 32:] += 2  # upper and lower halves differ, so a swap of the MSE targets shows
    for cfg in (LossConfig(), LossConfig(label_smoothing=0.5, ce_weight=0.5, triplet_weight=2.0, mse_weight=0.25,
                                         mse_reduction="sum")):
        out, expected = _by_hand_terms(model, x, y, cfg.label_smoothing)  # T: 4 rows, halves of 2
        total, terms = CGPNLoss(cfg)(out, y)
        mse = expected["mse_sum" if cfg.mse_reduction == "sum" else "mse"]
        assert set(terms) == {"ce", "triplet", "mse"}
        assert terms["ce"] == pytest.approx(expected["ce"], rel=1e-5)
        assert terms["triplet"] == pytest.approx(expected["triplet"], rel=1e-5)
        assert terms["mse"] == pytest.approx(mse, rel=1e-5)
        assert min(expected.values()) > 0  # every term is live in this case: a dropped one would show
        weighted = cfg.ce_weight * expected["ce"] + cfg.triplet_weight * expected["triplet"] + cfg.mse_weight * mse
        assert total.item() == pytest.approx(weighted, rel=1e-5)

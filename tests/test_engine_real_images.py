"""Training on real images: the demo-sized CGPN (ResNet-18, no ImageNet weights) on the CUHK03 mini set.

``../shared/data/cuhk03-np-mini/labeled`` holds real CUHK03 images of 50 training and 50 test
identities in Market-1501's layout (two cameras), so the Market-1501 reader reads it. A few CPU minutes
of training (``conftest.MINI_RECIPE``) must lift Rank-1 and mAP on its query/gallery split clearly above
the untrained network's; ``cgpn eval`` of the result must print what an independent pipeline computes.
From scratch on 476 images this is the start of learning, not a converged network.
"""

from __future__ import annotations

import re

import numpy as np

from _reference_pipeline import fastreid_ranking, manual_features
from cgpn.config import DataConfig
from cgpn.data.datasets import build_dataset
from cgpn.engine.checkpoint import load_model
from serve_helpers import cli


def test_demo_model_learns_on_real_cuhk03_images(mini_run) -> None:
    before, after = mini_run.before, mini_run.after
    report = f"untrained {before['summary']} / trained {after['summary']}"
    assert mini_run.losses[-1] < 0.8 * mini_run.losses[0]
    assert after["mAP"] >= max(2 * before["mAP"], before["mAP"] + 0.04), report
    assert after["rank1"] >= before["rank1"] + 0.02 and after["rank10"] >= before["rank10"] + 0.10, report


def test_eval_prints_what_an_independent_pipeline_computes(mini_run, capsys) -> None:
    """cgpn eval of the trained checkpoint against features computed here (eval mode, image and mirror
    averaged, L2-normalised) ranked by fast-reid's evaluator: Rank-1/5/10, mAP and mINP as printed."""
    run = cli(capsys, "eval", "--checkpoint", str(mini_run.checkpoint))
    assert run.returncode == 0, run.stderr
    printed = {k: float(v) for k, v in re.findall(r"(Rank-\d+|mAP|mINP) ([\d.]+)", run.stdout)}
    assert set(printed) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}, run.stdout

    model, cfg = load_model(mini_run.checkpoint)
    data = build_dataset("market1501", mini_run.root, DataConfig(verify_counts="ignore"))
    qf, gf = (manual_features(model, [s.path for s in subset], cfg.data.height, cfg.data.width)
              for subset in (data.query, data.gallery))
    cmc, ap, inp = fastreid_ranking(qf, gf, data.query, data.gallery)
    expected = {"Rank-1": cmc[0], "Rank-5": cmc[4], "Rank-10": cmc[9], "mAP": np.nanmean(ap), "mINP": np.nanmean(inp)}
    for name, value in expected.items():  # printed in percent with one decimal
        assert abs(printed[name] - 100 * value) <= 0.05 + 1e-6, (name, printed[name], 100 * value)
    assert expected["Rank-10"] > expected["Rank-1"] > 0  # numbers with room to be wrong in

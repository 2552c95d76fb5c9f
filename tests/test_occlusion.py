"""Synthetic occlusion: deterministic per image, the stated fraction hidden, and cgpn eval --occlude."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _reference_pipeline import fastreid_ranking, manual_features
from cgpn.config import DataConfig
from cgpn.data.datasets import build_dataset
from cgpn.data.occlusion import OCCLUSION_KINDS, OccludedImages, occlude, occlusion_rng, parse_rates
from cgpn.data.transforms import build_transforms
from cgpn.engine.checkpoint import load_model
from cgpn.errors import ConfigError
from serve_helpers import HEIGHT, WIDTH, cli, make_checkpoint


def _noise(seed: int, h: int = 128, w: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_same_image_rate_and_index_give_the_same_occlusion() -> None:
    image = _noise(0)
    for rate in (0.1, 0.3):
        for index in range(6):
            a = np.asarray(occlude(image, rate, occlusion_rng(rate, index)))
            b = np.asarray(occlude(image, rate, occlusion_rng(rate, index)))
            np.testing.assert_array_equal(a, b)
    variants = {np.asarray(occlude(image, 0.3, occlusion_rng(0.3, i), kind="rectangle")).tobytes() for i in range(6)}
    assert len(variants) == 6  # but another index puts the occluder elsewhere
    np.testing.assert_array_equal(np.asarray(occlude(image, 0.0, occlusion_rng(0.0, 0))), np.asarray(image))


def test_occluded_dataset_is_deterministic(tiny_synth: Path) -> None:
    query = build_dataset("synthetic", tiny_synth).query
    transform = build_transforms(DataConfig(height=64, width=32), train=False)
    first, second = OccludedImages(query, transform, 0.3), OccludedImages(query, transform, 0.3)
    clean = OccludedImages(query, transform, 0.0)
    for i in range(len(query)):
        torch.testing.assert_close(first[i][0], second[i][0], atol=0, rtol=0)
        assert first[i][1:] == (query[i].pid, query[i].camid, i)
    assert any(not torch.equal(first[i][0], clean[i][0]) for i in range(len(query)))


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.4])
def test_rectangle_hides_the_stated_fraction(rate: float) -> None:
    background = Image.new("RGB", (64, 128), (7, 201, 93))
    for index in range(5):
        out = np.asarray(occlude(background, rate, occlusion_rng(rate, index), kind="rectangle"))
        changed = (out != (7, 201, 93)).any(axis=2).mean()
        assert abs(changed - rate) < 0.02, (index, changed)


def test_truncation_cuts_the_top_or_bottom_and_stretches_back() -> None:
    rows = np.repeat(np.arange(0, 256, 2, dtype=np.uint8)[:, None], 64, axis=1)  # value 2 x row index
    image = Image.fromarray(np.stack([rows] * 3, axis=2))
    cut = round(0.25 * 128)  # 32 rows
    top = np.asarray(occlude(image, 0.25, occlusion_rng(0.25, 0), kind="top"))[:, :, 0].astype(int)
    bottom = np.asarray(occlude(image, 0.25, occlusion_rng(0.25, 0), kind="bottom"))[:, :, 0].astype(int)
    assert top.shape == bottom.shape == (128, 64)
    assert abs(top[0, 0] - 2 * cut) <= 2 and abs(top[-1, 0] - 254) <= 2  # rows 32..127 left
    assert abs(bottom[0, 0] - 0) <= 2 and abs(bottom[-1, 0] - 2 * (127 - cut)) <= 2  # rows 0..95 left


def test_kinds_are_drawn_half_rectangles_quarter_each_truncation() -> None:
    rows = np.repeat(np.arange(0, 256, 16, dtype=np.uint8)[:, None], 8, axis=1)  # a vertical ramp, 16 x 8
    image = Image.fromarray(np.stack([rows] * 3, axis=2))
    kinds = Counter()
    for index in range(400):
        out = np.asarray(occlude(image, 0.25, occlusion_rng(0.25, index)))
        forced = {k: np.asarray(occlude(image, 0.25, occlusion_rng(0.25, index), kind=k)) for k in OCCLUSION_KINDS}
        matches = [k for k, v in forced.items() if np.array_equal(out, v)]
        assert len(matches) == 1, matches  # the three kinds give three different pictures of a ramp
        kinds[matches[0]] += 1
    assert 160 < kinds["rectangle"] < 240 and 70 < kinds["top"] < 130 and 70 < kinds["bottom"] < 130


def test_parse_rates() -> None:
    assert parse_rates("0.1,0.2,0.3,0.4") == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_rates("0.1;0.2")
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        parse_rates("0.1,1.5")


def test_eval_occlude_prints_a_table_and_writes_a_plot(tiny_synth: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    ckpt = make_checkpoint(tmp_path / "tiny.pt")
    plot = tmp_path / "occ.png"
    run = cli(capsys, "eval", "--checkpoint", str(ckpt), "--set", "data.dataset=synthetic", "--set",
              f"data.root={tiny_synth}", "--occlude", "0.2,0.4", "--plot", str(plot))
    assert run.returncode == 0, run.stderr
    rows = [line.split("|") for line in run.stdout.splitlines() if re.match(r"^\s*\d+% \|", line)]
    assert [r[0].strip() for r in rows] == ["0%", "20%", "40%"]
    clean = cli(capsys, "eval", "--checkpoint", str(ckpt), "--set", "data.dataset=synthetic", "--set",
                f"data.root={tiny_synth}")  # the plain evaluation: the 0% row must be its figures
    rank1, mean_ap = (float(re.search(rf"{k} ([\d.]+)", clean.stdout).group(1)) for k in ("Rank-1", "mAP"))
    assert (float(rows[0][1]), float(rows[0][2])) == (rank1, mean_ap)
    assert [float(r[2]) for r in rows[1:]] != [mean_ap, mean_ap]  # occluded queries rank differently
    # the 40 % row by another route: the query images occluded here (occlude, tested above; seed
    # engine.seed = 0), the gallery clean, features by hand, fast-reid's evaluator
    model, _ = load_model(ckpt)
    data = build_dataset("synthetic", tiny_synth)
    occluded = [occlude(Image.open(s.path).convert("RGB"), 0.4, occlusion_rng(0.4, i, seed=0)) for i, s in enumerate(data.query)]
    qf, gf = manual_features(model, occluded, HEIGHT, WIDTH), manual_features(model, [s.path for s in data.gallery],
                                                                              HEIGHT, WIDTH)
    cmc, ap, _ = fastreid_ranking(qf, gf, data.query, data.gallery)
    assert abs(float(rows[2][1]) - 100 * cmc[0]) <= 0.05 + 1e-6 and abs(float(rows[2][2]) - 100 * np.nanmean(ap)) <= 0.05 + 1e-6
    assert f"plot: {plot}" in run.stdout
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size[0] > 200

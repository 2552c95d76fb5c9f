"""Ranked lists (Fig. 5): one blue query tile and k green / red tiles per row, counted from the PNG's pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cgpn.data.datasets import build_dataset
from cgpn.viz import BLUE, GREEN, RED, draw_ranked_lists
from serve_helpers import HEIGHT, WIDTH, cli, error_line, make_checkpoint


def count_frames(png: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 128)) -> int:
    """Connected regions of exactly ``colour`` whose bounding box is a tile (w x h): the frames."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    labels, _ = ndimage.label((pixels == colour).all(axis=2))
    boxes = ndimage.find_objects(labels)
    return sum(1 for box in boxes if (box[1].stop - box[1].start, box[0].stop - box[0].start) == size)


def _expected(distmat: np.ndarray, query, gallery, qi: int, topk: int) -> list[bool]:
    """By hand (Market-1501 protocol): gallery by distance, minus junk images (pid -1) and images of the same
    identity from the same camera; True where the identity matches."""
    kept = [j for j in np.argsort(distmat[qi], kind="stable") if gallery[j].pid != -1
            and not (gallery[j].pid == query[qi].pid and gallery[j].camid == query[qi].camid)]
    return [gallery[j].pid == query[qi].pid for j in kept[:topk]]


@pytest.mark.parametrize("topk", [5, 40])  # 40 > gallery: rows hold what the protocol leaves
def test_ranked_list_has_one_tile_per_result(tiny_synth: Path, tmp_path: Path, topk: int) -> None:
    data = build_dataset("synthetic", tiny_synth)
    gallery = [s._replace(pid=-1) if i % 4 == 1 else s for i, s in enumerate(data.gallery)]  # some junk
    q_pids = np.array([s.pid for s in data.query])
    g_pids = np.array([s.pid for s in gallery])
    rng = np.random.default_rng(0)
    distmat = rng.uniform(0.5, 1.5, size=(len(q_pids), len(g_pids))) - 0.4 * (q_pids[:, None] == g_pids[None])
    rows = [0, 3, 7]
    out = draw_ranked_lists(distmat, data.query, gallery, rows, tmp_path / "ranks.png", topk=topk)
    expected = [m for qi in rows for m in _expected(distmat, data.query, gallery, qi, topk)]
    assert count_frames(out, BLUE) == len(rows)
    assert count_frames(out, GREEN) == sum(expected)
    assert count_frames(out, RED) == len(expected) - sum(expected)
    if topk == 5:
        assert len(expected) == 3 * 5


@pytest.fixture(scope="module")
def show_case(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory):
    """An untrained checkpoint, the tiny set, and each query's AP by the independent pipeline (features by
    hand, fast-reid's evaluator)."""
    from _reference_pipeline import fastreid_ranking, manual_features
    from cgpn.engine.checkpoint import load_model

    ckpt = make_checkpoint(tmp_path_factory.mktemp("show") / "tiny.pt")
    data = build_dataset("synthetic", tiny_synth)
    model, _ = load_model(ckpt)
    qf, gf = (manual_features(model, [s.path for s in subset], HEIGHT, WIDTH) for subset in (data.query, data.gallery))
    _, ap, _ = fastreid_ranking(qf, gf, data.query, data.gallery)
    assert np.isfinite(ap).all() and len(set(np.round(ap, 6))) == len(ap)  # every query valid, no tied APs
    return ckpt, data, ap


@pytest.mark.parametrize("queries", ["worst", "best", "pids"])
def test_show_command_draws_the_requested_queries(show_case, tiny_synth: Path, tmp_path: Path, queries: str,
                                                  capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--queries worst / best: the rows are the queries of lowest / highest AP (by the independent pipeline),
    in that order; --queries PID,PID: the query images of those identities."""
    import cgpn.viz

    ckpt, data, ap = show_case
    drawn = []
    real_draw = cgpn.viz.draw_ranked_lists
    monkeypatch.setattr(cgpn.viz, "draw_ranked_lists", lambda *a, **k: drawn.append(list(a[3])) or real_draw(*a, **k))
    pids = sorted({s.pid for s in data.query})[1:3]
    spec = ",".join(map(str, pids)) if queries == "pids" else queries
    out = tmp_path / "ranks.png"
    run = cli(capsys, "show", "--checkpoint", str(ckpt), "--set", "data.dataset=synthetic", "--set",
              f"data.root={tiny_synth}", "--out", str(out), "--queries", spec, "--num-queries", "3", "--topk", "4")
    assert run.returncode == 0, run.stderr
    assert str(out) in run.stdout
    [rows] = drawn
    if queries == "pids":
        expected = [i for i, s in enumerate(data.query) if s.pid in pids][:3]
    else:
        order = np.argsort(ap if queries == "worst" else -ap, kind="stable")
        expected = order[:3].tolist()
    assert rows == expected, (rows, expected, np.round(ap, 4).tolist())
    assert count_frames(out, BLUE) == 3
    assert count_frames(out, GREEN) + count_frames(out, RED) == 3 * 4
    if queries == "worst":
        assert count_frames(out, RED) >= 1  # the worst queries of an untrained network miss somewhere


@pytest.mark.parametrize(("args", "needle"), [
    (("--topk", "0"), "--topk must be at least 1, got 0"),
    (("--num-queries", "-1"), "--num-queries must be at least 1, got -1"),
    (("--out", "ranks"), "--out must name a picture file ending in .png, .jpg, .jpeg, got 'ranks'"),
])
def test_show_arguments_are_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    args: tuple[str, ...], needle: str) -> None:
    ckpt = make_checkpoint(tmp_path / "tiny.pt")
    argv = ["show", "--checkpoint", str(ckpt), "--set", f"data.root={tmp_path / 'no_data'}",
            "--out", str(tmp_path / "r.png"), *args]
    assert needle in error_line(cli(capsys, *argv))  # the data root is wrong too: these come first

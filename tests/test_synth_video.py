"""cgpn synth-video: same seed same bytes; the hard cases it promises are in the files; the detector it
simulates behaves as its settings say; it only ever replaces a folder it wrote, and checks values first."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgpn.errors import ConfigError
from cgpn.files import FOLDER_MARKER
from cgpn.track.synth_video import MARKER, PRESETS, SyntheticVideoSpec, generate_synthetic_video
from serve_helpers import cli, error_line

TINY = PRESETS["tiny"]


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file but the folder marker, which records when the folder was written."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != FOLDER_MARKER}


def _load(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", ndmin=2)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (left, top, width, height) boxes."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


@pytest.fixture(scope="module")
def seq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("video") / "seq"
    generate_synthetic_video(out, TINY, progress=False)
    return out


def test_same_seed_same_bytes_other_seed_other_frames(tmp_path: Path):
    spec = dataclasses.replace(TINY, frames=30)
    for name, seed in (("a", 0), ("again", 0), ("other", 1)):
        generate_synthetic_video(tmp_path / name / "seq", dataclasses.replace(spec, seed=seed), progress=False)
    a, again, other = (_digest(tmp_path / name / "seq") for name in ("a", "again", "other"))
    assert a == again
    frames = [k for k in a if k.startswith("img1/")]
    assert len(frames) == spec.frames and frames[0] == "img1/000001.jpg"
    assert sum(a[k] == other[k] for k in frames) == 0 and a["gt.txt"] != other["gt.txt"]


def test_layout_and_ground_truth_inside_the_frames(seq: Path):
    gt = _load(seq / "gt.txt")
    assert gt.shape[1] == 9 and set(gt[:, 6]) == {1} and set(gt[:, 7]) == {1}  # flag, class pedestrian
    assert ((gt[:, 8] > 0) & (gt[:, 8] <= 1)).all()  # visibility: boxes with any pixel in view
    assert gt[:, 0].min() == 1 and gt[:, 0].max() <= TINY.frames
    left, top = gt[:, 2] - 1, gt[:, 3] - 1  # 1-based on disk
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + gt[:, 4] <= TINY.width).all() and (top + gt[:, 5] <= TINY.height).all()
    ini = (seq / "seqinfo.ini").read_text()
    assert f"seqLength={TINY.frames}" in ini and f"imWidth={TINY.width}" in ini and "imDir=img1" in ini
    assert Image.open(seq / "img1" / "000001.jpg").size == (TINY.width, TINY.height)


def test_a_fully_visible_box_holds_a_person_the_background_does_not(seq: Path):
    """Where gt.txt says a person stands fully visible, the frame differs from the same place in a frame
    where nobody is there (the box is where the drawing is)."""
    gt = _load(seq / "gt.txt")
    checked = 0
    for row in gt[gt[:, 8] == 1][:40]:
        t, box = int(row[0]), row[2:6] - [1, 1, 0, 0]
        empty = [f for f in range(1, TINY.frames + 1)
                 if all(_iou(box, r[2:6] - [1, 1, 0, 0]) == 0 for r in gt[gt[:, 0] == f])]
        if not empty:
            continue
        x0, y0, x1, y1 = int(box[0]), int(box[1]), int(box[0] + box[2]), int(box[1] + box[3])
        here = np.asarray(Image.open(seq / "img1" / f"{t:06d}.jpg"), np.float32)[y0:y1, x0:x1]
        there = np.asarray(Image.open(seq / "img1" / f"{empty[0]:06d}.jpg"), np.float32)[y0:y1, x0:x1]
        assert np.abs(here - there).mean() > 15, (t, box)
        checked += 1
    assert checked >= 10


def test_the_hard_cases_are_in_the_ground_truth(seq: Path):
    """Counted from gt.txt and synth_video.json alone: people leave and come back (a gap in an id's frames),
    boxes of two people overlap, look-alikes differ in exactly two attributes and meet."""
    gt = _load(seq / "gt.txt")
    info = json.loads((seq / MARKER).read_text())
    gaps = 0
    for pid in np.unique(gt[:, 1]):
        frames = np.sort(gt[gt[:, 1] == pid, 0])
        gaps += int((np.diff(frames) > TINY.fps).sum())  # unseen for over a second, then back
    assert gaps >= 2
    overlaps = set()
    for t in np.unique(gt[:, 0]):
        rows = gt[gt[:, 0] == t]
        overlaps |= {(int(a[1]), int(b[1])) for i, a in enumerate(rows) for b in rows[i + 1:]
                     if _iou(a[2:6], b[2:6]) >= 0.3}
    assert len(overlaps) >= 2
    (pair,) = info["lookalike_pairs"]
    a, b = (info["identities"][str(i)] for i in pair["ids"])
    differ = {k for k in a if a[k] != b[k]}
    groups = {"lower": {"lower"}, "bag": {"bag", "bag_color"}, "hair": {"hair"}, "sleeves": {"long_sleeves"},
              "pattern": {"pattern"}}
    assert differ <= set().union(*(groups[c] for c in pair["differ_in"])) and len(pair["differ_in"]) == 2
    assert len(a) - len(differ) >= 12  # of 15 attributes
    assert tuple(sorted(pair["ids"])) in overlaps


def test_detector_follows_its_settings(tmp_path: Path):
    """Detections of a longer run: visible people are found at the miss rate, false boxes come at the false
    rate, and found boxes sit on their person (IoU) with edges jittered by about the set fraction."""
    spec = dataclasses.replace(TINY, frames=150, miss_rate=0.2, false_rate=0.5, jitter=0.05)
    counts = generate_synthetic_video(tmp_path / "s", spec, progress=False)
    gt, det = _load(tmp_path / "s" / "gt.txt"), _load(tmp_path / "s" / "det.txt")
    assert len(det) == counts["detections"] and (det[:, 1] == -1).all()
    visible = gt[gt[:, 8] >= spec.min_visibility]
    found, edge_errors, matched = 0, [], set()
    for row in visible:
        cands = np.flatnonzero(det[:, 0] == row[0])
        ious = [_iou(row[2:6], det[i, 2:6]) for i in cands]
        if ious and max(ious) >= 0.5:
            best = cands[int(np.argmax(ious))]
            found += 1
            matched.add(best)
            edge_errors.append((det[best, 2] - row[2]) / row[4])
    assert found / len(visible) == pytest.approx(1 - spec.miss_rate, abs=0.05)
    false = len(det) - len(matched)
    assert false / spec.frames == pytest.approx(spec.false_rate, abs=0.15)
    assert np.std(edge_errors) == pytest.approx(spec.jitter, rel=0.35)


@pytest.mark.parametrize(("change", "message"), [
    ({"frames": 0}, "--frames must be in"), ({"miss_rate": 1.5}, "--miss-rate must be in"),
    ({"lookalike_pairs": 3}, "--lookalike-pairs 3 needs at least 6 people"),
    ({"people": 2.5}, "--people must be an integer"), ({"pillars": 5}, "pillars of"),
])
def test_bad_values_are_refused_before_the_disk_is_touched(tmp_path: Path, change: dict, message: str):
    out = tmp_path / "new"
    with pytest.raises(ConfigError, match=message):
        generate_synthetic_video(out, dataclasses.replace(TINY, **change), progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_only_a_folder_it_wrote_is_replaced(tmp_path: Path, capsys: pytest.CaptureFixture):
    spec = dataclasses.replace(TINY, frames=5)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "gt.txt").write_text("precious\n")
    line = error_line(cli(capsys, "synth-video", "--out", str(theirs), "--preset", "tiny", "--frames", "5"))
    assert "was not written by cgpn synth-video" in line and (theirs / "gt.txt").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]  # no temporary folder left

    ours = tmp_path / "ours"
    generate_synthetic_video(ours, spec, progress=False)
    (ours / "img1" / "000099.jpg").write_bytes(b"stale")
    generate_synthetic_video(ours, dataclasses.replace(spec, frames=3), progress=False)  # its own: replaced
    assert sorted(p.name for p in (ours / "img1").iterdir()) == ["000001.jpg", "000002.jpg", "000003.jpg"]

    empty = tmp_path / "empty"
    empty.mkdir()
    generate_synthetic_video(empty, spec, progress=False)
    assert (empty / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ours", "theirs"]


def test_a_run_that_fails_midway_leaves_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "seq"
    generate_synthetic_video(out, dataclasses.replace(TINY, frames=3), progress=False)
    before = _digest(out)
    import cgpn.track.synth_video as sv

    calls = {"n": 0}
    real = sv._render_frame

    def dies_on_frame_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sv, "_render_frame", dies_on_frame_3)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_video(out, dataclasses.replace(TINY, frames=6, seed=5), progress=False)
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq"]


def test_cli_writes_the_preset_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture):
    run = cli(capsys, "synth-video", "--out", str(tmp_path / "s"), "--preset", "tiny", "--frames", "4",
              "--people", "2", "--lookalike-pairs", "1")
    assert run.returncode == 0 and "wrote 4 frames" in run.stdout
    spec = SyntheticVideoSpec(**json.loads((tmp_path / "s" / MARKER).read_text())["spec"])
    assert spec == dataclasses.replace(TINY, frames=4, people=2)
    assert "unknown preset" in error_line(cli(capsys, "synth-video", "--out", str(tmp_path / "x"), "--preset", "big"))


@pytest.mark.parametrize(("seed", "pause"), [(0, TINY.pause), (1, TINY.pause), (0, 0.0)])
def test_people_stop_behind_pillars_longer_than_deepsort_keeps_a_track(tmp_path: Path, seed: int, pause: float):
    """README: at the default frame rate, people stop behind a pillar for longer than DeepSORT's default
    max_age bridges (a gap in gt.txt longer than max_age frames, the box before and after at the same place,
    away from the frame's edges), and leave the frame and come back (a gap from an edge to an edge). With no
    stops (pause 0), no such gap: walking behind a pillar is shorter."""
    from cgpn.config import TrackerSettings

    spec = dataclasses.replace(TINY, fps=SyntheticVideoSpec().fps, frames=12 * SyntheticVideoSpec().fps, seed=seed,
                               pause=pause)
    generate_synthetic_video(tmp_path / "s", spec, progress=False)
    gt = _load(tmp_path / "s" / "gt.txt")
    max_age = TrackerSettings().max_age
    hidden_in_place = reentries = 0
    for pid in np.unique(gt[:, 1]):
        rows = gt[gt[:, 1] == pid]
        rows = rows[np.argsort(rows[:, 0])]
        for before, after in itertools.pairwise(rows):
            if after[0] - before[0] - 1 <= max_age:
                continue
            at_edge = [box[2] <= 2 or box[2] + box[4] >= spec.width for box in (before, after)]
            moved = abs((before[2] + before[4] / 2) - (after[2] + after[4] / 2))
            hidden_in_place += not any(at_edge) and moved <= 1.5 * max(before[4], after[4])
            reentries += all(at_edge)
    assert (hidden_in_place >= 1 if pause else hidden_in_place == 0) and reentries >= 1

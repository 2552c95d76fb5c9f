"""Tracking metrics (cgpn.track.metrics) on a case small enough to score by hand, against py-motmetrics fed
directly and the hand computation; MOT files read and checked (cgpn.track.mot)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from cgpn.errors import DatasetError
from cgpn.track.metrics import evaluate_tracking, import_metric_libraries
from cgpn.track.mot import MotBoxes, read_mot, write_mot
from serve_helpers import cli, error_line

BOX_A, BOX_B, BOX_FAR = (0, 0, 10, 20), (100, 0, 10, 20), (300, 0, 10, 20)  # left, top, width, height

# Two people A (1) and B (2) stand still for 4 frames. The tracker follows A with 10 and B with 20, swaps
# them in frame 3, misses B in frame 4 and reports a false box (30) there.
GT = [(t, pid, box) for t in (1, 2, 3, 4) for pid, box in ((1, BOX_A), (2, BOX_B))]
TRACKS = [(1, 10, BOX_A), (1, 20, BOX_B), (2, 10, BOX_A), (2, 20, BOX_B),
          (3, 20, BOX_A), (3, 10, BOX_B), (4, 20, BOX_A), (4, 30, BOX_FAR)]

# By hand. CLEAR MOT: 8 ground-truth boxes; 7 matched, 1 miss (B, frame 4), 1 false positive (30); in frame 3
# both A and B change tracks: 2 switches. MOTA = 1 - (1 + 1 + 2) / 8.
MOTA, SWITCHES, MISSES, FALSE_POSITIVES = 1 - 4 / 8, 2, 1, 1
# IDF1: the best one-to-one map is A-10 (frames 1, 2) and B-20 (frames 1, 2): IDTP 4 of 8 true and 8 tracker
# boxes, so IDFN = IDFP = 4 and IDF1 = 2 * 4 / (2 * 4 + 4 + 4).
IDF1 = 0.5
# HOTA (boxes match exactly, IoU 1 at every threshold): DetA = TP / (TP + FN + FP) = 7 / 9. AssA averages over
# the 7 matches A(c) = TPA / (TPA + FNA + FPA) of each match's (person, track) pair:
#   A-10 x2: 2 / (2 + 2 + 1);  B-20 x2: 2 / (2 + 2 + 2);  A-20 x2: 2 / (2 + 2 + 2);  B-10 x1: 1 / (1 + 3 + 2)
DETA = 7 / 9
ASSA = (2 * 2 / 5 + 2 * 2 / 6 + 2 * 2 / 6 + 1 / 6) / 7
HOTA = math.sqrt(DETA * ASSA)


def _boxes(rows) -> MotBoxes:
    return MotBoxes.from_rows([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def test_hand_made_case_matches_the_hand_computation():
    m = evaluate_tracking(_boxes(GT), _boxes(TRACKS))
    assert (m.id_switches, m.misses, m.false_positives, m.gt_boxes) == (SWITCHES, MISSES, FALSE_POSITIVES, 8)
    assert m.mota == pytest.approx(MOTA)
    assert m.idf1 == pytest.approx(IDF1) and m.idp == pytest.approx(0.5) and m.idr == pytest.approx(0.5)
    assert m.deta == pytest.approx(DETA) and m.assa == pytest.approx(ASSA) and m.hota == pytest.approx(HOTA)
    assert m.loca == pytest.approx(1.0) and m.track_ids == 3 and m.gt_ids == 2


def test_py_motmetrics_fed_by_hand_agrees():
    """The same case through py-motmetrics' accumulator with the distance matrices written out by hand (no
    file reading, no IoU code of ours): the library and the hand computation agree, and so does cgpn."""
    mm, _ = import_metric_libraries()
    acc = mm.MOTAccumulator(auto_id=False)
    nan = np.nan
    acc.update([1, 2], [10, 20], [[0, nan], [nan, 0]], frameid=1)
    acc.update([1, 2], [10, 20], [[0, nan], [nan, 0]], frameid=2)
    acc.update([1, 2], [20, 10], [[0, nan], [nan, 0]], frameid=3)
    acc.update([1, 2], [20, 30], [[0, nan], [nan, nan]], frameid=4)
    ref = mm.metrics.create().compute(acc, metrics=["idf1", "num_switches", "mota"], name="hand").iloc[0]
    assert (ref["idf1"], ref["num_switches"], ref["mota"]) == pytest.approx((IDF1, SWITCHES, MOTA))


def test_perfect_tracks_score_one_and_id_changes_are_counted():
    gt = _boxes(GT)
    perfect = evaluate_tracking(gt, gt)
    assert (perfect.idf1, perfect.hota, perfect.assa, perfect.mota, perfect.id_switches) == (1, 1, 1, 1, 0)
    relabelled = _boxes([(t, pid + 100 * (t > 2), box) for t, pid, box in GT])  # new ids from frame 3 on
    m = evaluate_tracking(gt, relabelled)
    assert m.id_switches == 2 and m.idf1 == pytest.approx(0.5) and m.deta == pytest.approx(1.0)
    assert m.assa == pytest.approx(0.5)  # each match: TPA 2 of the person's 4 boxes, the track's 2 boxes


def test_files_round_trip_in_motchallenge_convention(tmp_path: Path):
    """On disk corners are 1-based (MOTChallenge); in memory 0-based; TrackEval reads the written files."""
    write_mot(tmp_path / "gt.txt", _boxes(GT), "ground truth")
    first = (tmp_path / "gt.txt").read_text().splitlines()[0]
    assert first == "1,1,1.00,1.00,10.00,20.00,1,-1,-1.000"
    back = read_mot(tmp_path / "gt.txt", "ground truth")
    assert np.array_equal(back.ltwh, _boxes(GT).ltwh) and np.array_equal(back.ids, _boxes(GT).ids)
    m = evaluate_tracking(back, read_mot(tmp_path / "gt.txt", "tracks"))
    assert m.hota == pytest.approx(1.0)


@pytest.mark.parametrize(("line", "kind"), [
    ("1,-1,10,20,30", "detections"),  # too few columns
    ("0,-1,10,20,30,40,0.9", "detections"),  # frames count from 1
    ("1.5,-1,10,20,30,40,0.9", "detections"),  # frame not an integer
    ("1,-1,10,20,-30,40,0.9", "detections"),  # negative width
    ("1,-1,10,abc,30,40,0.9", "detections"),
    ("1,-1,10,nan,30,40,0.9", "detections"),
    ("1,-1,10,20,30,40,1,1,1", "ground truth"),  # ground truth needs ids >= 0
])
def test_a_malformed_line_names_file_and_line(tmp_path: Path, line: str, kind: str):
    path = tmp_path / "det.txt"
    path.write_text(f"1,1,10,20,30,40,0.9\n\n{line}\n")  # a good line, a blank one, the bad one
    with pytest.raises(DatasetError, match=rf"det.txt:3: expected .*, found '{re.escape(line)}'$"):
        read_mot(path, kind)


def test_one_id_twice_in_a_frame_is_refused(tmp_path: Path):
    path = tmp_path / "tracks.txt"
    path.write_text("1,5,0,0,10,10,1\n1,5,20,0,10,10,1\n")
    with pytest.raises(DatasetError, match="gives id 5 two boxes in frame 1"):
        read_mot(path, "tracks")


def test_track_eval_cli(tmp_path: Path, capsys: pytest.CaptureFixture):
    write_mot(tmp_path / "gt.txt", _boxes(GT), "ground truth")
    write_mot(tmp_path / "tracks.txt", _boxes(TRACKS), "tracks")
    run = cli(capsys, "track-eval", "--gt", str(tmp_path / "gt.txt"), "--tracks", str(tmp_path / "tracks.txt"),
              "--json")
    figures = json.loads(run.stdout)
    assert run.returncode == 0 and figures["id_switches"] == SWITCHES
    assert figures["idf1"] == pytest.approx(IDF1) and figures["assa"] == pytest.approx(ASSA)
    line = error_line(cli(capsys, "track-eval", "--gt", str(tmp_path / "missing.txt"), "--tracks",
                          str(tmp_path / "tracks.txt")))
    assert "ground truth file" in line and "missing" in line

"""cgpn track: deep-sort-realtime run over a generated sequence with the cgpn embedder (the frames and boxes
it is given, the tracks it writes), appearance deciding where motion cannot, video in and out, and the
mistakes a user can make (one line, exit 2, nothing written)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgpn.config import TrackerSettings
from cgpn.track.embedder import TrackerEmbedder
from cgpn.track.metrics import evaluate_tracking
from cgpn.track.mot import MotBoxes, read_mot
from cgpn.track.synth_video import PRESETS, generate_synthetic_video
from cgpn.track.tracker import DeepSortTracker, track_frames
from cgpn.track.video import FrameSource
from serve_helpers import cli, error_line

SPEC = dataclasses.replace(PRESETS["tiny"], frames=40)


@pytest.fixture(scope="module")
def seq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("track") / "seq"
    generate_synthetic_video(out, SPEC, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_seq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole tiny preset (120 frames: people cross, hide and come back several times)."""
    out = tmp_path_factory.mktemp("track") / "tiny"
    generate_synthetic_video(out, PRESETS["tiny"], progress=False)
    return out


def _xyxy(rows: np.ndarray) -> np.ndarray:
    """0-based (x1, y1, x2, y2) of MOT file rows (1-based left, top, width, height)."""
    left, top = rows[:, 2] - 1, rows[:, 3] - 1
    return np.stack([left, top, left + rows[:, 4], top + rows[:, 5]], 1)


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x1, y1, x2, y2 boxes."""
    w = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(0)
    h = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(0)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return w * h / (area(a)[:, None] + area(b)[None, :] - w * h)


def _tracks(rows_per_frame) -> MotBoxes:
    rows_per_frame = list(rows_per_frame)
    frames = np.concatenate([np.full(len(r), t) for t, _, r in rows_per_frame])
    rows = np.concatenate([r for _, _, r in rows_per_frame])
    return MotBoxes.from_rows(frames, rows[:, 0], rows[:, 1:5], rows[:, 5])


class Spy:
    """An embedder that records what the tracker hands it, then asks the real one."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, image, boxes):
        self.calls.append((image.copy(), np.array(boxes)))
        feats = self.inner(image, boxes)
        self.calls[-1] += (feats,)
        return feats


def test_deepsort_with_the_cgpn_embedder_sees_each_frame_and_its_detections(seq: Path, checkpoint: Path):
    """Every frame, deep-sort-realtime's tracker gets cgpn features of exactly that frame's det.txt boxes (read
    here with NumPy), of the frame as the JPEG decodes; the tracks it confirms sit on detections."""
    spy = Spy(TrackerEmbedder(checkpoint, device="cpu", backend="eager", bgr=False, flip=False))
    out = list(track_frames(FrameSource(seq / "img1"), read_mot(seq / "det.txt", "detections"),
                            DeepSortTracker(spy, TrackerSettings(max_age=10))))
    det = np.loadtxt(seq / "det.txt", delimiter=",", ndmin=2)
    calls = iter(spy.calls)
    for t, _, rows in out:
        mine = det[det[:, 0] == t]
        if not len(mine):
            continue
        seen, boxes, feats = next(calls)
        assert np.array_equal(seen, np.asarray(Image.open(seq / "img1" / f"{t:06d}.jpg").convert("RGB")))
        assert np.allclose(boxes, _xyxy(mine))  # the file's order, 0-based corners
        assert feats.shape == (len(mine), spy.inner.embedding_dim)
        assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
        if len(rows):  # confirmed tracks matched in this frame: on one of its detections (Kalman-smoothed)
            ltwh = rows[:, 1:5]
            assert (_iou_matrix(np.c_[ltwh[:, :2], ltwh[:, :2] + ltwh[:, 2:]], _xyxy(mine)).max(1) > 0.3).all()
    assert next(calls, None) is None and len(out) == SPEC.frames
    assert sum(len(r) for _, _, r in out) > 0.5 * len(det)  # most detections end up in a confirmed track


def test_appearance_decides_where_motion_cannot(tiny_seq: Path):
    """Boxes = ground truth. An embedder that knows who each box is (a one-hot of its ground-truth id) must
    cut ID switches against no appearance: features reach DeepSORT with the right boxes. Features handed to
    the wrong boxes (rolled by one) do worse than the right ones."""
    gt = read_mot(tiny_seq / "gt.txt", "ground truth")
    dets = MotBoxes.from_rows(gt.frame, np.full(len(gt), -1), gt.ltwh)
    people = int(gt.ids.max()) + 1

    def oracle(shift: int):
        def embed(image, boxes_xyxy):
            ious = _iou_matrix(boxes_xyxy, gt.xyxy)
            ids = gt.ids[ious.argmax(1)]
            return np.roll(np.eye(people, dtype=np.float32)[ids], shift, axis=0)
        return embed

    settings = TrackerSettings(max_age=100, n_init=1)
    frames = [None] * PRESETS["tiny"].frames  # the embedder does not look at pixels
    scores = {name: evaluate_tracking(gt, _tracks(track_frames(frames, dets, DeepSortTracker(emb, settings))))
              for name, emb in (("none", None), ("oracle", oracle(0)), ("misaligned", oracle(1)))}
    assert scores["oracle"].id_switches <= scores["none"].id_switches / 2  # 3 and 9 (seed 0)
    assert scores["oracle"].idf1 > max(scores["none"].idf1, scores["misaligned"].idf1)
    assert scores["oracle"].assa > scores["none"].assa


def test_cli_tracks_frames_and_draws_a_video(seq: Path, checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture):
    out, video = tmp_path / "tracks.txt", tmp_path / "tracks.mp4"
    run = cli(capsys, "track", "--frames", str(seq / "img1"), "--detections", str(seq / "det.txt"),
              "--checkpoint", str(checkpoint), "--out", str(out), "--video", str(video), "--device", "cpu",
              "--backend", "eager", "--no-flip")
    assert run.returncode == 0, run.stderr
    tracks = read_mot(out, "tracks")
    assert len(tracks) and tracks.num_frames <= SPEC.frames and (tracks.ids > 0).all()
    frames = list(FrameSource(video))
    assert len(frames) == SPEC.frames and frames[0].shape == (SPEC.height, SPEC.width, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracks.mp4", "tracks.txt"]
    gt_frame = np.asarray(Image.open(seq / "img1" / "000030.jpg"), np.float32)
    assert 1 < np.abs(frames[29].astype(np.float32) - gt_frame).mean() < 20  # same scene, with boxes drawn


def test_cli_reads_a_video_file(seq: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """The frames as an mp4 (written with PyAV here): decoded in RGB order, one per frame; motion-only tracks
    equal those of the image folder (they do not depend on pixels)."""
    import av

    video = tmp_path / "seq.mp4"
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("libx264", rate=SPEC.fps, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = SPEC.width, SPEC.height, "yuv420p"
        for t in range(1, SPEC.frames + 1):
            frame = av.VideoFrame.from_ndarray(np.asarray(Image.open(seq / "img1" / f"{t:06d}.jpg")), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    decoded = list(FrameSource(video))
    original = np.asarray(Image.open(seq / "img1" / "000010.jpg"), np.float32)
    assert len(decoded) == SPEC.frames and np.abs(decoded[9] - original).mean() < 6
    assert np.abs(decoded[9][..., ::-1] - original).mean() > 3 * np.abs(decoded[9] - original).mean()
    for name, frames in (("folder.txt", seq / "img1"), ("video.txt", video)):
        run = cli(capsys, "track", "--frames", str(frames), "--detections", str(seq / "det.txt"), "--appearance",
                  "none", "--out", str(tmp_path / name))
        assert run.returncode == 0, run.stderr
    assert (tmp_path / "folder.txt").read_text() == (tmp_path / "video.txt").read_text()


def _bad_inputs(seq: Path, tmp: Path, outputs: Path, checkpoint: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "bad_det.txt").write_text("1,-1,10,20,30,40,0.9\n2,-1,10,20,thirty,40,0.9\n")
    (tmp / "other.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle of the number 1
    (tmp / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    (tmp / "late_det.txt").write_text(f"{SPEC.frames + 5},-1,10,20,30,40,0.9\n")
    frames, det, ckpt = str(seq / "img1"), str(seq / "det.txt"), str(checkpoint)
    out, video = str(outputs / "tracks.txt"), str(outputs / "tracks.mp4")
    cases = {
        "missing frames": (["--frames", str(tmp / "nope"), "--detections", det, "--checkpoint", ckpt, "--out", out],
                           "do not exist"),
        "sequence folder, not img1": (["--frames", str(seq), "--detections", det, "--appearance", "none",
                                       "--out", out], "keeps them in img1/"),
        "malformed line": (["--frames", frames, "--detections", str(tmp / "bad_det.txt"), "--checkpoint", ckpt,
                            "--out", out], "bad_det.txt:2: expected"),
        "not a checkpoint": (["--frames", frames, "--detections", det, "--checkpoint", str(tmp / "other.pt"),
                              "--out", out], "other.pt"),
        "undecodable video": (["--frames", str(tmp / "garbage.mp4"), "--detections", det, "--appearance", "none",
                               "--out", out], "cannot decode video"),
        "out is the detections": (["--frames", frames, "--detections", det, "--appearance", "none", "--out", det],
                                  "is also --detections"),
        "video is the frames": (["--frames", str(tmp / "garbage.mp4"), "--detections", det, "--appearance", "none",
                                 "--out", out, "--video", str(tmp / "garbage.mp4")], "is also --frames"),
        "video not a video": (["--frames", frames, "--detections", det, "--checkpoint", ckpt, "--out", out,
                               "--video", str(outputs / "v.avi")], "--video must name an .mp4 or .gif"),
        "detections past the end": (["--frames", frames, "--detections", str(tmp / "late_det.txt"),
                                     "--appearance", "none", "--out", out], f"holds {SPEC.frames} frames"),
        "no checkpoint": (["--frames", frames, "--detections", det, "--out", out], "needs --checkpoint"),
        "bad setting": (["--frames", frames, "--detections", det, "--appearance", "none", "--out", out,
                         "--max-age", "0"], "--max-age must be >= 1"),
    }  # every case without --video of its own also asks for one: neither file may appear
    return {k: (v[0] if "--video" in v[0] else [*v[0], "--video", video], v[1]) for k, v in cases.items()}


@pytest.mark.parametrize("case", ["missing frames", "sequence folder, not img1", "malformed line", "not a checkpoint", "undecodable video",
                                  "out is the detections", "video is the frames", "video not a video",
                                  "detections past the end", "no checkpoint", "bad setting"])
def test_a_mistake_is_one_line_and_nothing_is_written(case: str, seq: Path, checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture):
    inputs, outputs = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    args, needle = _bad_inputs(seq, inputs, outputs, checkpoint)[case]
    before = {p: p.read_bytes() for p in [*inputs.iterdir(), seq / "det.txt", checkpoint]}
    line = error_line(cli(capsys, "track", *args))
    assert needle in line, line
    assert list(outputs.iterdir()) == []
    assert all(p.read_bytes() == data for p, data in before.items())


def test_a_video_cut_short_writes_nothing(seq: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """An mp4 truncated to half its bytes decodes fewer frames than det.txt needs: found at the end of the
    run, before the tracks file or the drawn video is written."""
    whole = tmp_path / "whole.mp4"
    assert cli(capsys, "track", "--frames", str(seq / "img1"), "--detections", str(seq / "det.txt"),
               "--appearance", "none", "--out", str(tmp_path / "t.txt"), "--video", str(whole)).returncode == 0
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "out"
    out.mkdir()
    line = error_line(cli(capsys, "track", "--frames", str(cut), "--detections", str(seq / "det.txt"),
                          "--appearance", "histogram", "--out", str(out / "t.txt"), "--video", str(out / "v.gif")))
    assert "cut.mp4" in line or "frames" in line, line
    assert list(out.iterdir()) == []


def test_colour_histograms_by_hand():
    """Upper and lower half each one HSV bin (8 x 4 x 4 bins; PIL's hue of red 0, green 85, blue 170 of 255:
    bins 15, 47 and 95), square-rooted and scaled to a unit row; BGR frames read as such; boxes clipped."""
    from cgpn.track.appearance import ColorHistogramEmbedder

    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    image = np.zeros((8, 6, 3), np.uint8)
    image[:4, :4], image[4:, :4], image[:, 4:] = red, blue, green
    expected = np.zeros((2, 256), np.float32)
    expected[0, [15, 128 + 95]] = 0.5 ** 0.5  # red over blue
    expected[1, [47, 128 + 47]] = 0.5 ** 0.5  # green throughout
    rgb = ColorHistogramEmbedder(bgr=False)
    np.testing.assert_allclose(rgb(image, np.array([[0, 0, 4, 8], [4, 0, 6, 8]])), expected, atol=1e-6)
    np.testing.assert_allclose(rgb(image, np.array([[-5, -3, 4, 20]])), expected[:1], atol=1e-6)  # clipped
    swapped = ColorHistogramEmbedder()(image[..., ::-1].copy(), np.array([[0, 0, 4, 8]]))  # BGR, the default
    np.testing.assert_allclose(swapped, expected[:1], atol=1e-6)
    assert rgb(image, np.zeros((0, 4))).shape == (0, 256)


def test_cli_histogram_appearance_draws_a_gif(seq: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """README: `--appearance histogram` tracks with colour histograms of the RGB frames (the tracks equal
    DeepSORT's over ColorHistogramEmbedder in Python) and `--video out.gif` draws every frame."""
    from cgpn.track.appearance import ColorHistogramEmbedder

    out, gif = tmp_path / "tracks.txt", tmp_path / "tracks.gif"
    run = cli(capsys, "track", "--frames", str(seq / "img1"), "--detections", str(seq / "det.txt"),
              "--appearance", "histogram", "--out", str(out), "--video", str(gif))
    assert run.returncode == 0, run.stderr
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((seq / "img1").glob("*.jpg"))]
    tracker = DeepSortTracker(ColorHistogramEmbedder(bgr=False), TrackerSettings())
    expected = _tracks(track_frames(frames, read_mot(seq / "det.txt", "detections"), tracker))
    got = read_mot(out, "tracks")
    assert len(got) and np.array_equal(got.ids, expected.ids) and np.allclose(got.ltwh, expected.ltwh, atol=0.01)
    with Image.open(gif) as drawn:
        assert drawn.n_frames == SPEC.frames and drawn.size == (SPEC.width, SPEC.height)


def test_tracker_settings_are_deep_sort_realtimes_and_the_flags_reach_it():
    """README: DeepSORT's settings are cgpn track flags of the same names, with deep-sort-realtime's defaults."""
    import inspect

    from deep_sort_realtime.deepsort_tracker import DeepSort

    from cgpn.cli import _tracker_settings, build_parser

    theirs = inspect.signature(DeepSort.__init__).parameters
    ours = TrackerSettings()
    assert {f.name: getattr(ours, f.name) for f in dataclasses.fields(ours)} == \
        {f.name: theirs[f.name].default for f in dataclasses.fields(ours)}
    args = build_parser().parse_args(["track", "--frames", "f", "--detections", "d.txt", "--out", "t.txt",
                                      "--max-age", "7", "--n-init", "5", "--max-iou-distance", "0.5",
                                      "--max-cosine-distance", "0.3", "--nn-budget", "10"])
    inner = DeepSortTracker(None, _tracker_settings(args))._deepsort.tracker
    assert (inner.max_age, inner.n_init, inner.max_iou_distance) == (7, 5, 0.5)
    assert (inner.metric.matching_threshold, inner.metric.budget) == (0.3, 10)

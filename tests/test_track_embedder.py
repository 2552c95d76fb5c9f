"""TrackerEmbedder: features of boxes in frames against crops cut and resized by hand with PIL (through
FeatureExtractor), the contract (no boxes, clipping, boxes outside the frame, batches, the checkpoint's own
input size and normalisation), and the calls BoxMOT's and deep-sort-realtime's trackers make."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cgpn.errors import ConfigError, ImageError
from cgpn.extractor import FeatureExtractor
from cgpn.track.embedder import TrackerEmbedder
from serve_helpers import HEIGHT, WIDTH, cli

# Smallest cosine accepted between a box's feature and that of the same crop cut and resized by hand. With the
# untrained test network a BGR/RGB swap gives <= 0.991 (asserted below) and per-channel mean / std replaced by
# their averages <= 0.9986; roi_align's 2 x 2 samples against PIL's antialiased bilinear give >= 0.9994.
COS = 0.999


@pytest.fixture(scope="module")
def emb(checkpoint: Path) -> TrackerEmbedder:
    return TrackerEmbedder(checkpoint, device="cpu", backend="eager")


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> FeatureExtractor:
    """The independent path: PIL crops resized with PIL, ImageNet-normalised by torchvision, eager fp32."""
    return FeatureExtractor(checkpoint, device="cpu", backend="eager")


def people_frame(seed: int = 0, height: int = 240, width: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """(RGB frame (H, W, 3) uint8, integer boxes (N, 4) x1, y1, x2, y2): people drawn as a head, a shirt and
    trousers of distinct colours on a gradient, with sensor noise; boxes 2-3x the network's input and one
    smaller than it (upsampled)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frame = np.stack([60 + 100 * xx / width, 80 + 60 * yy / height, 120 + 0 * xx], -1)
    clothes = [((200, 40, 40), (30, 30, 120)), ((40, 180, 60), (90, 90, 90)), ((230, 220, 60), (20, 20, 20)),
               ((120, 60, 200), (160, 110, 60))]
    sizes = [(150, 50), (160, 55), (170, 60), (40, 22)]
    boxes = []
    for i, ((top, bottom), (h, w)) in enumerate(zip(clothes, sizes)):
        x1, y1 = 20 + 75 * i, 30 + 10 * i
        frame[y1:y1 + h // 2, x1:x1 + w] = top
        frame[y1 + h // 2:y1 + h, x1:x1 + w] = bottom
        frame[y1:y1 + h // 5, x1 + w // 4:x1 + 3 * w // 4] = (225, 190, 160)
        boxes.append([x1, y1, x1 + w, y1 + h])
    frame = (frame + rng.normal(0, 6, frame.shape)).clip(0, 255).astype(np.uint8)
    return frame, np.array(boxes)


def by_hand(reference: FeatureExtractor, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Features of the boxes cut from the RGB frame with PIL, one image at a time."""
    image = Image.fromarray(rgb)
    return reference([image.crop(tuple(int(v) for v in box)) for box in boxes]).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_boxes_match_crops_cut_by_hand_in_bgr_and_rgb(checkpoint: Path, emb: TrackerEmbedder,
                                                     reference: FeatureExtractor) -> None:
    rgb, boxes = people_frame()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    expected = by_hand(reference, rgb, boxes)
    got = emb(bgr, boxes)
    assert got.shape == (4, 3072) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert cosines(got, expected).min() >= COS, cosines(got, expected)
    as_rgb = TrackerEmbedder(checkpoint, device="cpu", backend="eager", bgr=False)
    assert cosines(as_rgb(rgb, boxes), expected).min() >= COS
    # the tolerance tells the orders apart: the RGB frame read as BGR misses it
    assert cosines(emb(rgb, boxes), expected).max() < 0.995
    # each box is nearest to its own hand-cut crop
    assert (np.argmax(got @ expected.T, axis=1) == np.arange(4)).all()


def test_no_boxes_give_zero_rows(emb: TrackerEmbedder) -> None:
    frame, _ = people_frame()
    for empty in ([], np.zeros((0, 4)), np.zeros((0, 6), np.float32), torch.zeros(0, 4)):
        out = emb.get_features(empty, frame)
        assert out.shape == (0, emb.embedding_dim) and out.dtype == np.float32
    assert emb.embed_crops([]).shape == (0, 3072) and emb.predict([]) == []
    assert emb.deepsort_embeds(frame, []) == []


def test_boxes_are_clipped_to_the_frame(emb: TrackerEmbedder, reference: FeatureExtractor) -> None:
    rgb, _ = people_frame()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    over = np.array([[-30.0, -20.0, 60.0, 150.0], [280.0, 100.0, 400.0, 300.0]])  # past the top left, bottom right
    clipped = np.array([[0, 0, 60, 150], [280, 100, 320, 240]])  # by hand
    got = emb(bgr, over)
    np.testing.assert_allclose(got, emb(bgr, clipped), atol=1e-5)
    assert cosines(got, by_hand(reference, rgb, clipped)).min() >= COS


def test_a_box_reads_the_same_pixels_alone_or_with_others(emb: TrackerEmbedder) -> None:
    """Only the part of the frame the boxes cover is converted: a small box at fractional corners (upsampled,
    so bilinear sampling reads the pixel past each edge) gives the same feature alone as beside a far one."""
    rgb, _ = people_frame()
    small = np.array([[101.3, 60.6, 117.8, 92.2]])
    far = np.array([[250.0, 150.0, 310.0, 235.0]])
    alone = emb(rgb, small)
    np.testing.assert_allclose(emb(rgb, np.concatenate([far, small]))[1:], alone, atol=1e-5)
    np.testing.assert_allclose(emb(rgb, np.concatenate([small, far]))[:1], alone, atol=1e-5)


def test_boxes_outside_or_empty_give_a_fixed_unit_vector(emb: TrackerEmbedder) -> None:
    rgb, boxes = people_frame()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    degenerate = np.array([
        [-80, 10, -20, 100],     # left of the frame
        [330, 10, 400, 100],     # right of it
        [10, -90, 50, -5],       # above
        [10, 250, 50, 300],      # below
        [40, 40, 40, 120],       # zero width
        [40, 40, 90, 40],        # zero height
        [90, 120, 40, 40],       # corners swapped
        [np.nan, 10, 50, 100],   # not a number
    ])
    out = emb(bgr, np.concatenate([boxes[:2], degenerate, boxes[2:]]))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    blank = out[2:-2]
    np.testing.assert_allclose(blank, np.full(blank.shape, 3072 ** -0.5), rtol=1e-6)  # 1 / sqrt(D) everywhere
    # the boxes around them are not disturbed
    np.testing.assert_allclose(out[[0, 1, -2, -1]], emb(bgr, boxes), atol=1e-5)
    only = emb(bgr, degenerate)  # no box inside the frame at all
    np.testing.assert_allclose(only, blank, atol=1e-6)
    empty_crops = emb.embed_crops([rgb[5:5, 10:40], rgb[0:30, 7:7]])
    np.testing.assert_allclose(empty_crops, blank[:2], atol=1e-6)


def test_a_zero_or_nan_feature_becomes_the_blank_one(emb: TrackerEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """BoxMOT divides by the norm: a zero (or NaN) row of the network, e.g. an untrained one (zero BatchNorm
    shifts) on a crop of the mean colour, must not reach it."""
    frame, boxes = people_frame()

    def broken(crops: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(crops), emb.embedding_dim)
        out[1:] = float("nan")
        return out

    monkeypatch.setattr(emb, "runtime", broken)
    np.testing.assert_allclose(emb(frame, boxes[:3]), np.full((3, 3072), 3072 ** -0.5), rtol=1e-6)


def test_batches_split_at_batch_size_with_the_checkpoints_input_size(checkpoint: Path, emb: TrackerEmbedder) -> None:
    rgb, boxes = people_frame()
    many = np.concatenate([boxes, boxes + 5, boxes[:3] - 3])  # 11 boxes
    small = TrackerEmbedder(checkpoint, device="cpu", backend="eager", batch_size=4)
    seen = []
    real = small.runtime

    def recording(crops: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(crops.shape))
        return real(crops)

    small.runtime = recording
    out = small(rgb, many)
    assert seen == [(4, 3, HEIGHT, WIDTH), (4, 3, HEIGHT, WIDTH), (3, 3, HEIGHT, WIDTH)]
    np.testing.assert_allclose(out, emb(rgb, many), atol=1e-5)
    seen.clear()
    crops = [rgb[y1:y2, x1:x2] for x1, y1, x2, y2 in many]
    small.embed_crops(crops)
    assert [s[0] for s in seen] == [4, 4, 3]


def test_crops_of_many_sizes_in_one_batch(emb: TrackerEmbedder, reference: FeatureExtractor) -> None:
    """deep-sort-realtime's crops differ in size: each is resized on its own part of the batch canvas."""
    rgb, boxes = people_frame()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    crops = [bgr[y1:y2, x1:x2] for x1, y1, x2, y2 in boxes]  # views, as deep-sort-realtime cuts them
    together = emb.embed_crops(crops)
    alone = np.concatenate([emb.embed_crops([c]) for c in crops])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert cosines(together, by_hand(reference, rgb, boxes)).min() >= COS
    assert all(isinstance(f, np.ndarray) and f.shape == (3072,) for f in emb.predict(crops))


def test_boxmot_calls_it_with_fractional_boxes_and_extra_columns(emb: TrackerEmbedder,
                                                                 reference: FeatureExtractor) -> None:
    """BoT-SORT / StrongSORT / DeepOCSORT call ``reid_model.get_features(dets[:, 0:4], img)`` with float
    detections (x1, y1, x2, y2, conf, cls) and the BGR frame, then divide each row by its norm."""
    rgb, boxes = people_frame()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    jitter = np.random.default_rng(1).uniform(-0.4, 0.4, boxes.shape)
    dets = np.concatenate([boxes + jitter, np.full((4, 1), 0.9), np.zeros((4, 1))], 1).astype(np.float32)
    assert (emb.input_shape, emb.embedding_dim) == ((HEIGHT, WIDTH), 3072)
    features = emb.get_features(dets[:, 0:4], bgr)
    np.testing.assert_array_equal(emb.get_features(dets, bgr), features)  # extra columns ignored
    assert features.shape == (4, 3072) and features.dtype == np.float32
    normalised = features / np.linalg.norm(features, axis=-1, keepdims=True)  # what BoxMOT does next
    np.testing.assert_allclose(normalised, features, atol=1e-6)
    assert cosines(features, by_hand(reference, rgb, boxes)).min() >= COS  # within half a pixel of the integers
    one = emb.get_features(dets[2], bgr)  # a single row, as (6,)
    np.testing.assert_allclose(one, features[2:3], atol=1e-6)


def test_deep_sort_realtime_calls_predict_on_its_crops(emb: TrackerEmbedder, reference: FeatureExtractor) -> None:
    """``tracker.embedder = emb``; ``update_tracks(detections, frame=frame)`` cuts the crops (int
    coordinates, clipped to the frame) and passes them to ``predict``; one detection lies outside the frame,
    which gives deep-sort-realtime an empty crop."""
    deepsort = pytest.importorskip("deep_sort_realtime.deepsort_tracker")
    rgb, boxes = people_frame()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    detections = [([x1, y1, x2 - x1, y2 - y1], 0.9, "person") for x1, y1, x2, y2 in boxes]
    detections.append(([400, 50, 40, 90], 0.8, "person"))
    tracker = deepsort.DeepSort(max_age=5, n_init=1, embedder=None)
    tracker.embedder = emb
    tracks = tracker.update_tracks(detections, frame=bgr)
    assert len(tracks) == 5
    by_box = {tuple(t.original_ltwh): t.get_feature() for t in tracks}
    features = np.stack([by_box[tuple(d[0])] for d in detections])
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    assert cosines(features[:4], by_hand(reference, rgb, boxes)).min() >= COS
    np.testing.assert_allclose(features[4], emb.blank, atol=1e-6)  # the empty crop
    second = tracker.update_tracks([(d[0], 0.9, "person") for d in detections[:4]], frame=bgr)
    assert {t.track_id for t in second if t.time_since_update == 0} == {t.track_id for t in tracks[:4]}


def test_deepsort_embeds_line_up_with_the_detections_it_keeps(emb: TrackerEmbedder) -> None:
    """``update_tracks`` drops detections of zero width or height before pairing them with ``embeds``."""
    deepsort = pytest.importorskip("deep_sort_realtime.deepsort_tracker")
    rgb, boxes = people_frame()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    detections = [([x1, y1, x2 - x1, y2 - y1], 0.9, "person") for x1, y1, x2, y2 in boxes]
    detections.insert(1, ([100, 100, 0, 50], 0.9, "person"))  # zero width: dropped by deep-sort-realtime
    embeds = emb.deepsort_embeds(bgr, detections)
    assert len(embeds) == 4
    tracker = deepsort.DeepSort(max_age=5, n_init=1, embedder=None)
    tracks = tracker.update_tracks(detections, embeds=embeds)
    for track in tracks:
        left, top, w, h = track.original_ltwh
        np.testing.assert_allclose(track.get_feature(), emb(bgr, [[left, top, left + w, top + h]])[0], atol=1e-6)


def test_fast_backends_and_an_exported_file_agree_with_eager(checkpoint: Path, emb: TrackerEmbedder,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rgb, boxes = people_frame()
    expected = emb(rgb, boxes)
    onnx_file = tmp_path / "tiny.onnx"
    assert cli(capsys, "export", "--checkpoint", str(checkpoint), "--onnx", str(onnx_file)).returncode == 0
    for source, backend, limit in ((checkpoint, "bf16", 0.999), (checkpoint, "onnx", 0.99999),
                                   (checkpoint, "channels_last", 0.99999), (onnx_file, "auto", 0.99999)):
        fast = TrackerEmbedder(source, device="cpu", backend=backend)
        assert fast.input_shape == (HEIGHT, WIDTH)
        assert cosines(fast(rgb, boxes), expected).min() >= limit, (source, backend)


def test_the_input_size_and_normalisation_are_the_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A network at 96 x 48 exported with mean 0.5 / std 0.25 in its metadata: crops are resized to 96 x 48 and
    normalised with those values (computed here by hand and run through onnxruntime directly)."""
    import onnx
    import onnxruntime as ort

    from cgpn.config import Config
    from cgpn.engine.checkpoint import build_model_from_config, save_checkpoint

    cfg = Config.from_dict({"model": {"backbone": "resnet18", "pretrained": False},
                            "data": {"height": 96, "width": 48}})
    torch.manual_seed(1)
    model = build_model_from_config(cfg, 5, pretrained=False)
    ckpt = tmp_path / "wide.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": 5, "epoch": 0})
    onnx_file = tmp_path / "wide.onnx"
    assert cli(capsys, "export", "--checkpoint", str(ckpt), "--onnx", str(onnx_file)).returncode == 0
    proto = onnx.load(str(onnx_file))
    for entry in proto.metadata_props:
        if entry.key in ("cgpn.mean", "cgpn.std"):
            entry.value = json.dumps([0.5] * 3 if entry.key == "cgpn.mean" else [0.25] * 3)
    onnx.save(proto, str(onnx_file))

    rgb, boxes = people_frame()
    emb = TrackerEmbedder(onnx_file, device="cpu", bgr=False)
    assert emb.input_shape == (96, 48)
    got = emb(rgb, boxes)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])

    def by_hand_with(mean: float, std: float) -> np.ndarray:
        crops = [np.asarray(Image.fromarray(rgb).crop(tuple(map(int, b))).resize((48, 96), Image.BILINEAR),
                            np.float32) / 255 for b in boxes]
        x = ((np.stack(crops) - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
        return session.run(["features"], {"images": x})[0]

    assert cosines(got, by_hand_with(0.5, 0.25)).min() >= COS
    assert cosines(got, by_hand_with(0.449, 0.226)).max() < COS  # ImageNet-like values would be told apart


def test_user_errors_are_one_line(checkpoint: Path, emb: TrackerEmbedder) -> None:
    frame, boxes = people_frame()
    with pytest.raises(ImageError, match=r"a frame must be an \(H, W, 3\) uint8 array.*got shape \(240, 320, 3\) "
                                         r"float32"):
        emb(frame.astype(np.float32), boxes)
    with pytest.raises(ImageError, match=r"got shape \(240, 320\) uint8"):
        emb(frame[..., 0], boxes)
    with pytest.raises(ImageError, match="a crop must be"):
        emb.predict([frame[..., :2]])
    with pytest.raises(ConfigError, match=r"boxes must be an \(N, >= 4\) array.*got shape \(2, 3\)"):
        emb(frame, np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="boxes must be"):
        emb(frame, [[1, 2, 3, 4], [1, 2]])
    with pytest.raises(ConfigError, match="batch_size must be at least 1, got 0"):
        TrackerEmbedder(checkpoint, device="cpu", batch_size=0)
    caller = boxes.astype(np.float64) - 50
    emb(frame, caller)
    np.testing.assert_array_equal(caller, boxes - 50)  # clipping works on a copy


def test_exported_from_the_package() -> None:
    import cgpn

    assert cgpn.TrackerEmbedder is TrackerEmbedder and "TrackerEmbedder" in cgpn.__all__

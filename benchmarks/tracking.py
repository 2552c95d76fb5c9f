"""What re-ID changes in a tracker: DeepSORT with and without appearance on the synthetic tracking benchmark.

deep-sort-realtime runs on the same detections of ``cgpn synth-video --preset benchmark`` (600 frames, 10
people, 3 look-alike pairs, 2 pillars) with (a) no appearance (every box the same feature: the Kalman gate
and IoU decide), (b) colour histograms, (c) the demo-trained cgpn network in fp32, (d) the same network in
bf16 autocast and through ONNX Runtime. DeepSORT's own ``max_age`` and ``max_cosine_distance`` are chosen
for each of (a)-(c) on a validation sequence (seed 1: other people, camera and walks), by IDF1; (d) reuses
the settings of (c). Then every method runs once on the test sequence (seed 0). Metrics: py-motmetrics
(IDF1, ID switches, MOTA) and TrackEval (HOTA, AssA). Goal (issue 11): (c) has at most half the ID switches
of (a), and a higher IDF1 and AssA than (a) and (b). The last columns say how well each embedding alone tells
the same person from another one second or more later (20,000 random gt-labelled pairs): the ROC AUC, and at
the method's cosine gate the share of other-person pairs under it (wrong merges) and of same-person pairs.

    python benchmarks/tracking.py                                  # trains the demo network first
    python benchmarks/tracking.py --checkpoint runs/demo/last.pt   # or uses yours
    python benchmarks/tracking.py --threads 2 --work /tmp/cgpn-tracking

The sequences, the demo data and the demo run are written under --work and reused by later runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from cgpn.config import TrackerSettings
from cgpn.engine.precision import machine_description
from cgpn.track.appearance import ColorHistogramEmbedder
from cgpn.track.embedder import TrackerEmbedder
from cgpn.track.metrics import TrackingMetrics, evaluate_tracking
from cgpn.track.mot import MotBoxes, read_mot
from cgpn.track.synth_video import MARKER, PRESETS, generate_synthetic_video
from cgpn.track.tracker import DeepSortTracker, sequence_features, track_frames, usable_boxes
from cgpn.track.video import FrameSource

ROOT = Path(__file__).resolve().parents[1]
MAX_AGES = (30, 60, 120, 240)  # frames at 25 fps: 1.2 s (deep-sort-realtime's default), 2.4, 4.8, 9.6 s
COSINES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)  # deep-sort-realtime's default is 0.2 (tuned for its own embedder)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="cgpn checkpoint (default: train configs/demo.yaml under --work)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cgpn-tracking"),
                   help="folder for the sequences, the demo data and the demo run (reused)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where cgpn runs: cpu | cuda")
    p.add_argument("--precisions", default="fp32,bf16,onnx", help="cgpn paths: (c) is the first, (d) the others")
    return p.parse_args()


def sequence(work: Path, name: str, seed: int) -> Path:
    """The benchmark preset with ``seed`` under ``work/name`` (written once, reused while its settings hold)."""
    spec = dataclasses.replace(PRESETS["benchmark"], seed=seed)
    out = work / name
    marker = out / MARKER
    if not marker.is_file() or json.loads(marker.read_text())["spec"] != dataclasses.asdict(spec):
        print(f"writing {out} (cgpn synth-video --preset benchmark --seed {seed}) ...", flush=True)
        generate_synthetic_video(out, spec, progress=False)
    return out


def demo_checkpoint(work: Path) -> Path:
    """``make demo``'s network: cgpn synth --preset demo, then cgpn train --config configs/demo.yaml (resumed if
    a run is there)."""
    data, run = work / "demo_data", work / "demo_run"
    cgpn = [sys.executable, "-m", "cgpn", "-q"]
    if not (data / "synthetic.json").is_file():
        subprocess.run([*cgpn, "synth", "--out", str(data), "--preset", "demo"], check=True)
    print("training the demo network (configs/demo.yaml; a finished run is only reloaded) ...", flush=True)
    subprocess.run([*cgpn, "train", "--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"data.root={data}",
                    "--set", f"output_dir={run}", "--resume", "auto"], check=True)
    return run / "last.pt"


def features(seq: Path, embedder) -> tuple[list[np.ndarray] | None, float]:
    """Per-frame features of ``seq``'s detections and crops/s (None, 0 without an embedder)."""
    if embedder is None:
        return None, 0.0
    det = read_mot(seq / "det.txt", "detections")
    start = time.perf_counter()
    out = sequence_features(FrameSource(seq / "img1"), det, embedder)
    return out, len(det) / (time.perf_counter() - start)


def separability(seq: Path, feats: list[np.ndarray] | None, gate: float, gap: int = 25,
                 pairs: int = 20000) -> tuple[float, float, float] | None:
    """How well the features alone tell two detections at least ``gap`` frames apart (what re-association
    after an occlusion needs) of the same person from two of different people, each labelled with the
    ground-truth person it overlaps at IoU >= 0.5, over ``pairs`` random pairs (seeded): the ROC AUC of the
    cosine similarity (0.5: chance), and at the cosine-distance ``gate`` DeepSORT uses, the share of
    other-person pairs under it (wrong merges) and of same-person pairs under it. None without features."""
    if feats is None:
        return None
    det, gt = usable_boxes(read_mot(seq / "det.txt", "detections")), read_mot(seq / "gt.txt", "ground truth")
    flat, frames, labels = np.concatenate([f for f in feats if len(f)]), det.frame, np.full(len(det), -1)
    for t in np.unique(frames):
        d, g = np.flatnonzero(frames == t), np.flatnonzero(gt.frame == t)
        if len(g):
            iou = box_iou(torch.from_numpy(det.xyxy[d]), torch.from_numpy(gt.xyxy[g])).numpy()
            best = iou.argmax(1)
            labels[d] = np.where(iou[np.arange(len(d)), best] >= 0.5, gt.ids[g][best], -1)
    keep = np.flatnonzero(labels >= 0)
    rng = np.random.default_rng(0)
    a, b = rng.choice(keep, pairs), rng.choice(keep, pairs)
    far = np.abs(frames[a] - frames[b]) >= gap
    a, b = a[far], b[far]
    norm = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    sim, same = (norm[a] * norm[b]).sum(1), labels[a] == labels[b]
    ranks = sim.argsort().argsort() + 1.0  # Mann-Whitney U: AUC from the ranks of the positives
    auc = (ranks[same].sum() - same.sum() * (same.sum() + 1) / 2) / (same.sum() * (~same).sum())
    under = 1 - sim < gate
    return float(auc), float(under[~same].mean()), float(under[same].mean())


def run(seq: Path, feats: list[np.ndarray] | None, settings: TrackerSettings) -> TrackingMetrics:
    """DeepSORT over ``seq`` with precomputed features (or none), scored against its gt.txt."""
    det, gt = read_mot(seq / "det.txt", "detections"), read_mot(seq / "gt.txt", "ground truth")
    frames = [None] * gt.num_frames
    per_frame = list(track_frames(frames, det, DeepSortTracker(None, settings), feats))
    numbers = np.concatenate([np.full(len(r), t) for t, _, r in per_frame])
    rows = np.concatenate([r for _, _, r in per_frame])
    return evaluate_tracking(gt, MotBoxes.from_rows(numbers, rows[:, 0], rows[:, 1:5], rows[:, 5]))


def choose(seq: Path, feats, appearance: bool) -> tuple[TrackerSettings, TrackingMetrics]:
    """The DeepSORT settings of the grid with the best IDF1 on ``seq`` (HOTA breaks ties)."""
    grid = [TrackerSettings(max_age=a, max_cosine_distance=c)
            for a, c in itertools.product(MAX_AGES, COSINES if appearance else (0.2,))]
    scored = [(s, run(seq, feats, s)) for s in grid]
    return max(scored, key=lambda item: (item[1].idf1, item[1].hota))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    print(f"machine: {machine_description(args.device)}")
    val, test = sequence(work, "val_seed1", 1), sequence(work, "test_seed0", 0)
    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_checkpoint(work)
    precisions = args.precisions.split(",")
    backend = {"fp32": "eager", "bf16": "bf16", "onnx": "onnx"}
    methods = {"(a) none": None, "(b) colour histogram": ColorHistogramEmbedder(bgr=False)}
    for i, p in enumerate(precisions):
        methods[f"({'c' if i == 0 else 'd'}) cgpn {p}"] = TrackerEmbedder(
            checkpoint, device=args.device, backend=backend[p], bgr=False)
    print(f"checkpoint: {checkpoint}; cgpn paths: " + ", ".join(
        f"{p} = backend {backend[p]}" for p in precisions))

    results = {}
    chosen: TrackerSettings | None = None
    for name, embedder in methods.items():
        val_feats, _ = features(val, embedder)
        test_feats, speed = features(test, embedder)
        if name.startswith("(d)") and chosen is not None:
            settings = chosen  # (c)'s settings: only the precision changes
        else:
            settings, _ = choose(val, val_feats, embedder is not None)
            if name.startswith("(c)"):
                chosen = settings
        default = run(test, test_feats, TrackerSettings())
        results[name] = (settings, run(test, test_feats, settings), default, speed,
                         separability(test, test_feats, settings.max_cosine_distance))
        r = results[name][1]
        print(f"  {name}: max_age {settings.max_age}, max_cosine_distance {settings.max_cosine_distance}: "
              f"{r.summary()}", flush=True)

    print(f"\ntest sequence (seed 0, {read_mot(test / 'gt.txt', 'ground truth').num_frames} frames); "
          "settings chosen on the validation sequence (seed 1)")
    print("| method | max_age | max_cos | IDF1 | ID sw | HOTA | AssA | DetA | MOTA | IDF1 / ID sw with the defaults "
          "(30, 0.2) | crops/s | same-person AUC | under the gate: other / same person |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (s, r, d, speed, auc) in results.items():
        cos = f"{s.max_cosine_distance}" if methods[name] is not None else "-"
        print(f"| {name} | {s.max_age} | {cos} | {100 * r.idf1:.1f} | {r.id_switches} | {100 * r.hota:.1f} | "
              f"{100 * r.assa:.1f} | {100 * r.deta:.1f} | {100 * r.mota:.1f} | {100 * d.idf1:.1f} / {d.id_switches} | "
              f"{f'{speed:.0f}' if speed else '-'} | {'-' if auc is None else f'{auc[0]:.3f}'} | "
              f"{'-' if auc is None else f'{100 * auc[1]:.1f} % / {100 * auc[2]:.0f} %'} |")
    a, b = results["(a) none"][1], results["(b) colour histogram"][1]
    c_name = next(n for n in results if n.startswith("(c)"))
    c = results[c_name][1]
    ratio = c.id_switches / max(a.id_switches, 1)
    print(f"\n{c_name} / (a): ID switches {c.id_switches} / {a.id_switches} = {ratio:.2f} (goal <= 0.5: "
          f"{'met' if ratio <= 0.5 else 'not met'}); IDF1 {100 * c.idf1:.1f} vs {100 * a.idf1:.1f} (a), "
          f"{100 * b.idf1:.1f} (b); AssA {100 * c.assa:.1f} vs {100 * a.assa:.1f} (a), {100 * b.assa:.1f} (b): "
          f"{'met' if c.idf1 > max(a.idf1, b.idf1) and c.assa > max(a.assa, b.assa) else 'not met'}")


if __name__ == "__main__":
    main()

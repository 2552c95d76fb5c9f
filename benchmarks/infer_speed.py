"""Images per second of each inference path of FeatureExtractor against eager fp32 PyTorch, in one run.

For every path (eager fp32, channels_last, bf16 autocast, torch.compile, ONNX Runtime) it prints the
setup time (export / compile), images/s on a batch of real images (flip-averaged, as the extractor
runs), the ratio to eager fp32, the smallest feature cosine to eager fp32, and, with --rank, Rank-1
and mAP on the CUHK03-NP mini set (query against gallery). A path is *safe* when cosine >= 0.999 and
Rank-1 equals eager's. The goal of issue 7 is >= 3x eager fp32 on the CPU. It also prints the network's
work per image and this CPU's fp32 matrix-multiply rate: an exact fp32 path cannot run the work faster
than that, which bounds what any fp32 backend can gain over eager. ``--int8`` adds the figure of an int8
graph (ONNX Runtime static quantisation), as a measurement.

    python benchmarks/infer_speed.py --device cpu                       # CGPN-R50 at 384 x 128
    python benchmarks/infer_speed.py --device cpu --rank --checkpoint runs/x/last.pt
    python benchmarks/infer_speed.py --device cpu --paths eager,onnx --int8
    python benchmarks/infer_speed.py --device cuda --paths eager,channels_last,bf16,compile,onnx --rank

Timings on a shared machine are noisy: compare ratios within one run, and rerun.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cgpn.config import Config, DataConfig
from cgpn.data.datasets import build_dataset
from cgpn.engine.checkpoint import build_model_from_config, load_model
from cgpn.engine.precision import cpu_has_native_bf16, machine_description
from cgpn.extractor import FeatureExtractor
from cgpn.metrics.rank import evaluate, pairwise_distance

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CGPN_SHARED", ROOT.parent / "shared"))  # as in tests/conftest.py
DEFAULT_DATA = SHARED / "data" / "cuhk03-np-mini" / "labeled"
PATHS = ("eager", "channels_last", "bf16", "compile", "onnx")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    p.add_argument("--checkpoint", help="a trained checkpoint (default: an untrained CGPN of --backbone)")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="images per timed forward pass (x2 with the mirror)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per path (median reported)")
    p.add_argument("--slow-factor", type=float, default=4.0,
                   help="a path this many times slower than eager on one image is timed on that image only")
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="Market-layout folder (query/, bounding_box_test/)")
    p.add_argument("--rank", action="store_true", help="also Rank-1 / mAP of each path on the data set")
    p.add_argument("--rank-ids", type=int, default=0, help="with --rank: only the first N test identities (0: all)")
    p.add_argument("--int8", action="store_true",
                   help="also time an int8 graph (ONNX Runtime static quantisation, calibrated on gallery images): "
                        "a measurement of what int8 would give, not a FeatureExtractor path")
    return p.parse_args()


def independent_branches(model: nn.Module) -> nn.Module:
    """An untrained CGPN with its own weights in each branch, like a trained one.

    Untrained branches are copies of one ResNet's layers; the ONNX export then stores the identical
    weights once and ONNX Runtime computes the three branches as one, a 1.8x speed-up no trained network
    gets (measured: 2.62x eager with copies, 1.3x with distinct weights).
    """
    for branch in model.branches:
        for module in branch.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


def gflop_per_image(model: nn.Module, height: int, width: int, flip: bool) -> float:
    """Floating-point work of one image's test feature (2 per multiply-add; twice with the mirror)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.eval()(torch.zeros(1, 3, height, width))
    return counter.get_total_flops() / 1e9 * (2 if flip else 1)


def matmul_gflops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This CPU's matrix-multiply rate (GFLOP/s) in ``dtype`` with torch's threads: the ceiling of a path
    that computes in that precision (fp32 for the exact paths, bf16 for bf16 autocast). The fastest of
    ``repeats`` products: a ceiling, which other jobs on a shared machine can only lower (a mean of 5 moved
    between 160 and 255 GFLOP/s in runs an hour apart)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size**3 / fastest / 1e9


def int8_rate(model: nn.Module, cfg: Config, batch: torch.Tensor, calibration: torch.Tensor,
              repeats: int) -> tuple[float, np.ndarray]:
    """Images/s and features of ``batch`` through an int8 graph: per-channel int8 weights, uint8 activations
    with ranges calibrated on ``calibration`` (QDQ format, ONNX Runtime's quantize_static)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cgpn.export import export_onnx
    from cgpn.runtime import onnx_session

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": x.numpy()} for x in calibration.split(4)])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, int8 = (os.path.join(tmp, f"{n}.onnx") for n in ("fp32", "pre", "int8"))
        export_onnx(model, fp32, cfg.data.height, cfg.data.width, flip=True)
        quant_pre_process(fp32, pre, skip_symbolic_shape=True)
        quantize_static(pre, int8, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        session = onnx_session(int8)
    x = batch.numpy()
    session.run(["features"], {"images": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        feats = session.run(["features"], {"images": x})[0]
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times), feats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(extractor: FeatureExtractor, batch: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` passes over ``batch`` (after one untimed warm-up pass)."""
    extractor.features(batch)
    times = []
    for _ in range(repeats):
        _sync(extractor.device)
        start = time.perf_counter()
        extractor.features(batch)
        _sync(extractor.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    args = parse_args()
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        sys.exit(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if "eager" not in paths:
        paths.insert(0, "eager")
    if args.checkpoint:
        model, cfg = load_model(args.checkpoint)
    else:
        cfg = Config.from_dict({"model": {"backbone": args.backbone, "pretrained": False},
                                "data": {"height": args.height, "width": args.width}})
        torch.manual_seed(0)
        model = independent_branches(build_model_from_config(cfg, num_classes=751, pretrained=False))
    data = build_dataset("market1501", args.data_root, DataConfig(verify_counts="ignore"))
    device = torch.device(args.device)
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    print(f"machine: {machine_description(device)}")
    print(f"CGPN ({cfg.model.backbone}) at {cfg.data.height}x{cfg.data.width}, flip-averaged, batch {args.batch_size}, "
          f"device {device}, torch {torch.__version__} ({torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}), onnxruntime {ort_version}")

    work = gflop_per_image(model, cfg.data.height, cfg.data.width, flip=True)
    peak = matmul_gflops() if device.type == "cpu" else float("nan")
    peak_bf16 = matmul_gflops(dtype=torch.bfloat16) if device.type == "cpu" else float("nan")
    print(f"work: {work:.1f} GFLOP per flip-averaged image; matrix multiply here: fp32 {peak:.0f} GFLOP/s (ceiling "
          f"of the exact paths), bf16 {peak_bf16:.0f} GFLOP/s (ceiling of bf16 autocast; "
          f"{'native' if cpu_has_native_bf16() else 'emulated'} on this CPU)")

    probe_extractor = FeatureExtractor(model, device=args.device, backend="eager", config=cfg, progress=False)
    batch = torch.stack([probe_extractor.preprocess(s.path) for s in data.query[: args.batch_size]])
    one = batch[:1]

    rank_sets = None
    if args.rank:
        test_ids = sorted({s.pid for s in data.query})
        keep = set(test_ids[: args.rank_ids]) if args.rank_ids else set(test_ids)
        rank_sets = ([s for s in data.query if s.pid in keep], [s for s in data.gallery if s.pid in keep])
        print(f"ranking {len(rank_sets[0])} queries against {len(rank_sets[1])} gallery images of {args.data_root}")

    rows, reference, eager_rate, eager_rank, eager_one = [], None, None, None, None
    for name in paths:
        start = time.perf_counter()
        try:
            extractor = FeatureExtractor(model, device=args.device, backend=name, config=cfg,
                                         batch_size=args.batch_size, progress=False)
            extractor.features(one)  # compile / export / first-call work counts as setup
        except Exception as err:  # a path that cannot run here (no compiler, no onnxruntime...) is reported
            print(f"{name:<14} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        setup = time.perf_counter() - start
        start = time.perf_counter()
        feats_one = extractor.features(one)
        one_time = time.perf_counter() - start
        if eager_one is None:
            eager_one = one_time
        # latency against latency: one image is far below batch throughput on a GPU
        if one_time > args.slow_factor * eager_one:
            rate, note = 1 / one_time, "1 image only (slow path)"
            cosine = float((feats_one * reference[:1]).sum(1).min())
        else:
            rate, note = len(batch) / _time(extractor, batch, args.repeats), ""
            feats = extractor.features(batch)
            if reference is None:
                reference = feats
            cosine = float((feats * reference).sum(1).min())
        if eager_rate is None:
            eager_rate = rate
        rank = ""
        if rank_sets is not None and note:
            rank = "(ranking skipped: slow path)"
        elif rank_sets is not None and cosine >= 0.999:
            extractor.progress = None
            qf = extractor([s.path for s in rank_sets[0]])
            gf = extractor([s.path for s in rank_sets[1]])
            ids = [np.array([getattr(s, k) for s in subset]) for subset in rank_sets for k in ("pid", "camid")]
            result = evaluate(pairwise_distance(qf, gf), ids[0], ids[2], ids[1], ids[3])
            eager_rank = eager_rank or result
            same = "same" if result.rank(1) == eager_rank.rank(1) else "DIFFERENT"
            rank = f"{100 * result.rank(1):6.1f} {100 * result.mAP:6.1f}  ({same} Rank-1 as eager)"
        rows.append((name, setup, rate, rate / eager_rate, cosine, rank, note))
        print(f"{name:<14} setup {setup:7.1f} s  {rate:8.2f} img/s ({rate * work:4.0f} GFLOP/s)  "
              f"{rate / eager_rate:5.2f}x eager  "
              f"min cosine {cosine:.6f}  {rank} {note}".rstrip(), flush=True)

    if args.int8 and device.type == "cpu":
        calibration = torch.stack([probe_extractor.preprocess(s.path) for s in data.gallery[:16]])
        rate, feats = int8_rate(model, cfg, batch, calibration, args.repeats)
        cosine = float((torch.from_numpy(feats) * reference).sum(1).min())
        print(f"{'int8 (ORT)':<14} {'':15} {rate:8.2f} img/s  {'':16}{rate / eager_rate:5.2f}x eager  "
              f"min cosine {cosine:.6f}  (measurement only, not a FeatureExtractor path)", flush=True)

    safe = [r for r in rows if r[4] >= 0.999 and "DIFFERENT" not in r[5] and not r[6]]
    best = max(safe, key=lambda r: r[2])
    print(f"\nfastest safe path: {best[0]} at {best[2]:.2f} img/s = {best[3]:.2f}x eager fp32 (goal: 3x)")
    if device.type == "cpu":
        need = 3 * eager_rate * work
        print(f"3x eager = {3 * eager_rate:.2f} img/s = {need:.0f} GFLOP/s of the network's fp32 work, "
              f"{need / peak:.2f}x this CPU's fp32 matrix-multiply rate ({peak:.0f} GFLOP/s): "
              f"{'out of reach of an exact fp32 path' if need > peak else 'within reach'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

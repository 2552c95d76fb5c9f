"""Images/s of one CGPN training iteration per precision and memory format, and of the data loader beside it.

An iteration is what ``cgpn.engine.trainer.Trainer.run_step`` does: forward under autocast, the eq. 4
losses in fp32, backward, an SGD step (GradScaler for fp16). The same step of a plain torchvision
ResNet-50 classifier (the trunk CGPN is built from) runs in the same process as a reference, and the
ratio is printed. The loader row reads JPEGs of a synthetic Market-layout set (or ``--data-root``)
through the training transforms, as training does. Defaults are the paper's: ResNet-50, 384 x 128,
batch 64. Goal (issue 6): >= 1,600 images/s on one H100, and the loader never the bottleneck.

    python benchmarks/train_speed.py --device cuda                      # every precision x format, + compile
    python benchmarks/train_speed.py --device cpu --steps 1 --precisions fp32 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cgpn.config import Config, LossConfig  # noqa: E402
from cgpn.data.datasets import build_dataset  # noqa: E402
from cgpn.data.datasets.synthetic import SyntheticSpec, generate_synthetic  # noqa: E402
from cgpn.data.loader import build_train_loader  # noqa: E402
from cgpn.engine.inference import resolve_device  # noqa: E402
from cgpn.engine.precision import Precision, machine_description, resolve_precision  # noqa: E402
from cgpn.engine.trainer import memory_format  # noqa: E402
from cgpn.losses import CGPNLoss  # noqa: E402
from cgpn.model import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_speed(kind: str, args: argparse.Namespace, device: torch.device, precision: Precision,
               channels_last: bool, compile_model: bool = False) -> float:
    """Images/s of ``args.steps`` timed iterations (after ``args.warmup``) of a CGPN or plain ResNet step."""
    fmt = memory_format(channels_last)
    num_classes = 751  # Market-1501's training identities
    if kind == "cgpn":
        model = build_model("cgpn", num_classes, backbone=args.backbone, pretrained=False)
        criterion = CGPNLoss(LossConfig())
    else:
        model = getattr(torchvision.models, args.backbone)(num_classes=num_classes)
        criterion = None
    model = model.to(device, memory_format=fmt).train()
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = precision.grad_scaler()
    images = torch.randn(args.batch_size, 3, args.height, args.width, device=device).to(memory_format=fmt)
    pids = torch.arange(args.batch_size, device=device) // math.gcd(args.batch_size, 8)  # P x K, K = 8

    def one() -> None:
        with precision.autocast():
            out = forward(images)
        loss = criterion(out, pids)[0] if criterion else torch.nn.functional.cross_entropy(out.float(), pids)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        one()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        one()
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def loader_speed(args: argparse.Namespace, root: Path, workers: int) -> float:
    """Images/s the seeded P x K training loader delivers (decode, resize, flip, normalise)."""
    cfg = Config().data
    cfg.height, cfg.width, cfg.batch_size, cfg.workers = args.height, args.width, args.batch_size, workers
    cfg.num_instances = math.gcd(args.batch_size, 8)  # K = 8 as in the paper when the batch allows it
    dataset = build_dataset(args.dataset, root)
    loader = build_train_loader(dataset.train, cfg, seed=0)
    it = iter(loader)
    next(it)  # worker start-up is not part of the rate
    start, n = time.perf_counter(), 0
    for _ in range(args.loader_batches):
        try:
            n += len(next(it)[0])
        except StopIteration:
            loader.batch_sampler.set_epoch(1)
            it = iter(loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed iterations per setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precisions", default="", help="comma list of fp32,bf16,fp16 (default: all the device has)")
    p.add_argument("--formats", default="contiguous,channels_last")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the fastest setting")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain ResNet step")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--data-root", help="a data set for the loader row (default: a synthetic set in a temp dir)")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--workers", default="2,4,8", help="loader worker counts to time")
    p.add_argument("--loader-batches", type=int, default=20)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    auto = resolve_precision("auto", device).name
    wanted = args.precisions.split(",") if args.precisions else (
        ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    print(f"machine: {machine_description(device)}; engine.precision=auto picks {auto}")
    print(f"CGPN-{args.backbone} at {args.height}x{args.width}, batch {args.batch_size}, "
          f"{args.steps} timed iterations after {args.warmup}")
    print(f"{'precision':<10}{'format':<15}{'CGPN img/s':>12}{'ResNet img/s':>14}{'CGPN/ResNet':>13}")
    results = {}
    for prec_name in wanted:
        try:
            precision = resolve_precision(prec_name, device)
        except Exception as err:  # e.g. fp16 on the CPU, bf16 on an old GPU
            print(f"{prec_name:<10}skipped: {err}")
            continue
        for fmt in args.formats.split(","):
            cl = fmt == "channels_last"
            cgpn = step_speed("cgpn", args, device, precision, cl)
            base = None if args.no_baseline else step_speed("resnet", args, device, precision, cl)
            results[(prec_name, fmt)] = cgpn
            print(f"{prec_name:<10}{fmt:<15}{cgpn:>12.3g}" + (f"{base:>14.3g}{cgpn / base:>13.2f}" if base else ""),
                  flush=True)
    best = max(results, key=results.get)
    print(f"fastest: engine.precision={best[0]} engine.channels_last={str(best[1] == 'channels_last').lower()}"
          f" ({results[best]:.3g} img/s)")
    if args.compile:
        c = step_speed("cgpn", args, device, resolve_precision(best[0], device), best[1] == "channels_last", True)
        print(f"  + engine.compile=true: {c:.3g} img/s ({c / results[best]:.2f}x)")

    with contextlib.ExitStack() as stack:
        root = Path(args.data_root) if args.data_root else None
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            generate_synthetic(root, SyntheticSpec(train_ids=100, test_ids=4, images_per_id=12), progress=False)
        for w in (int(x) for x in args.workers.split(",")):
            speed = loader_speed(args, root, w)
            print(f"loader, {w} workers: {speed:.1f} img/s ({speed / results[best]:.1f}x the fastest training step)",
                  flush=True)


if __name__ == "__main__":
    main()

"""Is the data loader the bottleneck? Images/s of the training loader alone vs the model's training step.

The loader reads JPEGs through the P x K sampler with the training transforms (decode, resize, flip,
normalise) in ``--workers`` processes; the model step is forward + loss + backward + SGD step on random
input of the same shape, on ``--device``. The ratio loader / model should be above 1.

    python benchmarks/loader_speed.py                       # CPU: synthetic data, both models
    python benchmarks/loader_speed.py --device cuda --workers 4 8 --data-root ~/data --dataset market1501

Models: CGPN-R50 at 384 x 128, batch 64 (the paper) and the demo's CGPN-ResNet-18 at 192 x 64, batch 32.
With ``--workers 0`` the transforms run in this process under ``--threads`` torch threads; on a busy CPU
more than one thread makes these small tensor operations much slower (worker processes use one each).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import torch

from cgpn.config import Config, DataConfig, load_config
from cgpn.data.datasets import build_dataset
from cgpn.data.datasets.synthetic import SyntheticSpec, generate_synthetic
from cgpn.data.loader import build_train_loader
from cgpn.engine.checkpoint import build_model_from_config
from cgpn.engine.precision import machine_description
from cgpn.losses import CGPNLoss

SETUPS = {  # name -> (backbone, height, width, batch, K)
    "cgpn-r50 384x128 b64": ("resnet50", 384, 128, 64, 8),
    "demo cgpn-r18 192x64 b32": ("resnet18", 192, 64, 32, 4),
}


def loader_rate(samples, data: DataConfig, batches: int) -> float:
    """Images/s of the training loader, after its first batch (worker start-up excluded)."""
    loader = build_train_loader(samples, data, seed=0)
    seen, start, epoch = 0, None, 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        for images, *_ in loader:
            if start is None:
                start = time.perf_counter()
                continue
            seen += len(images)
            if seen >= batches * data.batch_size:
                return seen / (time.perf_counter() - start)
        epoch += 1


def model_rate(backbone: str, height: int, width: int, batch: int, k: int, device: torch.device,
               steps: int, num_classes: int = 751) -> float:
    """Images/s of forward + loss + backward + SGD step (after one warm-up step)."""
    cfg = Config()
    cfg.model = replace(cfg.model, backbone=backbone, pretrained=False)
    model = build_model_from_config(cfg, num_classes).to(device).train()
    criterion = CGPNLoss(cfg.loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, height, width, device=device)
    pids = torch.arange(batch // k, device=device).repeat_interleave(k)
    for step in range(steps + 1):
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _ = criterion(model(images), pids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="device of the model step (cpu, cuda, cuda:1)")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-root", help="data folder; default: a synthetic set written to a temporary folder")
    p.add_argument("--ids", type=int, default=64, help="identities of the temporary synthetic set")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader processes to try")
    p.add_argument("--batches", type=int, default=30, help="loader batches to time (well above the prefetched ones)")
    p.add_argument("--steps", type=int, default=2, help="model steps to time")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if root is None:  # Market-sized images (128 x 64 JPEG)
            generate_synthetic(tmp, SyntheticSpec(train_ids=args.ids, test_ids=4, images_per_id=8), progress=False)
            root = tmp
        dataset = build_dataset(args.dataset, root, load_config().data)
        print(f"machine: {machine_description(device)}; {len(dataset.train)} training images")
        print(f"{'setup':<26} {'workers':>7} {'loader img/s':>13} {'model img/s':>12} {'loader/model':>13}")
        for name in args.setups:
            backbone, h, w, batch, k = SETUPS[name]
            model = model_rate(backbone, h, w, batch, k, device, args.steps)
            for workers in args.workers:
                data = DataConfig(height=h, width=w, batch_size=batch, num_instances=k, workers=workers)
                rate = loader_rate(dataset.train, data, args.batches)
                print(f"{name:<26} {workers:>7} {rate:>13.1f} {model:>12.1f} {rate / model:>13.2f}")


if __name__ == "__main__":
    main()

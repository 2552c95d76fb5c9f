"""Training with the paper's recipe (Section 4.2): P x K batches, SGD, step decay, flip augmentation.

``train(cfg)`` builds everything from a config, writes ``config.yaml`` into ``cfg.output_dir`` and a
checkpoint after every epoch (``last.pt``), and evaluates the untrained network first when
``engine.eval_at_start`` is set, so that a run shows what training added.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cgpn.config import Config, save_config
from cgpn.data.datasets import build_dataset
from cgpn.data.loader import build_train_loader
from cgpn.engine.checkpoint import build_model_from_config, save_checkpoint
from cgpn.engine.evaluation import evaluate_model
from cgpn.engine.inference import resolve_device
from cgpn.errors import ConfigError
from cgpn.losses import CGPNLoss
from cgpn.metrics.rank import RankResult

__all__ = ["TrainResult", "build_optimizer", "build_scheduler", "seed_everything", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced: the last checkpoint, the losses per epoch and the evaluations by epoch."""

    checkpoint: Path
    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    evaluations: dict[int, RankResult] = field(default_factory=dict)  # epoch -> result (0 = untrained)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    s = cfg.solver
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                               nesterov=s.nesterov)
    if s.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    raise ConfigError(f"solver.optimizer must be sgd or adam, got {s.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch factor: linear warm-up over ``warmup_epochs``, then x gamma at each milestone."""
    s = cfg.solver

    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / s.warmup_epochs) if s.warmup_epochs > 0 else 1.0
        return warm * s.gamma ** sum(epoch >= m for m in s.milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _log_eval(label: str, result: RankResult) -> None:
    logger.info("%s: %s", label, result.summary())


def train(cfg: Config) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.solver.epochs`` epochs; see the module docstring."""
    if cfg.engine.threads > 0:
        torch.set_num_threads(cfg.engine.threads)
    seed_everything(cfg.engine.seed, cfg.engine.deterministic)
    device = resolve_device(cfg.engine.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    dataset = build_dataset(cfg.data.dataset, cfg.data.root)
    logger.info("\n%s", dataset.summary())
    num_classes = dataset.num_train_pids
    model = build_model_from_config(cfg, num_classes).to(device)
    criterion = CGPNLoss(cfg.loss)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    loader = build_train_loader(dataset.train, cfg.data, seed=cfg.engine.seed)
    result = TrainResult(checkpoint=out / "last.pt")

    if cfg.engine.eval_at_start:
        result.evaluations[0] = evaluate_model(model, dataset, cfg, device)
        _log_eval("untrained", result.evaluations[0])

    for epoch in range(cfg.solver.epochs):
        model.train()
        loader.batch_sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        start, seen = time.perf_counter(), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.solver.epochs}", unit="batch", leave=False)
        for images, pids, _, _ in bar:
            images, pids = images.to(device, non_blocking=True), pids.to(device, non_blocking=True)
            loss, terms = criterion(model(images), pids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            terms["total"] = float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            seen += len(images)
            bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()}, refresh=False)
        scheduler.step()
        means = {k: v / len(loader) for k, v in sums.items()}
        result.epoch_losses.append(means)
        logger.info("epoch %d/%d  %s  lr %.2e  %.1f img/s", epoch + 1, cfg.solver.epochs,
                    "  ".join(f"{k} {v:.4f}" for k, v in means.items()), optimizer.param_groups[0]["lr"],
                    seen / (time.perf_counter() - start))
        save_checkpoint(result.checkpoint, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1, "config": cfg.to_dict(), "num_classes": num_classes,
        })
        last = epoch + 1 == cfg.solver.epochs
        if last or (cfg.engine.eval_period and (epoch + 1) % cfg.engine.eval_period == 0):
            result.evaluations[epoch + 1] = evaluate_model(model, dataset, cfg, device)
            _log_eval(f"epoch {epoch + 1}", result.evaluations[epoch + 1])
    return result

"""Training with the paper's recipe (Section 4.2): P x K batches, SGD, step decay, flip augmentation.

``train(cfg)`` builds everything from a config and runs a ``Trainer``: a short loop of iterations
(forward under autocast, fp32 losses, backward, step) with hooks around it for stop signals, the LR
schedule, evaluation, checkpoints and logging (``cgpn.engine.hooks``). A run folder
(``cfg.output_dir``) receives ``config.yaml``, ``last.pt`` / ``best.pt`` / ``checkpoints/``,
``metrics.csv`` and ``tensorboard/``. ``engine.eval_at_start`` evaluates the untrained network first,
so that a run shows what training added.

Resuming (``resume="auto"`` or a path) restores the model, optimizer, scheduler, grad scaler, the
position inside the epoch and every RNG state; the training batches are a pure function of (seed,
epoch, batch) (``cgpn.data.loader``), so with ``engine.deterministic`` on the CPU a run killed at any
iteration and resumed ends with the same weights, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cgpn.config import Config, SolverConfig, save_config
from cgpn.data.datasets import dataset_from_config
from cgpn.data.loader import build_train_loader
from cgpn.engine.checkpoint import (
    Checkpointer,
    build_model_from_config,
    capture_rng,
    check_run_dir,
    find_resume_checkpoint,
    load_checkpoint,
    load_weights,
    rank_result_from_state,
    rank_result_state,
    restore_rng,
    state_nbytes,
    step_checkpoints,
)
from cgpn.engine.distributed import (
    DistEnv,
    any_rank,
    from_main_process,
    gather_across_processes,
    init_distributed,
)
from cgpn.engine.evaluation import evaluate_model
from cgpn.engine.events import MetricsWriter
from cgpn.engine.hooks import (
    Evaluator,
    FinalTest,
    HookBase,
    LRScheduler,
    MetricsLogger,
    PeriodicCheckpoint,
    StopOnSignal,
    TimeShares,
)
from cgpn.engine.inference import resolve_device
from cgpn.engine.precision import Precision, narrow_strided_convs, resolve_precision
from cgpn.engine.timing import PhaseClock
from cgpn.errors import ConfigError, TrainingDivergedError
from cgpn.files import lock_folder
from cgpn.losses import CGPNLoss
from cgpn.metrics.rank import RankResult

__all__ = ["TrainResult", "Trainer", "build_optimizer", "build_scheduler",
           "seed_everything", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced: checkpoints, the losses per epoch, the evaluations by epoch and the network.

    ``evaluations`` are on ``split``: ``val`` when ``data.val_ids`` holds out a validation split (then
    ``test`` is the test split, evaluated once on the weights of ``best.pt``, at epoch ``test_epoch``),
    else ``test`` (then ``test`` is the last epoch's evaluation, i.e. that of ``last.pt``).
    """

    checkpoint: Path  # last.pt
    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    evaluations: dict[int, RankResult] = field(default_factory=dict)  # epoch -> result (0 = untrained)
    best_checkpoint: Path | None = None  # best.pt (best mAP on split), if an evaluation took place
    split: str = "test"  # what evaluations and best.pt were measured on: val | test
    test: RankResult | None = None  # the run's test-split figure (see above)
    test_epoch: int | None = None
    model: nn.Module | None = None  # the trained network (this process's copy; eval mode)
    rank: int = 0  # this process under torchrun; only rank 0 evaluates and holds the evaluations


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD (the paper's) or Adam over every parameter, with ``cfg.solver``'s settings."""
    s = cfg.solver
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                               nesterov=s.nesterov)
    if s.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    raise ConfigError(f"solver.optimizer must be sgd or adam, got {s.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch factor: linear warm-up over ``warmup_epochs``, then x gamma at each milestone."""
    s = cfg.solver

    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / s.warmup_epochs) if s.warmup_epochs > 0 else 1.0
        return warm * s.gamma ** sum(epoch >= m for m in s.milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of the model's weights and batches: NHWC for ``engine.channels_last``, else NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format


class Trainer:
    """Runs ``max_epochs`` epochs of iterations over ``loader`` and calls ``hooks`` around them.

    ``model`` is the network whose state is saved; ``train_model`` is what the forward pass calls (the
    same module, or it wrapped in DDP / ``torch.compile``). ``extra_state`` (config, class count) is
    embedded in every checkpoint.
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, criterion: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 loader: DataLoader, device: torch.device, precision: Precision, max_epochs: int, env: DistEnv,
                 channels_last: bool = False, extra_state: dict[str, Any] | None = None,
                 metrics: MetricsWriter | None = None) -> None:
        self.model, self.train_model, self.criterion = model, train_model, criterion
        self.optimizer, self.scheduler, self.loader = optimizer, scheduler, loader
        self.device, self.precision, self.max_epochs, self.env = device, precision, max_epochs, env
        self.memory_format = memory_format(channels_last)
        self.scaler = precision.grad_scaler()
        self.extra_state, self.metrics = extra_state or {}, metrics
        self.hooks: list[HookBase] = []
        self.epoch = self.batch = self.step = 0  # position: epoch index, batches done in it, iterations done
        self.epoch_length = len(loader)
        self.epoch_losses: list[dict[str, float]] = []
        self.evaluations: dict[int, RankResult] = {}
        self.best: tuple[int, float] | None = None  # (epoch, mAP)
        self.test_result: tuple[int, RankResult] | None = None  # (epoch of the weights, test split); FinalTest
        self.is_best = False  # the evaluation of the epoch just completed is the best so far
        self.stop_requested = False
        self.failed_evaluation: BaseException | None = None  # raised once the epoch's checkpoint is saved
        self.last_checkpoint: Path | None = None
        self.last_terms: dict[str, float] = {}
        self.last_batch_size = 0
        self.clock = PhaseClock(device)  # time per phase (data, forward, ..., each hook's phase); TimeShares logs it
        self._sums: dict[str, float] = {}  # loss terms summed over the current epoch

    def register(self, *hooks: HookBase) -> None:
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            with self.clock.phase(hook.phase):
                getattr(hook, point)()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> None:
        """The loop; a stop request (Ctrl-C) raises KeyboardInterrupt once the checkpoint hook has saved, a
        failed evaluation raises its error once the epoch's checkpoint is written."""
        try:
            self._call("before_train")
            self._raise_failed_evaluation()
            while self.epoch < self.max_epochs:
                self.loader.batch_sampler.set_epoch(self.epoch, self.batch)
                self._call("before_epoch")
                for images, pids, *_ in self.clock.timed("data", self.loader):
                    self._call("before_step")
                    self.run_step(images, pids)
                    self._call("after_step")
                    if self.stop_requested:
                        self._stop()
                self.epoch_losses.append({k: v / self.batch for k, v in self._sums.items()})
                self.epoch, self.batch, self._sums = self.epoch + 1, 0, {}
                self._call("after_epoch")
                self.is_best = False
                self._raise_failed_evaluation()
                if self.stop_requested:
                    self._stop()
        finally:
            self._call("after_train")

    def _raise_failed_evaluation(self) -> None:
        if self.failed_evaluation is not None:
            error, self.failed_evaluation = self.failed_evaluation, None
            raise error

    def _stop(self) -> None:
        if self.env.is_main:
            logger.warning("stopped at epoch %d, iteration %d (step %d); saved %s; continue with --resume auto",
                           self.epoch + 1, self.batch, self.step, self.last_checkpoint)
        raise KeyboardInterrupt

    def run_step(self, images: torch.Tensor, pids: torch.Tensor) -> None:
        """One iteration: forward (autocast), fp32 losses, a finite check, backward and optimizer step."""
        with self.clock.phase("forward"):
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            pids = pids.to(self.device, non_blocking=True)
            with self.precision.autocast():
                output = self.train_model(images)
            loss, terms = self.criterion(output, pids)  # outside autocast: the losses cast to fp32
            terms["total"] = float(loss.detach())
        bad = next((k for k, v in terms.items() if not math.isfinite(v)), None)
        if any_rank(bad is not None, self.env, self.device):
            what = f"loss term '{bad}' is {terms[bad]}" if bad else "a loss term is not finite on another process"
            what += f" at epoch {self.epoch + 1}, iteration {self.batch + 1} (step {self.step + 1})"
            raise TrainingDivergedError(
                f"{what}; stopped before that update; last good checkpoint: {self.last_checkpoint or 'none yet'} "
                f"(try a lower solver.lr or solver.warmup_epochs"
                f"{'' if self.precision.name == 'fp32' else ' or engine.precision=fp32'})", what)
        with self.clock.phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with self.clock.phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.batch, self.step = self.batch + 1, self.step + 1
        for k, v in terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self.last_terms, self.last_batch_size = terms, len(images)

    def check_weights(self) -> None:
        """Refuse to checkpoint non-finite weights: the last checkpoint on disk stays the last good one."""
        names, params = zip(*self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for p in params]).cpu()  # one device sync, not one each
        if not finite.all():
            bad = names[int((~finite).nonzero()[0])]
            what = f"parameter '{bad}' is not finite after step {self.step} (epoch {self.epoch + 1})"
            raise TrainingDivergedError(
                f"{what}; not saved; last good checkpoint: {self.last_checkpoint or 'none yet'} (try a lower solver.lr)",
                what)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one is."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "loss_sums": dict(self._sums),
            "epoch_losses": list(self.epoch_losses),
            "evaluations": {e: rank_result_state(r) for e, r in self.evaluations.items()},
            "best": list(self.best) if self.best else None, "rng": capture_rng(), **self.extra_state,
            "test": ({"epoch": self.test_result[0], "result": rank_result_state(self.test_result[1])}
                     if self.test_result else None),
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Continue from a checkpoint ``state_dict`` wrote (the model's weights are loaded by the caller)."""
        # this run's solver settings (lr, momentum, weight decay...) over the checkpoint's: the optimizer's
        # buffers and the schedule's position come from the checkpoint, the settings from the config
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = base_lrs
        for group, own, base, factor in zip(self.optimizer.param_groups, settings, base_lrs,
                                            self.scheduler.lr_lambdas):
            group.update(own, lr=base * factor(self.scheduler.last_epoch))
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = state["epoch"], state.get("batch", 0), state.get("step", 0)
        self._sums = dict(state.get("loss_sums", {}))
        self.epoch_losses = list(state.get("epoch_losses", []))
        self.evaluations = {int(e): rank_result_from_state(r) for e, r in state.get("evaluations", {}).items()}
        self.best = tuple(state["best"]) if state.get("best") else None
        if state.get("test"):
            self.test_result = (state["test"]["epoch"], rank_result_from_state(state["test"]["result"]))
        self.last_checkpoint = Path(source)
        if "rng" in state:
            restore_rng(state["rng"])
        if self.batch > self.epoch_length:
            raise ConfigError(f"checkpoint '{source}' stopped after batch {self.batch} of an epoch that now has "
                              f"{self.epoch_length}; resume with the data settings it was trained with")


def _checkpoint_bytes(model: nn.Module, solver: SolverConfig) -> int:
    """About the size of one checkpoint: weights plus the optimizer's per-parameter buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = {"sgd": 1 if solver.momentum else 0, "adam": 2}.get(solver.optimizer, 2)
    return state_nbytes(model.state_dict()) + buffers * params


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts, as ``section.key``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _device(cfg: Config, env: DistEnv) -> torch.device:
    if env.distributed and cfg.engine.device.startswith("cuda:"):
        raise ConfigError(f"engine.device={cfg.engine.device} under torchrun would put every process on one GPU; "
                          f"use engine.device=cuda (each process takes its LOCAL_RANK GPU) and choose GPUs "
                          f"with CUDA_VISIBLE_DEVICES")
    if env.distributed and torch.cuda.is_available() and cfg.engine.device in ("auto", "cuda"):
        return torch.device("cuda", env.local_rank)
    return resolve_device(cfg.engine.device)


def train(cfg: Config, resume: str | None = None, finetune: str | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.solver.epochs`` epochs; see the module docstring.

    Args:
        cfg: the resolved config.
        resume: a checkpoint to continue from, or ``auto`` (the newest in ``cfg.output_dir``; a fresh
            start if there is none).
        finetune: a checkpoint whose weights, except the identity classifiers, start a new run.
    """
    cfg.validate()  # a bad test.* setting fails now, not at the first evaluation hours in
    if resume and finetune:
        raise ConfigError("--resume and --finetune exclude each other: resume continues a run, finetune starts "
                          "a new one from another run's weights")
    env = init_distributed(cfg.engine)
    with _process_settings_restored(), contextlib.ExitStack() as held:  # held: the run folder's lock
        try:
            return _train(cfg, env, resume, finetune, held)
        finally:
            env.close()


def _check_no_other_run(out: Path, state: dict[str, Any] | None) -> None:
    """Refuse to mix two runs' checkpoints in one folder: pruning keeps the highest step numbers and
    ``--resume auto`` takes the highest, so an older run's files would replace this run's."""
    steps = step_checkpoints(out)
    if state is None:
        if steps or (out / "last.pt").is_file():
            raise ConfigError(f"output_dir '{out}' already holds a run "
                              f"({steps[max(steps)].name if steps else 'last.pt'}); continue it with --resume auto, "
                              f"or start anew in another folder with --set output_dir=DIR")
        return
    resumed = state.get("step", 0)
    newer = [p.name for step, p in steps.items() if step > resumed]
    if newer:
        raise ConfigError(f"'{out / 'checkpoints'}' holds checkpoints after the one resumed (step {resumed}): "
                          f"{', '.join(newer)}; move them out of the folder (or resume the newest with "
                          f"--resume auto)")


def _lock_run_folder(out: Path, held: contextlib.ExitStack) -> None:
    """One process at a time in a run folder, until ``held`` closes (``cgpn.files.lock_folder``)."""
    held.enter_context(lock_folder(out, "output_dir", "choose another folder with --set output_dir=DIR"))


@contextlib.contextmanager
def _process_settings_restored() -> Iterator[None]:
    """Put back the process-wide settings a run changes (threads, deterministic kernels, TF32, cuDNN
    autotuning, cgpn's log level), so that code running after ``train`` in the same process is unaffected.
    The random generators stay seeded from ``engine.seed``, as after any seeded run."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_float32_matmul_precision(),
             torch.backends.cudnn.benchmark, logging.getLogger("cgpn").level)
    try:
        yield
    finally:
        threads, deterministic, warn_only, matmul, benchmark, log_level = saved
        logging.getLogger("cgpn").setLevel(log_level)  # quietened on non-zero ranks
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.benchmark = benchmark


def _cpu_bf16_or_fp32(model: nn.Module, cfg: Config, precision: Precision) -> Precision:
    """fp32 instead of CPU bf16 for images so narrow that a strided convolution makes a one-pixel-wide output
    (CPU bf16 convolutions are unreliable there: ``cgpn.engine.precision``); an explicit bf16 is refused."""
    convs = narrow_strided_convs(model, cfg.data.height, cfg.data.width)
    if not convs:
        return precision
    why = (f"at data.width={cfg.data.width} the strided convolution {convs[0]} makes a 1-pixel-wide output, where "
           f"the CPU's bf16 convolutions are unreliable (NaN gradients, wrong outputs on some CPUs)")
    if cfg.engine.precision == "bf16":
        raise ConfigError(f"engine.precision=bf16: {why}; use engine.precision=fp32 (or auto), or wider images")
    logger.info("engine.precision=auto: fp32, not bf16: %s", why)
    return resolve_precision("fp32", torch.device("cpu"))


def _train(cfg: Config, env: DistEnv, resume: str | None, finetune: str | None,
           held: contextlib.ExitStack) -> TrainResult:
    e = cfg.engine
    if e.threads > 0:
        torch.set_num_threads(e.threads)
    seed_everything(e.seed, e.deterministic)
    device = _device(cfg, env)
    if e.sync_bn and env.distributed and device.type != "cuda":
        raise ConfigError("engine.sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU path); "
                          "set engine.sync_bn=false for CPU processes")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not e.deterministic  # fixed input size: cuDNN picks the fastest kernels
        torch.set_float32_matmul_precision("high")  # TF32 for what runs in fp32 (cuDNN convolutions already do)
    precision = resolve_precision(e.precision, device)
    dataset = dataset_from_config(cfg.data)  # a wrong data root is the first thing to hear about
    out = Path(cfg.output_dir)
    checkpointer = Checkpointer(out, e.keep_last)
    locked = env.is_main and out.is_dir()
    if locked:  # no other process writes a run there while this one reads it (a new folder: locked below)
        _lock_run_folder(out, held)

    ckpt_path, state = None, None
    if resume and env.is_main:  # rank 0 reads the checkpoint: other machines may not share its disk
        ckpt_path = find_resume_checkpoint(resume, out)
        state = load_checkpoint(ckpt_path) if ckpt_path else None
    if resume:
        ckpt_path, state = from_main_process((ckpt_path, state), env)
    _check_no_other_run(out, state)
    if env.is_main and (stale := checkpointer.remove_partial_saves()):
        logger.info("removed %d unfinished checkpoint file(s) of an interrupted save", len(stale))
    if resume == "auto" and ckpt_path is None:
        logger.info("--resume auto: no checkpoint in %s yet, starting from scratch", out)
    if state is not None and env.is_main:
        changed = [k for k in _config_changes(state["config"], cfg.to_dict()) if k != "output_dir"]
        if state["epoch"] >= cfg.solver.epochs:
            logger.info("%s is the end of a finished run (%d epochs): nothing to train; its record follows",
                        ckpt_path, state["epoch"])
        else:
            logger.info("resuming from %s (epoch %d, iteration %d)%s", ckpt_path, state["epoch"] + 1,
                        state.get("batch", 0), f"; settings changed since: {', '.join(changed)}" if changed else "")

    num_classes = dataset.num_train_pids
    model = build_model_from_config(cfg, num_classes, pretrained=False if (state or finetune) else None)
    if state is not None:
        load_weights(model, state["model"], source=str(ckpt_path))
    elif finetune:
        load_weights(model, load_checkpoint(finetune)["model"], source=finetune, skip_classifiers=True)
        logger.info("fine-tuning from %s (identity classifiers start anew)", finetune)
    if precision.name == "bf16" and device.type == "cpu":  # before anything is written to the run folder
        precision = _cpu_bf16_or_fp32(model, cfg, precision)
    if env.is_main:
        check_run_dir(out, _checkpoint_bytes(model, cfg.solver) * (e.keep_last + 2))
        if not locked:
            _lock_run_folder(out, held)
            _check_no_other_run(out, state)  # again: a run that ended before the lock was taken may have written here
        save_config(cfg, out / "config.yaml")
    if e.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format(e.channels_last))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    train_model: nn.Module = model
    if env.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if e.compile:
        train_model = torch.compile(train_model)
    criterion = CGPNLoss(cfg.loss, gather=gather_across_processes if e.triplet_scope == "global" and env.distributed
                         else None)
    loader = build_train_loader(dataset.train, cfg.data, seed=e.seed, rank=env.rank,
                                       world_size=env.world_size)
    metrics = None
    if env.is_main:
        metrics = MetricsWriter(out, e.tensorboard, start_step=state.get("step", 0) if state else 0)
    logger.info("training on %s: %d process(es), precision %s, %s%s", device, env.world_size, precision.name,
                "channels_last" if e.channels_last else "contiguous", ", torch.compile" if e.compile else "")
    if env.distributed:  # data.batch_size is per process: say what a step and an epoch are
        logger.info("%d images per step (data.batch_size %d x %d processes), %d steps per epoch; the paper's "
                    "recipe is 64 images per step", cfg.data.batch_size * env.world_size, cfg.data.batch_size,
                    env.world_size, len(loader))

    trainer = Trainer(model, train_model, criterion, optimizer, scheduler, loader, device, precision,
                      cfg.solver.epochs, env, channels_last=e.channels_last,
                      extra_state={"config": cfg.to_dict(), "num_classes": num_classes}, metrics=metrics)
    trainer.register(StopOnSignal(env))
    if env.is_main:
        trainer.register(MetricsLogger(e.log_period, e.progress, env.world_size))
    split = "val" if dataset.val_query else "test"  # model selection on held-out identities when there are any
    trainer.register(LRScheduler(),
                     Evaluator(lambda: evaluate_model(model, dataset, cfg, device, split), e.eval_period,
                               e.eval_at_start, env, split=split))
    if split == "val":
        trainer.register(FinalTest(lambda net: evaluate_model(net, dataset, cfg, device, "test"),
                                   lambda: load_checkpoint(checkpointer.best)["model"], env))
    trainer.register(PeriodicCheckpoint(checkpointer, e.checkpoint_period, e.checkpoint_steps, env))
    if env.is_main:
        trainer.register(TimeShares())  # last: the epoch's evaluation and checkpoint are in its figures
    try:
        if state is not None:
            trainer.load_state_dict(state, str(ckpt_path))  # last: restores the RNG states too
        trainer.train()
    finally:
        if metrics is not None:
            metrics.close()
        if loader.dataset.skipped:
            logger.warning("%d unreadable training image(s) were replaced by other images of the same identity "
                           "(data.on_bad_image=skip; cgpn check-data lists them)", loader.dataset.skipped)
    if split == "val":
        test_epoch, test = trainer.test_result or (None, None)
    else:
        test_epoch = trainer.epoch if trainer.epoch in trainer.evaluations else None
        test = trainer.evaluations.get(trainer.epoch)
    return TrainResult(checkpoint=checkpointer.last, epoch_losses=trainer.epoch_losses,
                       evaluations=trainer.evaluations,
                       best_checkpoint=checkpointer.best if checkpointer.best.is_file() else None,
                       split=split, test=test, test_epoch=test_epoch, model=model.eval(), rank=env.rank)

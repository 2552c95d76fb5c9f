"""What happens around the training loop: stop signals, LR schedule, evaluation, checkpoints, logging.

Each hook is called by ``Trainer`` at six points (fast-reid's pattern): ``before_train``,
``before_epoch``, ``before_step``, ``after_step``, ``after_epoch``, ``after_train``. During an epoch
``trainer.epoch`` is the 0-based epoch being trained and ``trainer.batch`` the batches done in it; in
``after_epoch``, ``trainer.epoch`` is the number of epochs completed.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from cgpn.engine.checkpoint import Checkpointer
from cgpn.engine.distributed import DistEnv, any_rank
from cgpn.engine.timing import format_shares
from cgpn.errors import CgpnError
from cgpn.metrics.rank import RankResult

if TYPE_CHECKING:
    from cgpn.engine.trainer import Trainer

__all__ = ["Evaluator", "FinalTest", "HookBase", "LRScheduler", "MetricsLogger", "PeriodicCheckpoint", "StopOnSignal",
           "TimeShares"]

logger = logging.getLogger(__name__)


class HookBase:
    """A no-op at every point; subclasses override the points they need. ``trainer`` is set by the Trainer;
    the time its calls take is counted as ``phase`` (``cgpn.engine.timing.PHASES``)."""

    trainer: Trainer
    phase = "other"

    def before_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class StopOnSignal(HookBase):
    """Ctrl-C (SIGINT) or SIGTERM: finish the iteration, save a checkpoint, stop. A second Ctrl-C stops at once.

    Under torchrun the request is shared (all-reduced) so that every process stops at the same iteration.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, env: DistEnv) -> None:
        self.env, self._pid = env, os.getpid()
        self._previous: dict[int, object] = {}
        self.requested = False  # a signal reached this process; trainer.stop_requested follows it in _share

    def before_train(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a data loader worker forked with this handler: the main process decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s: stopping after this iteration and saving a checkpoint (Ctrl-C again stops at once)",
                       signal.Signals(signum).name)

    def _share(self) -> None:
        """The trainer stops only here, at the same iteration on every process: a signal that arrives while
        rank 0 saves or evaluates waits for the next iteration, rather than stopping rank 0 alone."""
        self.trainer.stop_requested = any_rank(self.requested, self.env, self.trainer.device)

    after_step = _share
    after_epoch = _share

    def after_train(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class LRScheduler(HookBase):
    """Steps the trainer's epoch-based scheduler (warm-up, then x gamma at each milestone) after each epoch."""

    def after_epoch(self) -> None:
        self.trainer.scheduler.step()


class Evaluator(HookBase):
    """Evaluates on rank 0 every ``period`` epochs and after the last (and first with ``at_start``).

    Results go to ``trainer.evaluations`` (epoch -> RankResult; 0 = untrained) and to the metrics
    writer under ``{split}/...``; a new best mAP marks the epoch's checkpoint as ``best.pt``. ``split``
    is ``val`` (model selection on held-out training identities) or ``test``: then ``best.pt`` is
    selected on the test set, and a warning says so once.
    """

    phase = "evaluation"

    def __init__(self, evaluate: Callable[[], RankResult], period: int, at_start: bool, env: DistEnv,
                 split: str = "test") -> None:
        self.evaluate, self.period, self.at_start, self.env, self.split = evaluate, period, at_start, env, split
        self._warned = False

    def before_train(self) -> None:
        t = self.trainer
        if self.at_start and t.step == 0 and 0 not in t.evaluations:
            self._run(0, "untrained")

    def after_epoch(self) -> None:
        t = self.trainer
        if t.epoch == t.max_epochs or (self.period > 0 and t.epoch % self.period == 0):
            self._run(t.epoch, f"epoch {t.epoch}")

    def _run(self, epoch: int, label: str) -> None:
        """Evaluate; an error (a corrupt test image, no memory...) is kept in ``trainer.failed_evaluation``,
        on every process, so that the epoch's checkpoint is saved before it is raised."""
        t = self.trainer
        failed: BaseException | None = None
        if self.env.is_main:
            try:
                result = self.evaluate()
            except Exception as err:
                failed = err
            else:
                t.evaluations[epoch] = result
                logger.info("%s: %s", label, result.summary())
                if epoch > 0 and (t.best is None or result.mAP > t.best[1]):
                    t.best, t.is_best = (epoch, float(result.mAP)), True
                    if self.split == "test" and not self._warned:
                        self._warned = True
                        logger.warning("best.pt is selected on the test split: its figures are optimistic and not "
                                       "comparable with published ones; last.pt is the run's result (set "
                                       "data.val_ids to select on held-out training identities)")
                if t.metrics is not None:
                    t.metrics.write(t.step, epoch, scalars(self.split, result))
        if any_rank(failed is not None, self.env, t.device):  # also the barrier while rank 0 evaluates
            t.failed_evaluation = failed or CgpnError(f"the evaluation after {label} failed on process 0")


class FinalTest(HookBase):
    """With a validation split: after the last epoch, evaluates the test split once, on the weights the
    validation selected (``best.pt``), into ``trainer.test_result`` (saved in the final checkpoint).

    ``evaluate`` maps a network to its test-split result; ``load_best`` returns the weights of an
    earlier best epoch (the current weights are used when the last epoch is the best).
    """

    phase = "evaluation"

    def __init__(self, evaluate: Callable[[torch.nn.Module], RankResult],
                 load_best: Callable[[], dict[str, torch.Tensor]], env: DistEnv) -> None:
        self.evaluate, self.load_best, self.env = evaluate, load_best, env

    def after_epoch(self) -> None:
        t = self.trainer
        if t.epoch != t.max_epochs or t.failed_evaluation is not None or t.best is None:
            return
        failed: BaseException | None = None
        if self.env.is_main:
            epoch = t.best[0]
            try:
                model = t.model
                if epoch != t.epoch:  # an earlier epoch was best: its weights are in best.pt
                    model = copy.deepcopy(t.model)
                    model.load_state_dict(self.load_best())
                result = self.evaluate(model)
            except Exception as err:
                failed = err
            else:
                t.test_result = (epoch, result)
                logger.info("test split, once, on the epoch-%d weights the validation selected: %s", epoch,
                            result.summary())
                if t.metrics is not None:
                    t.metrics.write(t.step, epoch, scalars("test", result))
        if any_rank(failed is not None, self.env, t.device):
            t.failed_evaluation = failed or CgpnError("the test evaluation failed on process 0")


def scalars(split: str, result: RankResult) -> dict[str, float]:
    """The metrics.csv / TensorBoard scalars of an evaluation of ``split``."""
    return {f"{split}/rank1": result.rank(1), f"{split}/mAP": result.mAP, f"{split}/mINP": result.mINP}


class PeriodicCheckpoint(HookBase):
    """Saves (rank 0) every ``epoch_period`` epochs, after the last and best epochs, every ``step_period``
    iterations inside an epoch (0: never), and when a stop was requested."""

    phase = "checkpoint"

    def __init__(self, checkpointer: Checkpointer, epoch_period: int, step_period: int, env: DistEnv) -> None:
        self.checkpointer, self.epoch_period, self.step_period, self.env = checkpointer, epoch_period, step_period, env
        self._due = False

    def after_step(self) -> None:
        t = self.trainer
        self._due = self._due or (self.step_period > 0 and t.step % self.step_period == 0)
        if t.stop_requested or (self._due and t.batch < t.epoch_length):  # at the epoch's end: after_epoch
            self._save()

    def after_epoch(self) -> None:
        t = self.trainer
        if (self._due or t.stop_requested or t.is_best or t.epoch == t.max_epochs or t.failed_evaluation
                or (self.epoch_period > 0 and t.epoch % self.epoch_period == 0)):
            self._save(best=t.is_best)

    def _save(self, best: bool = False) -> None:
        t = self.trainer
        t.check_weights()  # on every process (the weights are the same): all stop together if they diverged
        if self.env.is_main:
            t.last_checkpoint = self.checkpointer.save(t.state_dict(), t.step, best=best)
            logger.debug("saved %s", t.last_checkpoint)
        self._due = False


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class MetricsLogger(HookBase):
    """Progress bar per epoch (each loss term, lr, images/s, ETA), log lines, scalars to ``trainer.metrics``.

    Scalars are means over ``log_period`` iterations; images/s counts the images of all ``world_size``
    processes. Without a bar (``engine.progress: false`` or stderr not a terminal) the same figures go
    to the log every ``log_period`` iterations.
    """

    def __init__(self, log_period: int, progress: bool, world_size: int = 1) -> None:
        self.log_period, self.progress, self.world_size = max(1, log_period), progress, world_size
        self.bar: tqdm | None = None
        self._step_seconds: float | None = None  # moving average of an iteration's wall time

    def before_epoch(self) -> None:
        t = self.trainer
        self.bar = tqdm(total=t.epoch_length, initial=t.batch, desc=f"epoch {t.epoch + 1}/{t.max_epochs}",
                        unit="it", leave=False, dynamic_ncols=True, disable=None if self.progress else True)
        self._reset_period()
        self._epoch_images, self._epoch_start = 0, time.perf_counter()
        self._last = time.perf_counter()

    def _reset_period(self) -> None:
        self._sums: dict[str, float] = {}
        self._count, self._images, self._period_start = 0, 0, time.perf_counter()

    def _eta(self) -> float:
        t = self.trainer
        remaining = (t.max_epochs - t.epoch - 1) * t.epoch_length + (t.epoch_length - t.batch)
        return remaining * (self._step_seconds or 0.0)

    def after_step(self) -> None:
        t = self.trainer
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self._step_seconds = dt if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * dt
        for k, v in t.last_terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        images = t.last_batch_size * self.world_size
        self._count += 1
        self._images += images
        self._epoch_images += images
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str("  ".join([f"{k} {v:.3f}" for k, v in t.last_terms.items()] + [
                f"lr {t.lr:.1e}", f"{images / self._step_seconds:.1f} img/s",
                f"run ETA {_format_eta(self._eta())}"]), refresh=False)
        if t.step % self.log_period == 0:
            self._flush(t.epoch + 1, t.batch)

    def _flush(self, epoch: int, batch: int, log: bool = True) -> None:
        """Write the means of the iterations since the last flush, at 1-based ``epoch``, ``batch`` done."""
        if not self._count:
            return
        t = self.trainer
        means = {k: v / self._count for k, v in self._sums.items()}
        speed = self._images / max(time.perf_counter() - self._period_start, 1e-9)
        if t.metrics is not None:
            t.metrics.write(t.step, epoch, {**{f"train/{k}": v for k, v in means.items()},
                                            "train/lr": t.lr, "train/images_per_s": speed})
        if log and (self.bar is None or self.bar.disable):
            logger.info("epoch %d/%d  it %d/%d  %s  lr %.2e  %.1f img/s  run ETA %s", epoch, t.max_epochs, batch,
                        t.epoch_length, "  ".join(f"{k} {v:.4f}" for k, v in means.items()), t.lr, speed,
                        _format_eta(self._eta()))
        self._reset_period()

    def after_epoch(self) -> None:
        """Runs before the LR step, so the lr shown is the one this epoch trained with."""
        t = self.trainer
        self._flush(t.epoch, t.epoch_length, log=False)  # the epoch's line below says it
        if self.bar is not None:
            self.bar.close()
        means = t.epoch_losses[-1] if t.epoch_losses else {}
        logger.info("epoch %d/%d  %s  lr %.2e  %.1f img/s  run ETA %s", t.epoch, t.max_epochs,
                    "  ".join(f"{k} {v:.4f}" for k, v in means.items()), t.lr,
                    self._epoch_images / max(time.perf_counter() - self._epoch_start, 1e-9),
                    _format_eta((t.max_epochs - t.epoch) * t.epoch_length * (self._step_seconds or 0.0)))

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TimeShares(HookBase):
    """Logs after each epoch the share of its time each phase took (data, forward, backward, optimizer,
    evaluation, checkpoint, other): where to look first when training is slow. Register it last, so that
    the epoch's evaluation and checkpoint are counted."""

    def after_epoch(self) -> None:
        t = self.trainer
        seconds = t.clock.take()
        logger.info("epoch %d/%d time: %s of %.1f s", t.epoch, t.max_epochs, format_shares(seconds),
                    sum(seconds.values()))

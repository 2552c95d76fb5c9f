"""Where a training epoch's time goes: data loading, forward, backward, optimizer, evaluation, checkpoints.

On the CPU each phase is wall time. On CUDA the step's phases are timed with CUDA events on the current
stream (the step is not synchronised for it; the events are read once, when the shares are asked for),
data loading and the hooks with the host's clock.

Example:
    >>> clock = PhaseClock(torch.device("cpu"))
    >>> with clock.phase("forward"):
    ...     output = model(images)
    >>> clock.take()  # {"forward": 0.012}, seconds per phase since the last take()
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

__all__ = ["PHASES", "PhaseClock", "format_shares"]

T = TypeVar("T")

PHASES = ("data", "forward", "backward", "optimizer", "evaluation", "checkpoint", "other")  # in the order printed
_STEP_PHASES = ("forward", "backward", "optimizer")  # on CUDA: timed on the GPU's stream


class PhaseClock:
    """Seconds spent per phase since the last ``take()``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._seconds: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        if self.cuda and name in _STEP_PHASES:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
            return
        start_s = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start_s)

    def timed(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """``items``, the time spent producing each (waiting on a DataLoader) added to phase ``name``."""
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.add(name, time.perf_counter() - start)
            yield item

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call (CUDA events are waited for here), and start again."""
        for name, start, end in self._events:
            end.synchronize()
            self.add(name, start.elapsed_time(end) / 1e3)
        seconds, self._seconds, self._events = self._seconds, {}, []
        return seconds


def format_shares(seconds: dict[str, float]) -> str:
    """``data 3 %, forward 30 %, ...`` in the order of ``PHASES`` (phases under 0.5 % of the time left out)."""
    total = sum(seconds.values())
    if total <= 0:
        return "no time recorded"
    shares = {name: 100 * seconds.get(name, 0.0) / total for name in PHASES}
    return ", ".join(f"{name} {share:.0f} %" for name, share in shares.items() if share >= 0.5)

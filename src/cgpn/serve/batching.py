"""Concurrent requests served as one batch: the work of many callers done in one call.

An exact search reads the whole gallery once per call, whatever the number of queries in it: one call for
32 queries is one matrix multiply (bound by the CPU's arithmetic), 32 calls of one query are 32 passes
over the gallery (bound by memory bandwidth). The embedding network likewise runs a batch of images in
about the time of a few single ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

__all__ = ["MicroBatcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Calls ``fn`` from one worker thread on the items callers submit, many at a time.

    While a call runs, new items wait; the next call takes all that are waiting (up to ``max_batch``). A
    lone caller is served at once, with no timer: batching adds no latency, it only forms under load.

    Args:
        fn: items -> one result per item, in order. An exception fails the callers of that batch only.
        max_batch: most items per call.
        name: the worker thread's name (in logs and stack dumps).

    Example:
        >>> batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=32, name="double")
        >>> batcher.submit(21).result()
        42
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int, name: str) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.fn, self.max_batch = fn, max_batch
        self.calls = 0  # calls of fn so far
        self.items = 0  # items served so far (items / calls: the mean batch)
        self._queue: queue.SimpleQueue[tuple[T, Future[R]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Items queued for the next call."""
        return self._queue.qsize()

    def submit(self, item: T) -> Future[R]:
        """Queue ``item``; its result (or ``fn``'s exception) arrives in the returned future."""
        if not self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} batcher is closed")
        future: Future[R] = Future()
        self._queue.put((item, future))
        return future

    async def run(self, item: T) -> R:
        """``submit`` for a coroutine: waits for the result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(item))

    def close(self) -> None:
        """Finish the queued items, then stop the worker thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # close() called: serve what came before it, then stop
                    closing = True
                    break
                batch.append(nxt)
            batch = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]  # callers gone
            if batch:
                self._call(batch)

    def _call(self, batch: list[tuple[T, Future[R]]]) -> None:
        try:
            results = self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except BaseException as err:  # the callers get it; the worker keeps serving
            for _, future in batch:
                future.set_exception(err)
            return
        self.calls += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results):
            future.set_result(result)

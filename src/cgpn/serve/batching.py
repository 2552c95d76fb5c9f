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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Generic, TypeVar

__all__ = ["MicroBatcher", "Ticket"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# A call waits for announced items at most this share of the previous call's time, and at most WAIT_CAP
# seconds. A full share: an exact search of half the callers costs nearly what one of all of them costs (a
# pass over the gallery either way), so waiting one call's time for the other half pays. Measured with
# benchmarks/serve_load.py, 32 clients, 2 cores: at 0.25 the callers split into two groups taking turns
# (16.5 queries per search, 65-72 req/s); at 1.0, 29 per search and 82 req/s.
WAIT_FRACTION = 1.0
WAIT_CAP = 1.0


class Ticket:
    """An item on its way to a batcher (a request whose body is still being read): while it is open, a call
    that starts may wait a little for it. Closed when the item is submitted, or when the block ends."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher, self.open = batcher, True
        batcher._expect(+1)

    def close(self) -> None:
        if self.open:
            self.open = False
            self._batcher._expect(-1)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MicroBatcher(Generic[T, R]):
    """Calls ``fn`` from one worker thread on the items callers submit, many at a time.

    While a call runs, new items wait; the next call takes all that are waiting (up to ``max_batch``).
    A lone caller is served at once. Under load a call first waits a little, at most ``wait_fraction``
    of the previous call's time and ``max_wait`` seconds, for items announced (``ticket()``) but not yet
    submitted, and for as many items as the previous call served plus those that waited meanwhile (the
    callers answered by the previous call coming back). Without that wait, 32 clients split into two
    groups that take turns, each call serving half of them.

    Args:
        fn: items -> one result per item, in order. An exception fails the callers of that batch only.
        max_batch: most items per call.
        name: the worker thread's name (in logs and stack dumps).
        wait_fraction, max_wait: how long a call may wait for announced items (share of the previous
            call's time, and seconds).
        executor: where ``fn`` runs (e.g. one thread that several batchers share); None: the worker thread.

    Example:
        >>> batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=32, name="double")
        >>> batcher.submit(21).result()
        42
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int, name: str,
                 wait_fraction: float = WAIT_FRACTION, max_wait: float = WAIT_CAP,
                 executor: Executor | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.fn, self.max_batch, self.executor = fn, max_batch, executor
        self.wait_fraction, self.max_wait = wait_fraction, max_wait
        self.calls = 0  # calls of fn so far
        self.items = 0  # items served so far (items / calls: the mean batch)
        self.seconds = 0.0  # time spent in calls of fn so far (with an executor: until their results)
        self._queue: queue.SimpleQueue[tuple[T, Future[R]] | None] = queue.SimpleQueue()
        self._expected = 0  # open tickets: items announced, not yet submitted
        self._lock = threading.Lock()
        self._last_call = 0.0  # seconds the previous call of fn took
        self._callers = 0  # callers seen by the previous call: those it served and those that waited
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Items queued for the next call."""
        return self._queue.qsize()

    def ticket(self) -> Ticket:
        """Announce an item that will be submitted soon (use as ``with batcher.ticket() as t: ...``)."""
        return Ticket(self)

    def _expect(self, change: int) -> None:
        with self._lock:
            self._expected += change

    def submit(self, item: T, ticket: Ticket | None = None) -> Future[R]:
        """Queue ``item`` (closing its ``ticket``); its result, or ``fn``'s exception, arrives in the future."""
        if not self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} batcher is closed")
        future: Future[R] = Future()
        self._queue.put((item, future))
        if ticket is not None:  # after the put: a waiting call sees the item before the ticket goes
            ticket.close()
        return future

    async def run(self, item: T, ticket: Ticket | None = None) -> R:
        """``submit`` for a coroutine: waits for the result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(item, ticket))

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
            deadline = time.monotonic() + min(self.wait_fraction * self._last_call, self.max_wait)
            while len(batch) < self.max_batch:
                more = self._expected > 0 or len(batch) < self._callers  # items on their way, callers to come
                wait = deadline - time.monotonic() if more else 0.0
                try:
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # close() called: serve what came before it, then stop
                    closing = True
                    break
                batch.append(nxt)
            batch = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]  # callers gone
            if batch:
                start = time.monotonic()
                self._call(batch)
                self._last_call = time.monotonic() - start
                self.seconds += self._last_call
                self._callers = len(batch) + self._queue.qsize()

    def _call(self, batch: list[tuple[T, Future[R]]]) -> None:
        try:
            items = [item for item, _ in batch]
            results = self.fn(items) if self.executor is None else self.executor.submit(self.fn, items).result()
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

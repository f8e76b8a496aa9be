"""Dynamic batching: concurrent one-sample requests become model batches.

`DynamicBatcher` serves coroutines (the HTTP server) and scores on one worker thread; `ThreadBatcher`
serves plain threads (the reward_func shim).

For `DynamicBatcher`, a batch closes when it holds `max_batch_size` items or when its oldest item has
waited `max_wait_s`. While the worker is busy new items queue up, so under load every batch is full
without waiting. The queue is bounded: `submit` raises `QueueFull` instead of letting latency grow.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The batcher already holds `max_queue` waiting items."""


@dataclass
class BatcherStats:
    """Counters for /health and the benchmark's lost/duplicate accounting."""

    submitted: int = 0
    delivered: int = 0
    rejected: int = 0
    batches: int = 0
    largest_batch: int = 0
    sample_seconds: float = 0.0  # moving average of scoring time per sample (0 until the first batch)


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[T, R]):
    """Collects items from many coroutines and runs `process(items) -> results` on them in batches."""

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        max_batch_size: int = 64,
        max_wait_s: float = 0.01,
        max_queue: int = 4096,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_s >= 0")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._queue: deque[_Pending[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def estimate_s(self, samples: int) -> float:
        """Seconds to score `samples` more samples at the recent pace (0 before any batch was timed)."""
        return samples * self.stats.sample_seconds

    async def start(self) -> None:
        """Start the collecting task on the running loop and the single model thread."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-batcher")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reward-batcher")

    async def stop(self) -> None:
        """Cancel the collecting task, fail what is still queued, and release the thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the batcher stopped"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue `items` and wait for their results; raises QueueFull when they do not fit."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("the batcher is not started")
        if self._task.done():
            raise RuntimeError("the batcher's worker task has stopped")
        if len(self._queue) + len(items) > self.max_queue:
            self.stats.rejected += len(items)
            raise QueueFull(f"{len(self._queue)} items queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future()) for item in items]
        self._queue.extend(pending)
        self.stats.submitted += len(pending)
        self._wakeup.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill_or_timeout()
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self.process, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self._time(time.monotonic() - started, len(batch))
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)
                    self.stats.delivered += 1

    def _time(self, seconds: float, size: int) -> None:
        per_sample = seconds / size
        previous = self.stats.sample_seconds
        self.stats.sample_seconds = per_sample if previous == 0.0 else 0.8 * previous + 0.2 * per_sample

    async def _fill_or_timeout(self) -> None:
        assert self._wakeup is not None
        deadline = self._queue[0].enqueued + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return


@dataclass
class _Slot(Generic[T]):
    item: T
    done: bool = False
    result: object = None
    error: BaseException | None = None


class ThreadBatcher(Generic[T, R]):
    """Batching for callers on many threads with no event loop (OpenRLHF calls reward_func from a pool).

    No extra thread: a caller that finds no batch running scores everything queued (up to
    `max_batch_size`), then hands each caller its results; the others wait meanwhile.
    """

    def __init__(self, process: Callable[[list[T]], Sequence[R]], max_batch_size: int = 64):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.process = process
        self.max_batch_size = max_batch_size
        self.stats = BatcherStats()
        self._cond = threading.Condition()
        self._queue: deque[_Slot[T]] = deque()
        self._running = False

    def submit(self, items: Sequence[T]) -> list[R]:
        """Results for `items`, in order; an exception from `process` is raised to every caller of that batch."""
        slots = [_Slot(item) for item in items]
        with self._cond:
            self._queue.extend(slots)
            self.stats.submitted += len(slots)
            while not all(slot.done for slot in slots):
                if self._running or not self._queue:
                    self._cond.wait()
                    continue
                self._lead()
        for slot in slots:
            if slot.error is not None:
                raise slot.error
        return [slot.result for slot in slots]  # type: ignore[misc]

    def _lead(self) -> None:
        """Score one batch with the condition's lock released; called with the lock held."""
        batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
        self._running = True
        self._cond.release()
        try:
            results, error = None, None
            try:
                results = self.process([slot.item for slot in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                error = exc
        finally:
            self._cond.acquire()
        for i, slot in enumerate(batch):
            slot.done = True
            if error is None:
                slot.result = results[i]  # type: ignore[index]
            else:
                slot.error = error
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.delivered += len(batch) if error is None else 0
        self._running = False
        self._cond.notify_all()

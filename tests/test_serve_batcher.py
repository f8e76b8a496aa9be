"""DynamicBatcher on its own: batch limits, the wait window, error hand-off, abandoned items, queue bound."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from openrlhf_ext.batcher import DynamicBatcher, QueueFull


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_batches_and_keep_their_results():
    sizes = []

    def double(items):
        sizes.append(len(items))
        return [2 * x for x in items]

    async def main():
        batcher = DynamicBatcher(double, max_batch_size=8, max_wait_s=0.05)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit([i]) for i in range(20)))
        finally:
            await batcher.stop()
        return results, batcher.stats

    results, stats = run(main())
    assert results == [[2 * i] for i in range(20)]
    assert max(sizes) == 8 and sum(sizes) == 20 and len(sizes) == 3
    assert stats.submitted == stats.delivered == 20 and stats.batches == 3


def test_lone_item_waits_at_most_max_wait():
    async def main():
        batcher = DynamicBatcher(lambda items: items, max_batch_size=64, max_wait_s=0.2)
        await batcher.start()
        start = time.monotonic()
        result = await batcher.submit(["x"])
        elapsed = time.monotonic() - start
        await batcher.stop()
        return result, elapsed

    result, elapsed = run(main())
    assert result == ["x"]
    assert 0.18 <= elapsed < 2.0


def test_process_error_reaches_every_caller_of_that_batch_only():
    def fussy(items):
        if "bad" in items:
            raise ValueError("cannot score 'bad'")
        return [s.upper() for s in items]

    async def main():
        batcher = DynamicBatcher(fussy, max_batch_size=2, max_wait_s=0.05)
        await batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(["bad"]), batcher.submit(["b"]), batcher.submit(["c"]), return_exceptions=True
        )
        await batcher.stop()
        return outcomes

    first, second, third = run(main())
    assert isinstance(first, ValueError) and isinstance(second, ValueError)
    assert third == ["C"]


def test_queue_bound_and_abandoned_items_are_not_scored():
    gate = threading.Event()
    seen = []

    def slow(items):
        gate.wait(timeout=10)
        seen.extend(items)
        return items

    async def main():
        batcher = DynamicBatcher(slow, max_batch_size=1, max_wait_s=0.0, max_queue=2)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(["first"]))
        while batcher.stats.submitted < 1 or batcher.queued:
            await asyncio.sleep(0.005)
        abandoned = asyncio.create_task(batcher.submit(["abandoned"]))
        kept = asyncio.create_task(batcher.submit(["kept"]))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(["one too many"])
        abandoned.cancel()
        gate.set()
        results = await asyncio.gather(first, kept)
        await batcher.stop()
        return results, batcher.stats

    results, stats = run(main())
    assert results == [["first"], ["kept"]]
    assert seen == ["first", "kept"]
    assert stats.rejected == 1 and stats.delivered == 2


def test_thread_batcher_groups_callers_that_arrive_while_busy():
    from openrlhf_ext.batcher import ThreadBatcher

    sizes = []

    def slow_square(items):
        sizes.append(len(items))
        time.sleep(0.1)
        return [x * x for x in items]

    batcher = ThreadBatcher(slow_square, max_batch_size=64)
    barrier = threading.Barrier(12)
    results = {}

    def call(i):
        barrier.wait()
        results[i] = batcher.submit([i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {i: [i * i] for i in range(12)}
    assert sum(sizes) == 12 and len(sizes) <= 3, f"12 simultaneous callers scored in batches {sizes}"
    assert batcher.stats.delivered == 12


def test_thread_batcher_raises_to_callers_and_keeps_working():
    from openrlhf_ext.batcher import ThreadBatcher

    def picky(items):
        if "bad" in items:
            raise ValueError("bad item")
        return items

    batcher = ThreadBatcher(picky, max_batch_size=4)
    with pytest.raises(ValueError, match="bad item"):
        batcher.submit(["bad"])
    assert batcher.submit(["ok", "fine"]) == ["ok", "fine"]

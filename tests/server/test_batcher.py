"""The micro-batcher on its own, with a real (numpy) run function in its worker thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from unetpp.server import admission, memory
from unetpp.server.admission import Gate, MemoryBudget
from unetpp.server.batcher import Batcher
from unetpp.server.errors import DeadlineExceeded


def batcher_for(
    run,
    *,
    max_batch: int,
    max_wait_ms: float,
    preparing: int = 0,
    budget: MemoryBudget | None = None,
) -> Batcher:
    """A batcher with its own gate (`preparing` requests still being decoded) and a memory
    budget (unlimited unless given; each input costs one byte per pixel)."""
    gate = Gate(max_queue=64, timeout_ms=1000, max_pixels_in_flight=1, max_body_bytes_in_flight=1)
    gate.preparing = preparing
    return Batcher(
        run,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        workers=1,
        gate=gate,
        budget=budget or MemoryBudget(1 << 40),
        cost=lambda graph, shape: shape[-1] * shape[-2],
    )


def run_slowly(seconds: float):
    threads = set()

    def run(graph: str, batch: np.ndarray) -> np.ndarray:
        threads.add(threading.get_ident())
        time.sleep(seconds)
        return batch[:, :1] * 2.0

    return run, threads


def test_items_of_one_graph_and_shape_batch_up_to_max_batch():
    async def scenario():
        run, threads = run_slowly(0.01)
        batcher = batcher_for(run, max_batch=2, max_wait_ms=0)
        batcher.start()
        xs = [np.full((3, 16, 16), i, np.float32) for i in range(3)]
        futures = [
            batcher.submit("L1", x, deadline=time.monotonic() + 10, predicted_ms=1) for x in xs
        ]
        other = batcher.submit(
            "L1", np.ones((3, 32, 16), np.float32), deadline=time.monotonic() + 10, predicted_ms=1
        )
        results = await asyncio.gather(*futures, other)
        await batcher.close()
        return results, batcher, threads

    results, batcher, threads = asyncio.run(scenario())
    for i, r in enumerate(results[:3]):
        np.testing.assert_array_equal(r.logits, np.full((1, 16, 16), 2.0 * i))
    assert [r.batch_size for r in results] == [2, 2, 1, 1]  # a new shape is a new batch
    assert batcher.stats["L1"].sizes == {2: 1, 1: 2}
    assert threading.get_ident() not in threads  # never on the event loop's thread
    assert batcher.backlog_ms == pytest.approx(0.0)


def test_a_batch_waits_for_requests_still_preparing_but_not_for_none():
    async def scenario(preparing: int):
        run, _ = run_slowly(0.0)
        batcher = batcher_for(run, max_batch=8, max_wait_ms=300, preparing=preparing)
        batcher.start()
        first = batcher.submit(
            "L1", np.zeros((1, 16, 16), np.float32), deadline=time.monotonic() + 10, predicted_ms=1
        )
        await asyncio.sleep(0.05)
        second = batcher.submit(
            "L1", np.zeros((1, 16, 16), np.float32), deadline=time.monotonic() + 10, predicted_ms=1
        )
        results = await asyncio.gather(first, second)
        await batcher.close()
        return [r.batch_size for r in results]

    assert asyncio.run(scenario(preparing=1)) == [2, 2]  # waited for the one preparing
    assert asyncio.run(scenario(preparing=0)) == [1, 1]  # nobody else coming: ran at once


def test_an_item_whose_deadline_passed_in_the_queue_is_dropped():
    async def scenario():
        run, _ = run_slowly(0.2)
        batcher = batcher_for(run, max_batch=8, max_wait_ms=0)
        batcher.start()
        now = time.monotonic()
        slow = batcher.submit(
            "L4", np.zeros((1, 32, 32), np.float32), deadline=now + 10, predicted_ms=200
        )
        await asyncio.sleep(0.02)  # the first batch is running
        late = batcher.submit(
            "L1", np.zeros((1, 16, 16), np.float32), deadline=now + 0.05, predicted_ms=1
        )
        assert batcher.queue_wait_ms() == pytest.approx(201)
        results = await asyncio.gather(slow, late, return_exceptions=True)
        await batcher.close()
        return results, batcher

    (slow, late), batcher = asyncio.run(scenario())
    assert slow.batch_size == 1 and isinstance(late, DeadlineExceeded)
    assert "L1" not in batcher.stats  # never ran


def test_batches_take_only_what_the_memory_budget_has_room_for():
    """Five 16x16 inputs (256 bytes each here) under a budget of 600 bytes: batches of 2, 2, 1,
    and the bytes in use never pass the budget while a batch runs."""
    budget = MemoryBudget(600)
    seen: list[int] = []

    def run(graph: str, batch: np.ndarray) -> np.ndarray:
        seen.append(budget.in_use)
        time.sleep(0.02)
        return batch

    async def scenario():
        batcher = batcher_for(run, max_batch=8, max_wait_ms=0, budget=budget)
        futures = [
            batcher.submit(
                "L4",
                np.zeros((1, 16, 16), np.float32),
                deadline=time.monotonic() + 10,
                predicted_ms=1,
            )
            for _ in range(5)
        ]
        batcher.start()
        results = await asyncio.gather(*futures)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert sorted(r.batch_size for r in results) == [1, 2, 2, 2, 2]
    assert seen == [512, 512, 256] and budget.in_use == 0


def test_an_input_above_the_whole_budget_still_runs_alone():
    """A budget that shrank below an admitted input must not stall it: with nothing running,
    one input is always taken."""
    budget = MemoryBudget(100)

    async def scenario():
        batcher = batcher_for(lambda graph, batch: batch, max_batch=8, max_wait_ms=0, budget=budget)
        batcher.start()
        x = np.zeros((1, 16, 16), np.float32)
        result = await batcher.submit("L4", x, deadline=time.monotonic() + 10, predicted_ms=1)
        await batcher.close()
        return result

    assert asyncio.run(scenario()).batch_size == 1


def test_large_batches_give_their_memory_back_once_after_a_delay(monkeypatch):
    """A trim costs the next request its page faults: a burst of large batches ends in one trim,
    TRIM_DELAY_S after the first, not one per batch; small batches trim nothing."""
    trims: list[float] = []
    monkeypatch.setattr(admission, "TRIM_DELAY_S", 0.05)
    monkeypatch.setattr(memory, "trim", lambda: trims.append(time.monotonic()))

    async def scenario() -> float:
        budget = MemoryBudget(1 << 40)
        start = time.monotonic()
        for nbytes in (admission.TRIM_ABOVE, admission.TRIM_ABOVE, 1 << 10):
            budget.take(nbytes)
            budget.release(nbytes)
        await asyncio.sleep(0.2)
        budget.take(1 << 10)
        budget.release(1 << 10)  # small: no further trim
        await asyncio.sleep(0.1)
        return start

    start = asyncio.run(scenario())
    assert len(trims) == 1 and trims[0] - start >= 0.05, trims

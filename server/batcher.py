"""Dynamic micro-batching: requests for the same graph and input shape run as one batch.

`submit` puts one CxHxW input on the queue of its (graph, shape) and returns a future. Worker
tasks (`workers` of them) take the queue whose oldest item waited longest, up to `max_batch`
items, and run them in a thread (onnxruntime releases the GIL), so the event loop never blocks.
A batch waits for more items (at most `max_wait_ms`) only while other admitted requests are
still being decoded and could join it (the gate's `preparing`); a lone request runs at once, and
under load batches fill from what piled up while the previous one ran. A batch takes only as
many items as the memory budget has room for (`cost(graph, shape)` bytes each) and waits while
it has none. Items whose deadline has passed or whose caller gave up are dropped before running.

The batcher holds no reference to its owner: `run` and `on_batch` are plain functions of the
engine's parts, so a retired engine is freed as soon as its last request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from unetpp.core.errors import UNetPPError
from unetpp.server.admission import Gate, MemoryBudget
from unetpp.server.errors import DeadlineExceeded, NotReady

log = logging.getLogger(__name__)

Key = tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class ItemResult:
    logits: np.ndarray  # K x H x W
    batch_id: int
    batch_size: int
    queue_ms: float  # from submit to the start of its batch
    run_ms: float  # the whole batch's onnxruntime time


@dataclass
class _Item:
    x: np.ndarray
    deadline: float  # time.monotonic()
    predicted_ms: float
    future: asyncio.Future[ItemResult]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class GraphStats:
    batches: int = 0
    images: int = 0
    max_batch: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> batches

    def add(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.max_batch = max(self.max_batch, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1


class Batcher:
    def __init__(
        self,
        run: Callable[[str, np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_wait_ms: float,
        workers: int,
        gate: Gate,
        budget: MemoryBudget,
        cost: Callable[[str, tuple[int, ...]], int],
        on_batch: Callable[[str, int, int, float], None] | None = None,
    ) -> None:
        """`run(graph, batch)` -> logits (N, K, H, W), called in a worker thread;
        `cost(graph, shape)` -> activation bytes of one input of that CxHxW shape;
        `on_batch(graph, size, pixels, run_ms)` after each batch, on the event loop."""
        self._run = run
        self._gate = gate
        self._budget = budget
        self._cost = cost
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.workers = workers
        self._on_batch = on_batch
        self._queues: dict[Key, deque[_Item]] = {}
        self._changed = asyncio.Event()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="unetpp-infer")
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self.backlog_ms = 0.0  # predicted time of everything queued or running
        self.stats: dict[str, GraphStats] = {}

    def start(self) -> None:
        self._gate.listen(self._changed)
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def close(self) -> None:
        if self._tasks:
            self._gate.forget(self._changed)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # a cancelled task keeps its CancelledError, whose traceback holds the worker's frame
        # and so this batcher: dropping the tasks leaves no cycle for the collector to find
        self._tasks = []
        for queue in self._queues.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(NotReady("the server is shutting down"))
        self._queues.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queue_wait_ms(self) -> float:
        """Predicted wait before a new item starts: the backlog shared by the workers."""
        return self.backlog_ms / self.workers

    def notify(self) -> None:
        self._changed.set()

    def submit(
        self, graph: str, x: np.ndarray, *, deadline: float, predicted_ms: float
    ) -> asyncio.Future[ItemResult]:
        future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
        item = _Item(x, deadline, predicted_ms, future)
        self._queues.setdefault((graph, x.shape), deque()).append(item)
        self.backlog_ms += predicted_ms
        self.notify()
        return future

    async def _next_key(self) -> Key:
        while True:
            waiting = [k for k, q in self._queues.items() if q]
            timeout: float | None = None
            if waiting:
                key = min(waiting, key=lambda k: self._queues[k][0].enqueued)
                queue = self._queues[key]
                left = queue[0].enqueued + self.max_wait - time.monotonic()
                if len(queue) >= self.max_batch or self._gate.preparing <= 0 or left <= 0:
                    return key
                timeout = left
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def _take(self, key: Key, most: int) -> list[_Item]:
        queue = self._queues[key]
        items: list[_Item] = []
        now = time.monotonic()
        while queue and len(items) < most:
            item = queue.popleft()
            if item.future.done():  # the caller gave up
                self.backlog_ms -= item.predicted_ms
            elif item.deadline < now:
                self.backlog_ms -= item.predicted_ms
                item.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it was queued")
                )
            else:
                items.append(item)
        if not queue:
            del self._queues[key]
        return items

    def _timed_run(self, graph: str, inputs: list[np.ndarray]) -> tuple[np.ndarray, float, float]:
        batch = np.stack(inputs)  # in the worker thread: a large copy stays off the event loop
        start = time.monotonic()
        out = self._run(graph, batch)
        return out, start, 1000.0 * (time.monotonic() - start)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            graph, shape = key = await self._next_key()
            cost = self._cost(graph, shape)
            room = self._budget.room(cost, self.max_batch)
            if not room:
                await self._budget.freed()
                continue
            items = self._take(key, room)
            if not items:
                continue
            batch_id = next(self._ids)
            self._budget.take(cost * len(items))
            try:
                out, start, run_ms = await loop.run_in_executor(
                    self._executor, self._timed_run, graph, [item.x for item in items]
                )
            except Exception as exc:
                log.exception("batch %d of %d on %s failed", batch_id, len(items), graph)
                # a domain error: answered as a JSON 500 like any other, the connection kept
                # (an unhandled exception would also make uvicorn drop the keep-alive connection)
                failure = UNetPPError(
                    f"graph {graph} failed on this input ({type(exc).__name__}; see the log)"
                )
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(failure)
                continue
            finally:
                self._budget.release(cost * len(items))
                self.backlog_ms = max(0.0, self.backlog_ms - sum(i.predicted_ms for i in items))
            self.stats.setdefault(graph, GraphStats()).add(len(items))
            if self._on_batch is not None:
                self._on_batch(graph, len(items), shape[-1] * shape[-2], run_ms)
            for i, item in enumerate(items):
                if not item.future.done():
                    queue_ms = 1000.0 * (start - item.enqueued)
                    item.future.set_result(
                        ItemResult(out[i], batch_id, len(items), queue_ms, run_ms)
                    )

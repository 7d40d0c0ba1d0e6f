"""Admission and the budgets of work in flight, each in the unit that runs out.

- `Gate` (one per server): request bodies being received (bytes), requests admitted (count,
  `max_queue`), images decoded and held (pixels, `max_pixels_in_flight`). A request that would
  pass one is answered 503 with Retry-After at once, before it costs anything more.
- `MemoryBudget` (one per server, shared by every model): bytes of onnxruntime activations of
  the batches running now (each graph's measured bytes per input pixel, times the batch's
  pixels). A batch waits until its bytes fit; the plan tiles an image so that one input always
  fits, and refuses (413) one that cannot fit even as the smallest tile.
- `Admission`: one admitted request: its deadline and what it holds from the budgets.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from unetpp.server import memory
from unetpp.server.errors import DeadlineExceeded, QueueFull

TRIM_ABOVE = 64 << 20  # batches holding more than this give their memory back after them
# ... within this many seconds, in one trim for all of them: trimming takes about a millisecond
# and the next request pays as much again in page faults (1 ms of the 6 a 256x256 request
# added at concurrency 1 when every request trimmed; benchmarks/REPORT.md, `overhead`)
TRIM_DELAY_S = 1.0


class Admission:
    """A request admitted to the queue; `submitting()` says it will not join further batches.
    `deadline` (time.monotonic()) is when the request gives up."""

    def __init__(self, gate: Gate, timeout: asyncio.Timeout, timeout_ms: float) -> None:
        self._gate = gate
        self._timeout = timeout
        self.timeout_ms = timeout_ms
        self.deadline = time.monotonic() + timeout_ms / 1000.0
        self._preparing = True
        self.pixels = 0  # reserved from the gate's pixel budget (see Gate.reserve)
        self.ended = False  # a decoding thread may outlive its request (deadline)
        gate.preparing += 1

    def shorten(self, deadline_ms: float | None) -> None:
        """Bring the deadline forward to `deadline_ms` from now (a limit read from the body)."""
        if deadline_ms is None:
            return
        earlier = self.deadline - (time.monotonic() + deadline_ms / 1000.0)
        if earlier > 0:
            self.deadline -= earlier
            self.timeout_ms = deadline_ms
            when = self._timeout.when()
            assert when is not None
            self._timeout.reschedule(when - earlier)

    def reserve(self, pixels: int) -> None:
        self._gate.reserve(self, pixels)

    def submitting(self) -> None:
        if self._preparing:
            self._preparing = False
            self._gate.preparing -= 1
            self._gate.changed()


class BodyHold:
    """The bytes of one request body held in memory, grown as it streams in."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self.bytes = 0

    def grow(self, total: int) -> None:
        """Hold `total` bytes, or QueueFull when the bodies in flight would pass
        `max_body_bytes_in_flight` (one body alone is always taken: `max_body_bytes` bounds it)."""
        gate, more = self._gate, total - self.bytes
        if more <= 0:
            return
        others = gate.body_bytes_in_flight - self.bytes
        if others > 0 and gate.body_bytes_in_flight + more > gate.max_body_bytes_in_flight:
            raise QueueFull(
                f"{gate.body_bytes_in_flight} bytes of request bodies in flight, {more} more "
                f"would pass the limit of {gate.max_body_bytes_in_flight}",
                retry_after=gate.retry_after(),
            )
        gate.body_bytes_in_flight += more
        self.bytes = total


class Gate:
    """The server's request budgets (see the module's docstring). `retry_after()` is the
    predicted wait of the queues, for the 503's Retry-After."""

    def __init__(
        self,
        *,
        max_queue: int,
        timeout_ms: float,
        max_pixels_in_flight: int,
        max_body_bytes_in_flight: int,
    ) -> None:
        self.max_queue = max_queue
        self.timeout_ms = timeout_ms
        self.max_pixels_in_flight = max_pixels_in_flight
        self.max_body_bytes_in_flight = max_body_bytes_in_flight
        self.in_flight = 0
        self.preparing = 0  # admitted requests that may still submit work (batches wait for them)
        self.pixels_in_flight = 0  # of admitted requests' images; decoding threads add to it
        self.body_bytes_in_flight = 0
        self._lock = threading.Lock()
        self._listeners: list[asyncio.Event] = []
        self.retry_after = lambda: 1.0

    def listen(self, event: asyncio.Event) -> None:
        """`event` is set whenever an admitted request stops preparing (a batcher's wake-up)."""
        self._listeners.append(event)

    def forget(self, event: asyncio.Event) -> None:
        self._listeners.remove(event)

    def changed(self) -> None:
        for event in self._listeners:
            event.set()

    @asynccontextmanager
    async def receiving(self) -> AsyncIterator[BodyHold]:
        """A request body being received: its bytes are held until the request ends."""
        hold = BodyHold(self)
        try:
            yield hold
        finally:
            self.body_bytes_in_flight -= hold.bytes

    @asynccontextmanager
    async def admit(self, deadline_ms: float | None = None) -> AsyncIterator[Admission]:
        """Admit a request for at most `deadline_ms` (default and cap: the server's timeout):
        QueueFull when `max_queue` are in flight, DeadlineExceeded when its time is up."""
        if self.in_flight >= self.max_queue:
            raise QueueFull(
                f"{self.in_flight} requests in flight, the limit is {self.max_queue}",
                retry_after=self.retry_after(),
            )
        timeout_ms = min(deadline_ms or self.timeout_ms, self.timeout_ms)
        timeout = asyncio.timeout(timeout_ms / 1000.0)
        self.in_flight += 1
        admission = Admission(self, timeout, timeout_ms)
        try:
            async with timeout:
                yield admission
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"no result within the deadline of {admission.timeout_ms:g} ms; "
                "try a faster mode, a smaller image or a larger deadline_ms"
            ) from exc
        finally:
            admission.submitting()
            self.in_flight -= 1
            with self._lock:
                self.pixels_in_flight -= admission.pixels
                admission.pixels, admission.ended = 0, True

    def reserve(self, admission: Admission, pixels: int) -> None:
        """Take `pixels` from the budget of `max_pixels_in_flight` for this admission, or
        QueueFull: `max_queue` alone would let that many large images (a few kB each as PNG)
        be decoded and held at once, gigabytes in all. Called from decoding threads."""
        with self._lock:
            if admission.ended:  # nothing would release it: give up decoding instead
                raise DeadlineExceeded("the request ended before its image was decoded")
            total = self.pixels_in_flight + pixels
            if self.pixels_in_flight and total > self.max_pixels_in_flight:
                raise QueueFull(
                    f"{self.pixels_in_flight} pixels of images in flight, {pixels} more would "
                    f"pass the limit of {self.max_pixels_in_flight}",
                    retry_after=self.retry_after(),
                )
            self.pixels_in_flight = total
            admission.pixels += pixels


class MemoryBudget:
    """Bytes of activations that the running batches may hold together (event loop only).

    `capacity` follows the memory ceiling minus what the process holds at rest (the registry
    sets it whenever models load or unload)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._freed = asyncio.Event()
        self._trim: asyncio.TimerHandle | None = None

    def room(self, cost: int, most: int) -> int:
        """How many inputs of `cost` bytes may start now (at most `most`); with nothing running,
        at least one (so that a budget that shrank below an admitted input cannot stall it)."""
        if cost <= 0:
            return most
        fits = max((self.capacity - self.in_use) // cost, 0)
        return min(most, fits if self.in_use else max(fits, 1))

    def take(self, nbytes: int) -> None:
        self.in_use += nbytes

    def release(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self._freed.set()
        if nbytes >= TRIM_ABOVE and self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._give_back)

    def _give_back(self) -> None:
        """Hand the large batches' freed memory back to the kernel, off the event loop."""
        self._trim = None
        asyncio.get_running_loop().run_in_executor(None, memory.trim)

    async def freed(self) -> None:
        """Wait until some running batch releases its bytes."""
        self._freed.clear()
        await self._freed.wait()

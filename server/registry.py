"""The models this server holds, by name, and their life cycle.

A model repository (`--models DIR`) is one model (`DIR/model.json`; served under the manifest's
name) or a folder of them (`DIR/<name>/model.json`; served under the folder's name). Each model
has its own engine and state (loading, ready, failed, unloaded); loading, reloading and
unloading one never touches another, and one that fails leaves the others serving.

Loading builds a new engine beside the serving one (sessions, a probe of a second or so) and
swaps it in with one assignment on the event loop; requests that hold the old engine (a lease)
finish on it, and it is closed and freed when the last of them ends. Load requests for one
model coalesce: while one runs, every further request waits for a single next one, so a storm
of reloads costs at most two. One `Gate` (request budgets) and one `MemoryBudget` (activation
bytes, from the memory ceiling) are shared by all models: the process, not a model, runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from unetpp.core.errors import UNetPPError
from unetpp.core.manifest import MANIFEST_NAME, read_manifest
from unetpp.server import memory
from unetpp.server.admission import Gate, MemoryBudget
from unetpp.server.engine import Engine
from unetpp.server.errors import LoadFailed, ModelNotFound, ModelUnavailable, NotReady
from unetpp.server.metrics import Metrics, gauge
from unetpp.server.runtime import load_model
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SMALLEST_BUDGET = 64 << 20
DEFAULT_CEILING = 4 << 30  # without a memory_limit setting or a cgroup limit


def discover(directory: Path) -> dict[str, Path]:
    """Model name -> folder: the repository itself when it holds a manifest, else its
    subfolders that do (names outside `NAME` are skipped with a warning)."""
    if (directory / MANIFEST_NAME).exists():
        try:
            name = read_manifest(directory).name
        except UNetPPError:
            name = directory.name  # its load will fail and say why, under this name
        return {name if NAME.fullmatch(name) else "default": directory}
    found = {}
    for sub in sorted(directory.iterdir()) if directory.is_dir() else []:
        if (sub / MANIFEST_NAME).is_file():
            if NAME.fullmatch(sub.name):
                found[sub.name] = sub
            else:
                log.warning("%s: not a valid model name; skipped", sub)
    return found


@dataclass
class Slot:
    """One model's place in the registry."""

    name: str
    directory: Path
    engine: Engine | None = None
    state: str = "unloaded"  # loading, ready, failed, unloaded
    error: str | None = None
    loaded_at: float | None = None  # time.time() of the last swap
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    asked: int = 0  # load requests made
    done: int = 0  # load requests that a finished load covered
    outcome: UNetPPError | None = None  # how the last load ended (None: ok)


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.gate = Gate(
            max_queue=settings.max_queue,
            timeout_ms=settings.timeout_ms,
            max_pixels_in_flight=settings.max_pixels_in_flight,
            max_body_bytes_in_flight=settings.max_body_bytes_in_flight,
        )
        self.gate.retry_after = self._retry_after
        self.ceiling = settings.memory_limit or memory.cgroup_limit() or DEFAULT_CEILING
        self.budget = MemoryBudget(self._capacity())
        self.slots: dict[str, Slot] = {}
        self.error: str | None = None  # why the repository holds no model
        self.draining = False
        self.stopping = threading.Event()  # set on shutdown: start-up work gives up
        self._background: set[asyncio.Task[None]] = set()
        metrics.watch(self._gauges)

    # --- what is served --------------------------------------------------------------------

    @property
    def default(self) -> str | None:
        """The model plain /v1/segment serves: UNETPP_DEFAULT_MODEL, or the only one."""
        if self.settings.default_model:
            return self.settings.default_model
        return next(iter(self.slots)) if len(self.slots) == 1 else None

    @property
    def ready(self) -> bool:
        return not self.draining and any(s.state == "ready" for s in self.slots.values())

    @property
    def status(self) -> str:
        """The server's state in one word, for /healthz."""
        if self.draining:
            return "draining"
        states = {s.state for s in self.slots.values()}
        for state in ("ready", "loading", "failed"):
            if state in states:
                return state
        if not self.slots:
            return "failed" if self.error else "loading"
        return "unloaded"

    def slot(self, name: str | None) -> Slot:
        if not self.slots and self.error:
            raise NotReady(self.error)
        if name is None:
            name = self.default
            if name is None:
                raise ModelNotFound(
                    f"this server holds {len(self.slots)} models ({', '.join(self.slots)}): name "
                    "one (/v1/models/{name}/segment) or set UNETPP_DEFAULT_MODEL"
                )
        slot = self.slots.get(name)
        if slot is None:
            held = ", ".join(self.slots) or "none"
            raise ModelNotFound(f"no model {name!r}; models: {held}")
        return slot

    def engine(self, name: str | None) -> Engine:
        """The serving engine of a model, or why there is none."""
        slot = self.slot(name)  # draining changes readiness only: requests are still served
        if slot.engine is None:
            if slot.state == "loading":
                raise NotReady(f"model {slot.name} is still loading", retry_after=1)
            raise ModelUnavailable(
                f"model {slot.name} is {slot.state}: {slot.error or 'load it first'}"
            )
        return slot.engine

    @contextmanager
    def lease(self, name: str | None) -> Iterator[Engine]:
        """The model's engine, held for a whole request (see the module's docstring)."""
        with self.engine(name).lease() as engine:
            yield engine

    # --- life cycle ------------------------------------------------------------------------

    def scan(self) -> None:
        """Pick up models added to the repository on disk (the index, a load)."""
        if self.settings.models is None:
            return
        for name, directory in discover(self.settings.models).items():
            if any(slot.directory == directory for slot in self.slots.values()):
                continue  # a folder keeps the name it was first served under
            self.slots.setdefault(name, Slot(name, directory))
        if not self.slots:
            self.error = (
                f"{self.settings.models}: no manifest ({MANIFEST_NAME}), and no folders "
                f"<name>/{MANIFEST_NAME} in it"
            )
        else:
            self.error = None

    async def start(self) -> None:
        """Load every model of the repository, one after the other (each probe measures memory
        with the process otherwise quiet)."""
        self.scan()
        if self.error:
            log.error("not ready: %s", self.error)
        for slot in list(self.slots.values()):
            slot.state = "loading"
        for name in list(self.slots):
            with contextlib.suppress(UNetPPError):  # logged, the slot says why; the others load
                await self.load(name)

    async def load(self, name: str) -> Engine:
        """(Re)load one model and swap it in; LoadFailed leaves what served serving."""
        self.scan()
        slot = self.slot(name)
        slot.asked += 1
        wanted = slot.asked
        async with slot.lock:
            if slot.done >= wanted:  # a load that began after this request has covered it
                if slot.outcome is not None:
                    raise slot.outcome
                assert slot.engine is not None
                return slot.engine
            covers = slot.asked
            try:
                engine = await self._build(slot)
            except LoadFailed as exc:
                slot.done, slot.outcome = covers, exc
                raise
            slot.done, slot.outcome = covers, None
            self._swap(slot, engine)
        return engine

    async def unload(self, name: str) -> None:
        """Stop serving a model; its engine is freed when its last request ends."""
        slot = self.slot(name)
        async with slot.lock:
            old, slot.engine = slot.engine, None
            slot.state, slot.error = "unloaded", None
            if old is not None:
                self._spawn(self._retire(old))
        log.info("model %s unloaded", name)

    async def reload_all(self) -> dict[str, UNetPPError | None]:
        """SIGHUP and POST /v1/admin/reload: load every model that is not unloaded again (and any
        that appeared on disk). Returns each model's failure (None: reloaded); a failure is
        logged and leaves that model as it was."""
        self.scan()
        names = [n for n, s in self.slots.items() if s.state != "unloaded" or s.done == 0]
        results = await asyncio.gather(*(self.load(n) for n in names), return_exceptions=True)
        failures: dict[str, UNetPPError | None] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, UNetPPError):
                raise result
            failures[name] = result if isinstance(result, UNetPPError) else None
            self.metrics.reloads.labels(name, "failed" if failures[name] else "ok").inc()
        return failures

    async def _build(self, slot: Slot) -> Engine:
        settings = self.settings
        if slot.engine is None:
            slot.state = "loading"
        log.info("loading model %s from %s", slot.name, slot.directory)

        def build() -> Engine:  # sessions (the cascade's stages too) and the probe: a thread's
            model = load_model(
                slot.directory,
                settings.device,
                settings.threads,
                settings.memory_arena,
                settings.backend,
            )
            engine = Engine(slot.name, model, settings, self.metrics, self.gate, self.budget)
            engine.probe(self.stopping)
            return engine

        try:
            engine = await asyncio.to_thread(build)
        except UNetPPError as exc:
            failure = LoadFailed(f"model {slot.name}: {exc.detail}")
        except Exception as exc:  # onnxruntime's own errors are untyped; stay up, say why
            log.exception("loading %s failed", slot.directory)
            failure = LoadFailed(f"model {slot.name}: {type(exc).__name__}: {exc}")
        else:
            await engine.start()
            return engine
        if slot.engine is None:
            slot.state, slot.error = "failed", failure.detail
        kept = "the previous model keeps serving" if slot.engine else "not serving"
        log.error("%s (%s)", failure.detail, kept)
        raise failure

    def _swap(self, slot: Slot, engine: Engine) -> None:
        old, slot.engine = slot.engine, engine
        slot.state, slot.error, slot.loaded_at = "ready", None, time.time()
        if old is not None:
            self._spawn(self._retire(old))
        self.budget.capacity = self._capacity()
        self._spawn(engine.refine(self.stopping))
        log.info("model %s ready: %s", slot.name, ", ".join(engine.runners))

    async def _retire(self, engine: Engine) -> None:
        name = engine.name
        await engine.idle()
        await engine.close()
        del engine  # its sessions go with the last reference: then their memory can go back
        memory.trim()
        self.budget.capacity = self._capacity()
        log.info("a retired engine of model %s is closed (its requests finished)", name)

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _capacity(self) -> int:
        """The activation budget: the ceiling, less headroom, less what the process holds now."""
        return max(memory.activation_room(self.ceiling), SMALLEST_BUDGET)

    def _retry_after(self) -> float:
        waits = [s.engine.batcher.queue_wait_ms() for s in self.slots.values() if s.engine]
        return (max(waits, default=0.0) + self.settings.max_wait_ms) / 1000.0

    async def close(self) -> None:
        self.stopping.set()  # a load still probing, or a refinement, gives up
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for slot in self.slots.values():
            if slot.engine is not None:
                await slot.engine.close()
                slot.engine = None

    # --- metrics ---------------------------------------------------------------------------

    def _gauges(self) -> Iterator[Metric]:
        yield gauge(
            "unetpp_ready", "1 when some model is ready and the server is not draining", self.ready
        )
        gate = self.gate
        yield gauge(
            "unetpp_requests_in_flight",
            "requests admitted: decoding, queued or running",
            gate.in_flight,
        )
        yield gauge(
            "unetpp_memory_budget_bytes", "activation bytes batches may hold", self.budget.capacity
        )
        yield gauge(
            "unetpp_memory_in_use_bytes",
            "activation bytes of the running batches",
            self.budget.in_use,
        )
        yield gauge(
            "unetpp_body_bytes_in_flight", "bytes of request bodies held", gate.body_bytes_in_flight
        )
        models = GaugeMetricFamily(
            "unetpp_model_ready", "1 when the model serves", labels=["model", "version", "state"]
        )
        queued = GaugeMetricFamily(
            "unetpp_queue_items", "inputs waiting in the model's batcher", labels=["model"]
        )
        for slot in self.slots.values():
            version = slot.engine.model.manifest.version if slot.engine else ""
            models.add_metric([slot.name, str(version), slot.state], slot.engine is not None)
            queued.add_metric([slot.name], slot.engine.batcher.queued if slot.engine else 0)
        yield models
        yield queued

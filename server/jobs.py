"""Asynchronous jobs in a directory that replicas share: accepted once, run exactly once, never
silently lost.

A job is a folder `UNETPP_JOBS_DIR/<id>/`:

    upload        the request body, streamed to disk
    params.json   the routing options it was sent with
    state.json    queued | running | done | failed | cancelled, progress (windows done / total),
                  timestamps, attempts, the error; replaced atomically (write + rename)
    lock          flock'ed by the process running the job, for as long as it runs
    cancel        present once a DELETE asked for cancellation
    result.tif    the output (a tiled BigTIFF label image)

Creation writes the folder under `.incoming/` and renames it into place once the upload is
complete: a job exists (and is answered 202) only whole. Claiming is `flock(LOCK_EX|LOCK_NB)`
on the job's lock file, an atomic test-and-set the kernel (or the NFS server, NFSv4 locks)
arbitrates between processes; the holder re-reads the state under the lock, so a job runs in one
process at a time and a finished job never again. The lock is the lease: when its holder dies
(kill -9, a node lost), the kernel (the NFS server, after its lease time) releases it, and the
first replica to find a `running` job it can lock takes it over: it runs again from the start
(attempt n + 1), or after `max_attempts` is marked failed with the reason. A shutdown hands a
running job back as queued. Finished jobs are deleted `ttl_s` after they finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from unetpp.core import slide
from unetpp.core.errors import Cancelled, UNetPPError
from unetpp.core.routing import Choice, Route
from unetpp.server.admission import MemoryBudget
from unetpp.server.engine import Engine
from unetpp.server.errors import JobNotDone, JobNotFound, JobsFull, UploadTooLarge
from unetpp.server.registry import Registry
from unetpp.server.runtime import Runner

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL = (DONE, FAILED, CANCELLED)
INCOMING, TRASH = ".incoming", ".trash"
CHUNK = 1 << 20
T = TypeVar("T")


class JobSettings(BaseSettings):
    """The jobs subsystem's settings, from `UNETPP_JOBS_<FIELD>` (docs/jobs.md)."""

    model_config = SettingsConfigDict(env_prefix="UNETPP_JOBS_", frozen=True)

    dir: Path | None = Field(
        None, description="the jobs directory (a shared volume for replicas); unset: no jobs"
    )
    max_jobs: int = Field(
        100, ge=1, description="jobs held at once, in any state (uploads in progress count)"
    )
    max_bytes: int = Field(
        64 << 30, ge=1, description="bytes of all jobs' folders (uploads and results)"
    )
    max_upload_bytes: int = Field(16 << 30, ge=1, description="bytes of one job's upload")
    ttl_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="a finished job (done, failed, cancelled) is deleted this long after",
    )
    workers: int = Field(1, ge=1, description="jobs this process runs at once")
    poll_s: float = Field(1.0, gt=0, description="how often an idle worker looks for work")
    max_attempts: int = Field(
        3, ge=1, description="starts of a job whose runner keeps dying before it is marked failed"
    )
    tile_size: int | None = Field(
        None,
        ge=16,
        multiple_of=16,
        description="window side of a job's tiles (unset: the chosen graph's measured tile, "
        "else UNETPP_TILE_SIZE)",
    )
    tile_overlap: int = Field(
        64, ge=0, multiple_of=16, description="overlap of neighbouring windows"
    )
    batch: int = Field(4, ge=1, description="windows per run of the graph")


class Stopping(Exception):
    """The worker is shutting down: the job goes back to the queue."""


@dataclass(frozen=True)
class Job:
    id: str
    folder: Path
    params: dict[str, Any]
    state: str = QUEUED
    done: int = 0
    total: int = 0
    created: float = 0.0
    updated: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    runner: str = ""  # host:pid of the last process that ran it
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what the process reported

    @property
    def upload(self) -> Path:
        return self.folder / "upload"

    @property
    def result(self) -> Path:
        return self.folder / "result.tif"

    def public(self) -> dict[str, Any]:
        """The job as GET /v1/jobs/{id} shows it."""
        data = asdict(self)
        data.pop("folder")
        data["progress"] = {"done": self.done, "total": self.total}
        del data["done"], data["total"]
        return data


STATE_FIELDS = tuple(f.name for f in fields(Job) if f.name not in ("id", "folder", "params"))


class Process(Protocol):
    """Runs one job: reads `job.upload`, writes `job.result`; may return facts for its state."""

    def __call__(
        self, job: Job, progress: Callable[[int, int], None], cancelled: Callable[[], bool]
    ) -> dict[str, Any] | None: ...


@dataclass
class Claim:
    """A job this process holds the lock of."""

    job: Job
    fd: int


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for entry in os.scandir(folder):
        with contextlib.suppress(OSError):
            total += entry.stat(follow_symlinks=False).st_size
    return total


class JobStore:
    """The jobs directory: create, read, claim, update, cancel and expire jobs."""

    def __init__(self, settings: JobSettings) -> None:
        if settings.dir is None:
            raise ValueError("JobStore needs settings.dir")
        self.settings = settings
        self.root = settings.dir
        for sub in (INCOMING, TRASH):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self._held: set[str] = set()  # POSIX locks on NFS do not exclude the same process

    def folder(self, job_id: str) -> Path:
        if len(job_id) != 32 or not all(c in "0123456789abcdef" for c in job_id):
            raise JobNotFound(f"no job {job_id!r}")
        return self.root / job_id

    def ids(self) -> list[str]:
        return [e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")]

    def get(self, job_id: str) -> Job:
        folder = self.folder(job_id)
        try:
            params = json.loads((folder / "params.json").read_text())
            state = json.loads((folder / "state.json").read_text())
        except FileNotFoundError as exc:
            raise JobNotFound(f"no job {job_id!r} (never created, deleted or expired)") from exc
        job = Job(job_id, folder, params, **{k: state[k] for k in STATE_FIELDS if k in state})
        if self._expired(job):
            raise JobNotFound(f"job {job_id} expired")
        return job

    def _expired(self, job: Job) -> bool:
        return job.finished is not None and time.time() - job.finished > self.settings.ttl_s

    def _save(self, job: Job) -> Job:
        job = replace(job, updated=time.time())
        _write_json(job.folder / "state.json", {k: getattr(job, k) for k in STATE_FIELDS})
        return job

    async def create(
        self,
        params: dict[str, Any],
        body: AsyncIterator[bytes],
        check: Callable[[Path], None] | None = None,
    ) -> Job:
        """Stream `body` into a new job's upload; `check(upload)` may refuse it (raise); the job
        appears (queued) once it is whole and checked."""
        self.sweep()
        held, used = self._usage()
        limits = self.settings
        if held >= limits.max_jobs:
            raise JobsFull(f"the jobs directory holds {held} jobs (the limit is {limits.max_jobs})")
        room = min(limits.max_upload_bytes, limits.max_bytes - used)
        if room <= 0:
            raise JobsFull(
                f"the jobs directory holds {used} bytes (the limit is {limits.max_bytes})"
            )
        job_id = uuid.uuid4().hex
        incoming = self.root / INCOMING / job_id
        incoming.mkdir()
        try:
            size = await self._receive(body, incoming / "upload", room)
            if check is not None:
                await asyncio.to_thread(check, incoming / "upload")
            (incoming / "lock").touch()
            _write_json(incoming / "params.json", params)
            now = time.time()
            job = self._save(Job(job_id, incoming, params, created=now))
            os.rename(incoming, self.root / job_id)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        log.info("job %s accepted (%d bytes)", job_id, size)
        return replace(job, folder=self.root / job_id)

    async def _receive(self, body: AsyncIterator[bytes], path: Path, room: int) -> int:
        size = 0
        with path.open("wb") as out:
            async for chunk in body:
                size += len(chunk)
                if size > room:
                    raise UploadTooLarge(
                        f"the upload is above the {room} bytes a job may hold "
                        f"(UNETPP_JOBS_MAX_UPLOAD_BYTES, or what is left of UNETPP_JOBS_MAX_BYTES)"
                    )
                await asyncio.to_thread(out.write, chunk)
        return size

    def _usage(self) -> tuple[int, int]:
        """Jobs held and their bytes (uploads in progress included)."""
        folders = [self.root / i for i in self.ids()]
        folders += [Path(e.path) for e in os.scandir(self.root / INCOMING) if e.is_dir()]
        return len(folders), sum(_folder_bytes(f) for f in folders)

    @contextlib.contextmanager
    def _locked(self, job_id: str) -> Iterator[int | None]:
        """The job's lock if no one holds it (yields None otherwise); released on exit."""
        fd = self._lock(job_id)
        try:
            yield fd
        finally:
            if fd is not None:
                self._unlock(job_id, fd)

    def _lock(self, job_id: str) -> int | None:
        if job_id in self._held:
            return None
        try:
            fd = os.open(self.folder(job_id) / "lock", os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        self._held.add(job_id)
        return fd

    def _unlock(self, job_id: str, fd: int) -> None:
        self._held.discard(job_id)
        os.close(fd)  # releases the flock

    def claim(self) -> Claim | None:
        """Lock the oldest job that is queued, or running under a dead runner, and mark it
        running; None when there is none."""
        jobs = []
        for job_id in self.ids():
            with contextlib.suppress(JobNotFound):
                job = self.get(job_id)
                if job.state in (QUEUED, RUNNING):
                    jobs.append(job)
        for job in sorted(jobs, key=lambda j: j.created):
            fd = self._lock(job.id)
            if fd is None:
                continue
            claimed = self._take(job.id)
            if claimed is not None:
                return Claim(claimed, fd)
            self._unlock(job.id, fd)
        return None

    def _take(self, job_id: str) -> Job | None:
        """Under the job's lock: the job marked running, or None when it is not to be run."""
        try:
            job = self.get(job_id)
        except JobNotFound:
            return None
        if job.state in TERMINAL:
            return None
        now = time.time()
        if self.cancel_requested(job):
            self._save(replace(job, state=CANCELLED, finished=now))
            return None
        if job.state == RUNNING:  # its runner died: the lock was free
            lost = f"its runner {job.runner} stopped while running it (a crash or kill)"
            if job.attempts >= self.settings.max_attempts:
                error = f"{lost}, {job.attempts} times: not run again"
                self._save(replace(job, state=FAILED, finished=now, error=error))
                log.error("job %s failed: %s", job_id, error)
                return None
            log.warning("job %s resumed: %s", job_id, lost)
        job = replace(job, state=RUNNING, started=now, attempts=job.attempts + 1, runner=self.me)
        return self._save(replace(job, done=0, error=None))

    def progress(self, claim: Claim, done: int, total: int) -> None:
        claim.job = self._save(replace(claim.job, done=done, total=total))

    def finish(self, claim: Claim, state: str, error: str | None = None, **info: Any) -> Job:
        """Record how the claimed job ended (QUEUED: handed back) and release it."""
        try:
            job = claim.job
            if state == QUEUED:  # handed back: that start was not a failed attempt
                job = replace(job, attempts=job.attempts - 1)
            finished = time.time() if state in TERMINAL else None
            merged = {**job.info, **info}
            job = self._save(replace(job, state=state, finished=finished, error=error, info=merged))
        finally:
            self._unlock(claim.job.id, claim.fd)
        log.info("job %s %s%s", job.id, state, f": {error}" if error else "")
        return job

    def cancel_requested(self, job: Job) -> bool:
        return (job.folder / "cancel").exists()

    def cancel(self, job_id: str) -> Job:
        """Ask for cancellation; a job no one runs is cancelled at once, a running one at its
        next batch (by its runner, in whichever replica)."""
        job = self.get(job_id)
        if job.state in TERMINAL:
            return job
        (job.folder / "cancel").touch()
        with self._locked(job_id) as fd:
            if fd is not None:
                job = self.get(job_id)
                if job.state not in TERMINAL:
                    job = self._save(replace(job, state=CANCELLED, finished=time.time()))
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        """Remove a finished job (and its result) now."""
        job = self.get(job_id)
        if job.state not in TERMINAL:
            raise JobNotDone(f"job {job_id} is {job.state}: cancel it first")
        self._discard(job.folder)

    def _discard(self, folder: Path) -> None:
        trash = self.root / TRASH / f"{folder.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)  # atomic: readers see the job or nothing
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> int:
        """Delete expired jobs, and uploads that never completed (older than the TTL)."""
        now, removed = time.time(), 0
        for job_id in self.ids():
            try:
                self.get(job_id)
            except JobNotFound:
                if (self.root / job_id / "state.json").exists():  # expired, not half-made
                    self._discard(self.root / job_id)
                    removed += 1
        for entry in os.scandir(self.root / INCOMING):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > self.settings.ttl_s:
                    shutil.rmtree(entry.path, ignore_errors=True)
        for entry in os.scandir(self.root / TRASH):
            shutil.rmtree(entry.path, ignore_errors=True)
        return removed


class JobWorker:
    """Asyncio tasks that claim jobs and run `process` on them in threads."""

    def __init__(
        self, store: JobStore, process: Process, ready: Callable[[], bool] = lambda: True
    ) -> None:
        self.store = store
        self.process = process
        self.ready = ready  # claim only while it says so (the models are loaded, not draining)
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop()) for _ in range(self.store.settings.workers)
        ]

    async def close(self) -> None:
        """Stop claiming; a job in progress stops at its next batch and goes back to the queue."""
        self.stopping.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.to_thread(self.store.sweep)
                claim = await asyncio.to_thread(self.store.claim) if self.ready() else None
                if claim is not None:
                    await self._run(claim)
                    continue
            except Exception:  # a broken job folder must not stop the worker
                log.exception("the jobs worker failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.store.settings.poll_s)

    async def _run(self, claim: Claim) -> None:
        store, job = self.store, claim.job
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if done in (0, total) or time.monotonic() - last[0] > 0.5:
                last[0] = time.monotonic()
                store.progress(claim, done, total)

        def cancelled() -> bool:
            if self.stopping.is_set():
                raise Stopping
            return store.cancel_requested(job)

        log.info("job %s running (attempt %d)", job.id, job.attempts)
        try:
            info = await asyncio.to_thread(self.process, job, progress, cancelled)
        except Stopping:
            store.finish(claim, QUEUED, "handed back: the server stopped")
        except Cancelled:
            store.finish(claim, CANCELLED)
        except UNetPPError as exc:
            store.finish(claim, FAILED, exc.detail)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            store.finish(claim, FAILED, f"internal error: {type(exc).__name__}: {exc}")
        else:
            store.finish(claim, DONE, **(info or {}))


@dataclass(frozen=True)
class SlideJobs:
    """The default `Process`: the job's TIFF through core/slide.py on the sessions the server
    serves its model with (the registry's engine, leased for the whole job: a reload or unload
    closes them only after it), on the graph its routing options choose (core/routing.py, on
    the engine's live latency figures), in windows of `tile` px (None: the graph's measured
    tile, else the server's tile_size). Each batch of windows holds its activation bytes
    against the server's memory budget while it runs, as a batch of requests does; a batch is
    at most as many windows as the budget holds. Runs in a worker thread: what touches the
    registry, the engine or the budget runs on `loop`."""

    registry: Registry
    loop: asyncio.AbstractEventLoop
    tile: int | None = None
    overlap: int = 64
    batch: int = 4

    def __call__(
        self, job: Job, progress: Callable[[int, int], None], cancelled: Callable[[], bool]
    ) -> dict[str, Any]:
        with slide.open_slide(job.upload) as pages:
            page = pages[0]
        with self._lease(job.params.get("model")) as engine:
            route, tile = self._on_loop(self._route, engine, job.params, page.height, page.width)
            runner = engine.runners[route.graph]
            per_pixel = engine.figures[route.graph].bytes_per_pixel
            window = per_pixel * min(tile, page.height) * min(tile, page.width)
            batch = max(1, min(self.batch, engine.budget.capacity // window))
            result = slide.segment_slide(
                job.upload,
                job.result,
                self._budgeted(runner, engine.budget, per_pixel),
                preprocessing=engine.model.manifest.preprocessing,
                decide=engine.model.manifest.task.labels,
                tile=tile,
                overlap=self.overlap,
                batch=batch,
                progress=progress,
                cancelled=cancelled,
            )
        return {
            "model": engine.name,
            "graph": route.graph,
            "route_reason": route.reason,
            "tile": tile,
            "batch": batch,
            "pages": result.pages,
            "height": result.height,
            "width": result.width,
        }

    def check(self, params: dict[str, Any]) -> None:
        """Raise BadParameter for routing options no image could satisfy, ModelNotFound for an
        unknown model (at submission, on the event loop)."""
        engine = self.registry.engine(params.get("model"))
        side = self.tile or engine.settings.tile_size
        self._route(engine, params, side, side)

    def _route(
        self, engine: Engine, params: dict[str, Any], height: int, width: int
    ) -> tuple[Route, int]:
        """A graph of the engine (a whole slide does not run the adaptive cascade), each
        predicted on its own windows, and the chosen one's window side."""
        prep = engine.model.manifest.preprocessing
        plans = {
            name: slide.plan(height, width, prep, self._tile(engine, name), self.overlap)
            for name in engine.runners
        }
        how = replace(next(iter(plans.values())), graphs=plans)
        route = engine.route(_choice(params), how, serve=False, adaptive=False)
        return route, self._tile(engine, route.graph)

    def _tile(self, engine: Engine, graph: str) -> int:
        if self.tile is not None:
            return self.tile
        measured = engine.figures[graph].tile
        return engine.settings.tile_size if measured is None else measured.side

    def _on_loop(self, function: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return function(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result()

    @contextlib.contextmanager
    def _lease(self, model: str | None) -> Iterator[Engine]:
        lease = self.registry.lease(model)
        engine = self._on_loop(lease.__enter__)
        try:
            yield engine
        finally:
            self._on_loop(lease.__exit__, None, None, None)

    def _budgeted(
        self, runner: Runner, budget: MemoryBudget, per_pixel: int
    ) -> Callable[[np.ndarray], np.ndarray]:
        async def take(cost: int) -> None:
            while not budget.room(cost, 1):
                await budget.freed()
            budget.take(cost)

        def run(batch: np.ndarray) -> np.ndarray:
            n, _, h, w = batch.shape
            cost = per_pixel * n * h * w
            asyncio.run_coroutine_threadsafe(take(cost), self.loop).result()
            try:
                return runner(batch)
            finally:
                self.loop.call_soon_threadsafe(budget.release, cost)

        return run


CHOICE_FIELDS = tuple(f.name for f in fields(Choice))


def _choice(params: dict[str, Any]) -> Choice:
    return Choice(**{f: params[f] for f in CHOICE_FIELDS if f in params})


class Jobs:
    """The store and its worker, started and closed with the application; `check(params)`
    refuses a job's options at submission."""

    def __init__(
        self,
        store: JobStore,
        worker: JobWorker,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.check = check

    @classmethod
    def from_settings(
        cls, settings: JobSettings, registry: Registry, process: Process | None = None
    ) -> Jobs | None:
        """None when no jobs directory is configured. Without `process`, jobs run SlideJobs on
        the registry's models, claimed only while the registry is ready (called on the event
        loop)."""
        if settings.dir is None:
            return None
        store = JobStore(settings)
        if process is not None:
            return cls(store, JobWorker(store, process))
        slides = SlideJobs(
            registry,
            asyncio.get_running_loop(),
            settings.tile_size,
            settings.tile_overlap,
            settings.batch,
        )
        return cls(store, JobWorker(store, slides, lambda: registry.ready), slides.check)

    async def start(self) -> None:
        await self.worker.start()

    async def close(self) -> None:
        await self.worker.close()

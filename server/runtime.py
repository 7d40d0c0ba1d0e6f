"""A model repository on this machine: verified graphs, onnxruntime sessions, the device.

One session per graph FILE: entries that share a file (L4's "logits" and "ensemble" outputs)
share its session and differ only in the output they read. Providers are explicit:
`auto` takes CUDA only after a session really ran on it, otherwise CPU without complaint;
`cuda` that cannot run is an error that keeps the server not ready, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from unetpp.core.inference import create_session, run_batch, shrinking_arena
from unetpp.core.manifest import Graph, Manifest, load_repository
from unetpp.core.preprocess import MULTIPLE
from unetpp.server.errors import NotReady
from unetpp.server.settings import Device

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class DeviceUnavailable(NotReady):
    error = "device_unavailable"


@dataclass(frozen=True)
class Runner:
    """One servable graph entry: its manifest record and the (possibly shared) session."""

    graph: Graph
    session: ort.InferenceSession
    options: ort.RunOptions | None = None  # the arena's shrinkage, when it is on (CPU)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return run_batch(self.session, batch, self.graph.output, self.options)


@dataclass(frozen=True)
class LoadedModel:
    directory: Path
    manifest: Manifest
    runners: dict[str, Runner]
    device: str  # "cpu" or "cuda"
    providers: tuple[str, ...]


def _cuda_problem(path: Path, channels: int, threads: int) -> str | None:
    """None when a session on `path` really runs on CUDA, else why not."""
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime has no CUDAExecutionProvider (install the gpu extra)"
    try:
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from NVIDIA's pip packages (gpu extra)
            ort.preload_dlls()
        session = create_session(path, threads=threads, providers=[CUDA, CPU])
        if session.get_providers()[0] != CUDA:
            return "onnxruntime could not initialise CUDA (driver or libraries missing)"
        session.run(None, {"image": np.zeros((1, channels, MULTIPLE, MULTIPLE), np.float32)})
    except Exception as exc:  # onnxruntime's errors are untyped
        return f"a CUDA session failed: {exc}"
    return None


def choose_providers(device: Device, probe: Path, channels: int, threads: int) -> tuple[str, ...]:
    if device == "cpu":
        return (CPU,)
    problem = _cuda_problem(probe, channels, threads)
    if problem is None:
        return (CUDA, CPU)
    if device == "cuda":
        raise DeviceUnavailable(f"UNETPP_DEVICE=cuda but {problem}")
    log.info("device auto: CPU (%s)", problem)
    return (CPU,)


def load_model(
    directory: Path, device: Device, threads: int, memory_arena: bool = True
) -> LoadedModel:
    """Verify the repository and open its sessions; fp16 graphs are served on CUDA only."""
    manifest = load_repository(directory)
    providers = choose_providers(
        device, directory / manifest.graphs[0].file, manifest.in_channels, threads
    )
    on_cuda = providers[0] == CUDA
    options = shrinking_arena() if memory_arena and not on_cuda else None
    sessions: dict[str, ort.InferenceSession] = {}
    runners: dict[str, Runner] = {}
    for graph in manifest.graphs:
        if graph.precision == "fp16" and not on_cuda:
            log.info("graph %s: fp16 is served on CUDA only; skipped", graph.name)
            continue
        if graph.file not in sessions:
            sessions[graph.file] = create_session(
                directory / graph.file,
                threads=threads or None,
                providers=providers,
                memory_arena=memory_arena,
            )
        runners[graph.name] = Runner(graph, sessions[graph.file], options)
    if not runners:
        raise NotReady(f"{directory}: no graph can be served on {providers[0]}")
    log.info(
        "loaded %s %s from %s: graphs %s in %d sessions on %s",
        manifest.name,
        manifest.version,
        directory,
        ", ".join(runners),
        len(sessions),
        providers[0],
    )
    return LoadedModel(directory, manifest, runners, "cuda" if on_cuda else "cpu", tuple(providers))

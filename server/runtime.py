"""A model repository on this machine: verified graphs, the backend's sessions, the device.

One session per graph file and precision: entries that share a file (L4's "logits" and
"ensemble" outputs) share its session and differ only in the output they read; a bf16 entry
opens its fp32 file again, in bf16. The backend (`UNETPP_BACKEND`, core/backends.py) runs
every session; a backend that cannot run here keeps the server not ready, with the reason.
onnxruntime's providers are explicit: `auto` takes CUDA only after a session really ran on
it, otherwise CPU without complaint; `cuda` that cannot run is an error that keeps the server
not ready, with the reason. OpenVINO runs on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from unetpp.core.backends import (
    CPU,
    CUDA,
    Backend,
    OnnxRuntime,
    OpenVINO,
    Session,
    open_graphs,
    unavailable,
)
from unetpp.core.inference import create_session, shrinking_arena
from unetpp.core.manifest import BackendName, Graph, Manifest, load_repository
from unetpp.core.preprocess import MULTIPLE
from unetpp.server.errors import NotReady
from unetpp.server.settings import Device

log = logging.getLogger(__name__)


class DeviceUnavailable(NotReady):
    error = "device_unavailable"


class BackendUnavailable(NotReady):
    error = "backend_unavailable"


@dataclass(frozen=True)
class Runner:
    """One servable graph entry: its manifest record and the (possibly shared) session of
    the backend (onnxruntime's with the arena's shrinkage as run options, when it is on)."""

    graph: Graph
    session: Session

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(batch, self.graph.output)


@dataclass(frozen=True)
class LoadedModel:
    directory: Path
    manifest: Manifest
    runners: dict[str, Runner]
    device: str  # "cpu" or "cuda"
    providers: tuple[str, ...]  # onnxruntime's (CPU with OpenVINO)
    # runs the graphs; the cascade opens its stages on it too
    runtime: Backend = field(default_factory=OnnxRuntime)

    @property
    def backend(self) -> str:
        return self.runtime.name


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
    directory: Path,
    device: Device,
    threads: int,
    memory_arena: bool = True,
    backend_name: BackendName = "onnxruntime",
) -> LoadedModel:
    """Verify the repository and open its sessions through the backend; fp16 graphs are served
    on CUDA only, bf16 graphs on OpenVINO on a CPU that computes in bf16."""
    manifest = load_repository(directory)
    backend: Backend
    if backend_name == "openvino":
        backend, providers = _openvino(device), (CPU,)
    else:
        providers = choose_providers(
            device, directory / manifest.graphs[0].file, manifest.in_channels, threads
        )
        on_cpu = providers[0] == CPU
        shrink = shrinking_arena() if memory_arena and on_cpu else None
        backend = OnnxRuntime(memory_arena, providers, shrink)
    sessions = open_graphs(directory, manifest.graphs, backend, threads or None)
    runners = {g.name: Runner(g, sessions[g.name]) for g in manifest.graphs if g.name in sessions}
    where = "openvino" if backend_name == "openvino" else providers[0]
    if not runners:
        raise NotReady(f"{directory}: no graph can be served on {where}")
    log.info(
        "loaded %s %s from %s: graphs %s in %d sessions on %s",
        manifest.name,
        manifest.version,
        directory,
        ", ".join(runners),
        len({id(s) for s in sessions.values()}),
        where,
    )
    device_name = "cuda" if providers[0] == CUDA else "cpu"
    return LoadedModel(directory, manifest, runners, device_name, providers, backend)


def _openvino(device: Device) -> Backend:
    problem = unavailable("openvino")
    if problem:
        raise BackendUnavailable(f"UNETPP_BACKEND=openvino: {problem}")
    if device == "cuda":
        raise DeviceUnavailable("UNETPP_DEVICE=cuda needs UNETPP_BACKEND=onnxruntime")
    return OpenVINO()

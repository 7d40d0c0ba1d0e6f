"""The runtimes that run an exported graph, behind one interface (`UNETPP_BACKEND`).

- `onnxruntime` (the default): core/inference.py's session and `run_batch`.
- `openvino` (the `openvino` extra): OpenVINO reads the same ONNX files. Its CPU plugin
  computes in bf16 where the CPU has AVX512-BF16 or AMX: a manifest's bf16 entries are the
  fp32 files opened that way; fp32 and int8 (QDQ) entries keep their float layers in f32.
  benchmarks/backends.py measures both runtimes per graph and precision, with mask agreement
  (docs/big-images.md#backends).

A backend opens a graph file, at the precision of its manifest entry, into a session whose
`run(batch, output)` maps float32 [N, C, H, W] to logits [N, K, H, W], and whose
`run_named(inputs, outputs)` runs a graph of several named inputs and outputs (the adaptive
cascade's stage graphs, core/cascade.py). Every inference path runs on the chosen backend: the
server's graphs and its cascade, jobs, and `unetpp predict --backend`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from unetpp.core.errors import InvalidInput, ModelRepositoryError
from unetpp.core.inference import INPUT_NAME, create_session, run_batch
from unetpp.core.manifest import BACKENDS, Graph

log = logging.getLogger(__name__)

OPENVINO_MISSING = "the openvino package is not installed: pip install 'unetpp[openvino]'"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class Session(Protocol):
    def run(self, batch: np.ndarray, output: str) -> np.ndarray: ...

    def run_named(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> list[np.ndarray]: ...


class Backend(Protocol):
    name: str

    @property
    def cuda(self) -> bool:
        """Whether its sessions run on CUDA (where fp16 graphs are served)."""
        ...

    def open(
        self, path: str | Path, threads: int | None = None, precision: str = "fp32"
    ) -> Session: ...


@dataclass(frozen=True)
class OrtSession:
    session: Any  # onnxruntime.InferenceSession
    options: Any = None  # onnxruntime.RunOptions (the arena's shrinkage), or None

    def run(self, batch: np.ndarray, output: str) -> np.ndarray:
        return run_batch(self.session, batch, output, self.options)

    def run_named(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> list[np.ndarray]:
        return self.session.run(list(outputs), dict(inputs), self.options)


@dataclass(frozen=True)
class OnnxRuntime:
    """`precision` is the manifest entry's: the file itself says fp32, int8 or fp16."""

    name: str = field(default="onnxruntime", init=False)
    memory_arena: bool = True
    providers: tuple[str, ...] = (CPU,)
    run_options: Any = None  # onnxruntime.RunOptions passed to every run
    spinning: bool = True  # False: graphs that run one after another (create_session)

    @property
    def cuda(self) -> bool:
        return self.providers[0] == CUDA

    def open(
        self, path: str | Path, threads: int | None = None, precision: str = "fp32"
    ) -> OrtSession:
        if precision == "bf16":
            raise InvalidInput("onnxruntime has no bf16 execution on the CPU: use openvino")
        session = create_session(
            path,
            threads=threads,
            providers=self.providers,
            memory_arena=self.memory_arena,
            spinning=self.spinning,
        )
        return OrtSession(session, self.run_options)


@dataclass
class OvSession:
    """A compiled OpenVINO model; one infer request per thread (a request is not reentrant)."""

    compiled: Any  # openvino.CompiledModel
    local: threading.local = field(default_factory=threading.local)

    def run(self, batch: np.ndarray, output: str) -> np.ndarray:
        return self.run_named({INPUT_NAME: batch}, [output])[0]

    def run_named(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> list[np.ndarray]:
        """The outputs are copies: the request's own buffers are overwritten by its next run."""
        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        request.infer(
            {n: np.ascontiguousarray(x, dtype=np.float32) for n, x in inputs.items()},
            share_inputs=True,
        )
        return [request.get_tensor(n).data.copy() for n in outputs]


# the manifest's precision -> OpenVINO's inference precision (int8: the layers left in float)
_HINTS = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}


@dataclass(frozen=True)
class OpenVINO:
    """`precision` "bf16" runs an fp32 file in bf16, "fp32"/"int8" keep float layers in f32,
    "auto" takes the plugin's default (bf16 on a CPU that has it)."""

    name: str = field(default="openvino", init=False)
    cuda: bool = field(default=False, init=False)  # OpenVINO runs on the CPU here

    def open(
        self, path: str | Path, threads: int | None = None, precision: str = "fp32"
    ) -> OvSession:
        ov = _openvino()
        config: dict[str, Any] = {}
        if precision != "auto":
            if precision not in _HINTS:
                raise InvalidInput(f"OpenVINO runs fp32, int8 or bf16 graphs, not {precision}")
            config["INFERENCE_PRECISION_HINT"] = _HINTS[precision]
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            core = ov.Core()
            return OvSession(core.compile_model(core.read_model(str(path)), "CPU", config))
        except RuntimeError as exc:  # OpenVINO's errors are untyped
            raise ModelRepositoryError(f"{path}: OpenVINO cannot load it ({exc})") from exc


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise InvalidInput(OPENVINO_MISSING) from exc
    return openvino


def unavailable(name: str) -> str | None:
    """Why the backend cannot run here, or None."""
    if name == "openvino":
        try:
            _openvino()
        except InvalidInput as exc:
            return exc.detail
    return None


@functools.cache
def bf16_runs() -> bool:
    """Whether OpenVINO is here and this CPU computes in bf16 (AVX512-BF16 or AMX); elsewhere
    OpenVINO would run a bf16 entry in f32 and its measured figures would not hold."""
    if unavailable("openvino"):
        return False
    return "BF16" in _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def skipped(graph: Graph, backend: Backend) -> str:
    """Why `backend` does not run the graph ("" when it does): fp16 runs on CUDA only, a bf16
    entry on OpenVINO on a CPU that computes in bf16."""
    if graph.precision == "fp16" and not backend.cuda:
        return "fp16 runs on CUDA only"
    if graph.backend not in (None, backend.name):
        return f"{graph.precision} runs on the {graph.backend} backend only"
    if graph.precision == "bf16" and not bf16_runs():
        return "this CPU does not compute in bf16"
    return ""


def open_graphs(
    directory: Path, graphs: Iterable[Graph], backend: Backend, threads: int | None = None
) -> dict[str, Session]:
    """The sessions of the graphs `backend` runs, by name; entries that share a file and
    precision (L4's `logits` and `ensemble`) share one. A graph it does not run is logged with
    the reason (`skipped`)."""
    opened: dict[tuple[str, str], Session] = {}
    sessions: dict[str, Session] = {}
    for graph in graphs:
        reason = skipped(graph, backend)
        if reason:
            log.info("graph %s: %s; skipped", graph.name, reason)
            continue
        key = (graph.file, graph.precision)
        if key not in opened:
            opened[key] = backend.open(directory / graph.file, threads, graph.precision)
        sessions[graph.name] = opened[key]
    return sessions


def backend(name: str, **options: Any) -> Backend:
    """The backend `UNETPP_BACKEND` names, with its options (onnxruntime: memory_arena,
    providers, run_options, spinning)."""
    if name == "onnxruntime":
        return OnnxRuntime(**options)
    if name == "openvino":
        return OpenVINO(**options)
    raise InvalidInput(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")

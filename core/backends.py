"""The runtimes that run an exported graph, behind one interface (`UNETPP_BACKEND`).

- `onnxruntime` (the default): core/inference.py's session and `run_batch`.
- `openvino` (the `openvino` extra): OpenVINO reads the same ONNX files. Its CPU plugin runs
  in bf16 where the CPU has AVX512-BF16 or AMX (its default there) unless `precision="f32"`;
  int8 (QDQ) graphs run in int8 either way. benchmarks/backends.py measures both runtimes per
  graph and precision, with mask agreement (docs/big-images.md#backends).

A backend opens a graph file into a session whose `run(batch, output)` has the signature of
`run_batch(session, batch, output)`: float32 [N, C, H, W] -> logits [N, K, H, W].
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from unetpp.core.errors import InvalidInput, ModelRepositoryError
from unetpp.core.inference import INPUT_NAME, create_session, run_batch

BACKENDS = ("onnxruntime", "openvino")


class Session(Protocol):
    def run(self, batch: np.ndarray, output: str) -> np.ndarray: ...


class Backend(Protocol):
    name: str

    def open(self, path: str | Path, threads: int | None = None) -> Session: ...


@dataclass(frozen=True)
class OrtSession:
    session: Any  # onnxruntime.InferenceSession

    def run(self, batch: np.ndarray, output: str) -> np.ndarray:
        return run_batch(self.session, batch, output)


@dataclass(frozen=True)
class OnnxRuntime:
    name: str = field(default="onnxruntime", init=False)
    memory_arena: bool = True

    def open(self, path: str | Path, threads: int | None = None) -> OrtSession:
        return OrtSession(create_session(path, threads=threads, memory_arena=self.memory_arena))


@dataclass
class OvSession:
    """A compiled OpenVINO model; one infer request per thread (a request is not reentrant)."""

    compiled: Any  # openvino.CompiledModel
    local: threading.local = field(default_factory=threading.local)

    def run(self, batch: np.ndarray, output: str) -> np.ndarray:
        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        request.infer({INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return request.get_tensor(output).data.copy()


@dataclass(frozen=True)
class OpenVINO:
    name: str = field(default="openvino", init=False)
    precision: Literal["auto", "f32", "bf16"] = "auto"  # auto: the plugin's default

    def open(self, path: str | Path, threads: int | None = None) -> OvSession:
        try:
            import openvino as ov
        except ImportError as exc:
            raise InvalidInput(
                "UNETPP_BACKEND=openvino needs the openvino package: pip install 'unetpp[openvino]'"
            ) from exc
        config: dict[str, Any] = {}
        if self.precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = self.precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            core = ov.Core()
            return OvSession(core.compile_model(core.read_model(str(path)), "CPU", config))
        except RuntimeError as exc:  # OpenVINO's errors are untyped
            raise ModelRepositoryError(f"{path}: OpenVINO cannot load it ({exc})") from exc


def backend(name: str, **options: Any) -> Backend:
    """The backend `UNETPP_BACKEND` names, with its options (memory_arena, precision)."""
    if name == "onnxruntime":
        return OnnxRuntime(**options)
    if name == "openvino":
        return OpenVINO(**options)
    raise InvalidInput(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")

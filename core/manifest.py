"""The model repository's manifest (`model.json`): the only contract between export and server.

A model repository is a folder::

    model.json          this manifest
    L1.onnx .. L4.onnx  fp32 graphs, one standalone pruned sub-network each
    L1.int8.onnx ...    optional quantised variants

Each entry of `graphs` is one servable variant: a file, the output of that file to read,
the pruning level, the precision and the figures measured on the exported file itself.
Two entries may share a file (the ensemble is a second output of the L4 graph). The schema is
documented in docs/model-repository.md; `SCHEMA_VERSION` changes on any incompatible change and a
reader refuses a manifest newer than it knows. Schema 1 had `num_classes` and `threshold` where
schema 2 has `task` (core/task.py); a schema-1 manifest reads as a binary task at its threshold.
Schema 3 adds a graph's `backend` (the one runtime that serves it: the bf16 entries, which
OpenVINO runs from the fp32 files); a schema-2 manifest reads as graphs that any backend serves.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from unetpp.core.errors import InvalidInput, ModelRepositoryError
from unetpp.core.preprocess import Preprocessing
from unetpp.core.task import Task

SCHEMA_VERSION = 3
MANIFEST_NAME = "model.json"
PRECISIONS = ("fp32", "fp16", "int8", "bf16")
LEVELS = (1, 2, 3, 4)  # the pruning depths L1..L4: head j of UNet++ and the nodes it needs
BackendName = Literal["onnxruntime", "openvino"]  # the runtimes that run a graph (core/backends.py)
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
DEFAULT_BACKEND: BackendName = "onnxruntime"  # UNETPP_BACKEND's default, and predict --backend's


@dataclass(frozen=True)
class Accuracy:
    """Scores of one graph measured with onnxruntime on a named data split."""

    iou: float
    dice: float
    images: int
    data: str
    classes: dict[str, dict[str, float]] = field(default_factory=dict)  # multi-class: per class

    def __post_init__(self) -> None:
        _require(_number(self.iou) and 0.0 <= self.iou <= 1.0, f"accuracy iou {self.iou!r}")
        _require(_number(self.dice) and 0.0 <= self.dice <= 1.0, f"accuracy dice {self.dice!r}")
        _require(_integer(self.images) and self.images > 0, f"accuracy images {self.images!r}")
        _require(isinstance(self.data, str), f"accuracy data {self.data!r}")


@dataclass(frozen=True)
class ObjectScores:
    """A binary graph's separate objects (core/instances.py) matched one to one at IoU >= 0.5
    with the instance labels of a named data split, whole images; ap50 = TP / (TP + FP + FN)
    (core/metrics.py has the definitions)."""

    ap50: float
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    images: int
    data: str

    def __post_init__(self) -> None:
        for name in ("ap50", "precision", "recall", "f1"):
            value = getattr(self, name)
            _require(_number(value) and 0.0 <= value <= 1.0, f"instances {name} {value!r}")
        for name in ("tp", "fp", "fn"):
            value = getattr(self, name)
            _require(_integer(value) and value >= 0, f"instances {name} {value!r}")
        _require(_integer(self.images) and self.images > 0, f"instances images {self.images!r}")
        _require(isinstance(self.data, str), f"instances data {self.data!r}")


@dataclass(frozen=True)
class Graph:
    name: str  # "L1".."L4", "L1.int8", "ensemble", ...
    file: str
    sha256: str
    level: int  # one of LEVELS: the deepest head the graph computes
    output: str  # the graph output to read: "logits" or "ensemble"
    precision: str
    parameters: int
    gflops: float  # at the manifest's reference size
    accuracy: Accuracy | None
    latency_ms: dict[str, float] = field(default_factory=dict)  # "256": ms per image, batch 1
    validated: bool = True  # False: written but not checked on this machine (fp16 without GPU)
    note: str = ""
    instances: ObjectScores | None = None  # binary models on data with instance labels
    backend: str | None = None  # the only backend that can serve it (bf16: "openvino"); None: any

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ModelRepositoryError(
                f"graph {self.name}: level must be {LEVELS[0]}..{LEVELS[-1]}, got {self.level}"
            )
        if self.precision not in PRECISIONS:
            raise ModelRepositoryError(f"graph {self.name}: unknown precision {self.precision!r}")
        if Path(self.file).name != self.file or self.file in ("", ".", ".."):
            raise ModelRepositoryError(
                f"graph {self.name}: file must be a plain name, got {self.file!r}"
            )
        where = f"graph {self.name}:"
        _require(self.backend is None or self.backend in BACKENDS, f"{where} backend")
        _require(  # onnxruntime would run the fp32 file in fp32
            self.precision != "bf16" or self.backend == "openvino",
            f"{where} a bf16 graph needs backend openvino",
        )
        _require(_SHA256.fullmatch(str(self.sha256)) is not None, f"{where} sha256 {self.sha256!r}")
        _require(isinstance(self.output, str) and bool(self.output), f"{where} output")
        _require(_integer(self.parameters) and self.parameters > 0, f"{where} parameters")
        _require(_number(self.gflops) and self.gflops >= 0, f"{where} gflops {self.gflops!r}")
        _require(self.accuracy is None or isinstance(self.accuracy, Accuracy), f"{where} accuracy")
        _require(
            self.instances is None or isinstance(self.instances, ObjectScores),
            f"{where} instances",
        )
        _require(
            isinstance(self.latency_ms, dict)
            and all(
                isinstance(k, str) and k.isdigit() and _number(v) and v > 0
                for k, v in self.latency_ms.items()
            ),
            f"{where} latency_ms must map sizes to milliseconds, got {self.latency_ms!r}",
        )


@dataclass(frozen=True)
class Stage:
    """One stage graph of the adaptive cascade: the nodes L_level adds to L_(level-1), and
    head_level. Inputs: `image` (level 1) or L_(level-1)'s node tensors `x_{i}_{j}`; outputs:
    `head_{level}` and, except for the deepest stage, the new nodes."""

    name: str  # "stage1".."stage4"
    file: str
    sha256: str
    level: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class CascadeTarget:
    """Thresholds calibrated so that the cascade loses at most `max_loss` IoU against the
    deepest stage, and what it measured with them on `data` (whole images, as served)."""

    max_loss: float
    thresholds: tuple[float, ...]  # leave L_k when its uncertain share is at most thresholds[k-1]
    iou: float
    deepest_iou: float
    latency_ms: float  # mean per image
    deepest_ms: float  # the deepest fp32 graph alone, same images, interleaved
    reached: tuple[float, ...]  # share of windows that ran L1, L2, ... (L1: 1.0)
    images: int
    data: str


@dataclass(frozen=True)
class CascadeRecord:
    """The adaptive cascade (docs/adaptive.md): its stage graphs, what counts as an uncertain
    pixel, and one calibration per target."""

    stages: tuple[Stage, ...]
    band: float  # a pixel is uncertain when |probability - threshold| < band
    targets: tuple[CascadeTarget, ...]
    quality: dict[str, Any] = field(default_factory=dict)  # the quality score's rank correlation

    def __post_init__(self) -> None:
        levels = [s.level for s in self.stages]
        _require(levels == list(range(1, len(levels) + 1)) and len(levels) > 1, "cascade stages")
        _require(_number(self.band) and 0 < self.band < 0.5, f"cascade band {self.band!r}")
        for t in self.targets:
            _require(len(t.thresholds) == len(levels) - 1, f"cascade thresholds {t.thresholds}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CascadeRecord:
        stages = tuple(
            Stage(**{**s, "inputs": tuple(s["inputs"]), "outputs": tuple(s["outputs"])})
            for s in data["stages"]
        )
        targets = tuple(
            CascadeTarget(
                **{**t, "thresholds": tuple(t["thresholds"]), "reached": tuple(t["reached"])}
            )
            for t in data["targets"]
        )
        return cls(stages, data["band"], targets, data.get("quality", {}))


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    checkpoint_sha256: str
    arch: str
    in_channels: int
    task: Task
    preprocessing: Preprocessing
    reference_size: int
    graphs: tuple[Graph, ...]
    created: str = ""
    machine: str = ""  # where latencies were measured
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    cascade: CascadeRecord | None = None  # optional; absent from older manifests

    def __post_init__(self) -> None:
        _require(_SHA256.fullmatch(str(self.checkpoint_sha256)) is not None, "checkpoint_sha256")
        _require(
            self.in_channels == self.preprocessing.channels,
            f"in_channels {self.in_channels!r} differs from the preprocessing's channels",
        )
        _require(isinstance(self.task, Task), "task")
        _require(_integer(self.reference_size) and self.reference_size > 0, "reference_size")
        _require(all(isinstance(g, Graph) for g in self.graphs), "graphs")

    @property
    def num_classes(self) -> int:
        """The graphs' output channels K."""
        return self.task.channels

    @property
    def threshold(self) -> float:
        return self.task.threshold

    def graph(self, name: str) -> Graph:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["task"] = self.task.to_dict()
        data["graphs"] = [asdict(g) for g in self.graphs]
        if data["cascade"] is None:
            del data["cascade"]
        else:  # its tuples as the JSON lists the file holds
            data["cascade"] = json.loads(json.dumps(data["cascade"]))
        return {"schema_version": data.pop("schema_version"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ModelRepositoryError("manifest must be a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ModelRepositoryError("manifest has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise ModelRepositoryError(
                f"manifest schema {version} is newer than this reader's ({SCHEMA_VERSION}); "
                "upgrade unetpp to serve it"
            )
        try:
            fields = dict(data)
            graphs = tuple(_graph(g) for g in fields.pop("graphs"))
            prep = Preprocessing.from_dict(fields.pop("preprocessing"))
            if fields.get("cascade") is not None:
                fields["cascade"] = CascadeRecord.from_dict(fields["cascade"])
            task = _task(fields)
            manifest = cls(**fields, task=task, graphs=graphs, preprocessing=prep)
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise ModelRepositoryError(f"malformed manifest: {exc}") from exc
        names = [g.name for g in manifest.graphs]
        if not names or len(set(names)) != len(names):
            raise ModelRepositoryError(
                f"manifest graph names must be unique and non-empty: {names}"
            )
        return manifest


def _graph(entry: dict[str, Any]) -> Graph:
    accuracy, instances = entry.get("accuracy"), entry.get("instances")
    return Graph(
        **{
            **entry,
            "accuracy": Accuracy(**accuracy) if accuracy else None,
            "instances": ObjectScores(**instances) if instances else None,
        }
    )


_SHA256 = re.compile("[0-9a-f]{64}")


def _task(fields: dict[str, Any]) -> Task:
    """Pops the task from a manifest's fields: schema 2's `task`, or schema 1's binary model
    (`num_classes` 1 and `threshold`)."""
    if "task" in fields:
        return Task.from_dict(fields.pop("task"))
    num_classes = fields.pop("num_classes")
    _require(num_classes == 1, f"schema 1 num_classes {num_classes!r} (only binary models)")
    return Task.binary(fields.pop("threshold"))


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return _integer(value) or isinstance(value, float)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ModelRepositoryError(f"invalid manifest field: {what}")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelRepositoryError(f"{path}: no manifest (is this a model repository?)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelRepositoryError(f"{path}: unreadable manifest ({exc})") from exc
    return Manifest.from_dict(data)


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def verify_graph(directory: str | Path, graph: Graph | Stage) -> Path:
    """The graph's path, after checking that the file exists and its hash matches the manifest."""
    path = Path(directory) / graph.file
    if not path.is_file():
        raise ModelRepositoryError(f"graph {graph.name}: {path} is missing")
    actual = sha256_file(path)
    if actual != graph.sha256:
        raise ModelRepositoryError(
            f"graph {graph.name}: {path} has sha256 {actual[:12]}..., the manifest says "
            f"{graph.sha256[:12]}...; the file was modified or replaced"
        )
    return path


def load_repository(directory: str | Path) -> Manifest:
    """Read the manifest and verify every graph's hash; raise ModelRepositoryError otherwise."""
    manifest = read_manifest(directory)
    for graph in (*manifest.graphs, *(manifest.cascade.stages if manifest.cascade else ())):
        verify_graph(directory, graph)
    return manifest

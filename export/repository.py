"""Checkpoint -> model repository: L1..L4 ONNX graphs (+ int8, bf16, fp16), verified, and
model.json.

Every figure in the manifest is measured on the written file with the runtime that will serve
it (onnxruntime; OpenVINO for the bf16 entries): accuracy on the validation samples, latency
on this machine. The repository is built in a temporary
folder next to `out_dir` and moved into place at the end, so a reader never sees half of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from torch import nn

from unetpp.core.backends import Backend, OnnxRuntime, OpenVINO, bf16_runs
from unetpp.core.datasets import Sample, load_split
from unetpp.core.errors import ExportError, InvalidInput
from unetpp.core.inference import (
    Evaluation,
    create_session,
    evaluate_session,
    measure_latency,
    network_input,
)
from unetpp.core.manifest import (
    Accuracy,
    CascadeRecord,
    Graph,
    Manifest,
    ObjectScores,
    sha256_file,
    write_manifest,
)
from unetpp.core.preprocess import Preprocessing
from unetpp.core.task import Task
from unetpp.export.cascade import TARGETS, cascade_supported, export_cascade
from unetpp.export.graphs import (
    DEFAULT_OPSET,
    LevelWithEnsemble,
    check_graph,
    check_parity,
    export_graph,
    initializer_parameters,
)
from unetpp.export.quantize import INT8_MARGIN, convert_fp16, quantize_int8
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.summary import gflops
from unetpp.model.unetpp import DEPTH, UNetPlusPlus, count_parameters

log = logging.getLogger(__name__)

REFERENCE_SIZE = 256
EXPORTER = "torch.onnx.export (TorchScript exporter), torch 2.13"


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    int8: bool = True
    int8_margin: float = INT8_MARGIN
    # bf16 entries (OpenVINO runs the fp32 files in bf16); None: when OpenVINO computes in bf16
    # on this machine. A bf16 entry losing more IoU than `int8_margin` is left out too.
    bf16: bool | None = None
    fp16: bool = False
    # "auto": the ensemble becomes a second output of the deepest graph when it measures better
    # than every single level on the validation set; "always"/"never" force the choice.
    ensemble: Literal["auto", "always", "never"] = "auto"
    cascade_targets: tuple[float, ...] = TARGETS  # the adaptive cascade's; () for none
    threshold: float = 0.5  # a binary model's; a multi-class model takes the argmax
    parity_images: int = 4  # validation images also used for the PyTorch parity check
    latency_sizes: tuple[int, ...] = (REFERENCE_SIZE,)
    name: str = "unetpp"
    version: str = ""  # default: the first 12 hex digits of the checkpoint's sha256


# `unetpp export`'s flags (their dests) that set an ExportOptions field; left out, the default
FLAGS = {
    "opset": "opset",
    "int8": "int8",
    "int8_margin": "int8_margin",
    "bf16": "bf16",
    "fp16": "fp16",
    "ensemble": "ensemble",
    "threshold": "threshold",
    "latency_size": "latency_sizes",
    "name": "name",
    "model_version": "version",
}


def options_from(args: argparse.Namespace) -> ExportOptions:
    """The flags given; ExportOptions' defaults for the others."""
    given = {field: getattr(args, flag) for flag, field in FLAGS.items()}
    if given["latency_sizes"] is not None:
        given["latency_sizes"] = tuple(given["latency_sizes"])
    return ExportOptions(**{k: v for k, v in given.items() if v is not None})


def shown_default(flag: str) -> str | None:
    """The default `unetpp export --help` shows for a flag (its dest): ExportOptions'; None for
    a switch, a flag of its own and a default that its help explains."""
    name = FLAGS.get(flag)
    value = (
        None if name is None else next(f for f in fields(ExportOptions) if f.name == name).default
    )
    if value is None or isinstance(value, bool) or value == "":
        return None
    return f"default {','.join(map(str, value)) if isinstance(value, tuple) else value}"


@dataclass
class _Entry:
    """A graph being built: its module, file, outputs and measured figures."""

    name: str
    level: int
    module: nn.Module
    file: str
    output: str
    precision: str = "fp32"
    backend: str | None = None  # the one backend that serves it (bf16: openvino)
    evaluation: Evaluation | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    validated: bool = True
    note: str = ""


def _levels(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(level, standalone module) of every level the model can serve."""
    if isinstance(model, UNetPlusPlus):
        heads = sorted(int(key.split("_")[1]) for key in model.heads)
        return [(level, model.prune(level)) for level in heads]
    return [(DEPTH, model)]  # U-Net baselines: one network, the full depth


class _Builder:
    def __init__(
        self,
        directory: Path,
        in_channels: int,
        samples: Sequence[Sample],
        data: str,
        options: ExportOptions,
        preprocessing: Preprocessing,
        task: Task,
    ) -> None:
        self.directory = directory
        self.task = task
        self.in_channels = in_channels
        self.samples = samples
        self.data = data
        self.options = options
        self.preprocessing = preprocessing
        self.parity_inputs = [
            network_input(s.image, preprocessing)[0] for s in samples[: options.parity_images]
        ]
        self.parity: dict[str, dict[str, float]] = {}

    def export(self, file: str, module: nn.Module, outputs: tuple[str, ...]) -> None:
        """Write, check and compare one fp32 graph with its PyTorch module; check its size."""
        path = export_graph(
            module, self.directory / file, in_channels=self.in_channels, outputs=outputs,
            opset=self.options.opset,
        )  # fmt: skip
        model = check_graph(path, outputs)
        expected = count_parameters(module)
        actual = initializer_parameters(model)
        if actual != expected:
            raise ExportError(
                f"{file}: {actual} parameters in the graph, {expected} in the pruned module"
            )
        self.parity[file] = check_parity(
            path, module, self.parity_inputs, in_channels=self.in_channels, outputs=outputs,
            task=self.task,
        )  # fmt: skip

    def measure(self, entry: _Entry, backend: Backend | None = None) -> None:
        """Accuracy on the validation samples and latency, measured on the written file with
        the backend that serves it (default: onnxruntime on the CPU)."""
        session = (backend or OnnxRuntime()).open(
            self.directory / entry.file, None, entry.precision
        )

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run(batch, entry.output)

        if self.samples:
            entry.evaluation = evaluate_session(run, self.samples, self.preprocessing, self.task)
        entry.latency_ms = {
            str(size): round(measure_latency(run, size, self.in_channels), 3)
            for size in self.options.latency_sizes
        }
        log.info(
            "%s: IoU %s, latency %s ms",
            entry.name,
            f"{entry.evaluation.iou:.4f}" if entry.evaluation else "n/a",
            entry.latency_ms,
        )


def _iou(entry: _Entry) -> float:
    return entry.evaluation.iou if entry.evaluation else float("nan")


def export_repository(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    val_samples: Sequence[Sample] = (),
    val_data: str = "",
    calibration_samples: Sequence[Sample] = (),
    options: ExportOptions | None = None,
) -> Manifest:
    """Export a checkpoint as a model repository in `out_dir` (replaced if it exists).

    `val_samples` (named `val_data` in the manifest) give the recorded accuracy, the ensemble
    decision and the real images of the parity check; `calibration_samples` (training images)
    calibrate the int8 variants. Without validation samples no accuracy is recorded and the
    ensemble is not offered (it cannot be shown to be worth it)."""
    options = options or ExportOptions()
    checkpoint_path = Path(checkpoint_path)
    ckpt = load_checkpoint(checkpoint_path)
    if options.int8 and not calibration_samples:
        raise InvalidInput("int8 variants need calibration (training) images; or use --no-int8")
    checkpoint_sha = sha256_file(checkpoint_path)
    prep = ckpt.preprocessing
    task = ckpt.task if ckpt.task.multiclass else replace(ckpt.task, threshold=options.threshold)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the repository from a server's user
    try:
        builder = _Builder(
            staging, ckpt.config.in_channels, val_samples, val_data, options, prep, task
        )
        calibration = [network_input(s.image, prep)[0] for s in calibration_samples]
        exported = _export_graphs(builder, ckpt.build(), calibration)
        manifest = Manifest(
            name=options.name,
            version=options.version or checkpoint_sha[:12],
            checkpoint_sha256=checkpoint_sha,
            arch=ckpt.config.arch,
            in_channels=ckpt.config.in_channels,
            task=task,
            preprocessing=prep,
            reference_size=REFERENCE_SIZE,
            graphs=exported.graphs(staging, val_data, ckpt.config.in_channels),
            cascade=exported.cascade,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            machine=_machine(),
            extra=exported.record(builder, len(calibration)),
        )
        write_manifest(staging, manifest)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s: %s", out_dir, ", ".join(g.name for g in manifest.graphs))
    return manifest


@dataclass
class _Exported:
    """The graphs written, and what the export decided on the way."""

    options: ExportOptions
    entries: list[_Entry]
    ensemble: dict[str, Any]  # the ensemble's decision
    cascade: CascadeRecord | None
    cascade_decision: dict[str, Any]
    bf16: bool
    rejected: list[dict[str, Any]] = field(default_factory=list)  # variants below the margin

    def graphs(self, directory: Path, val_data: str, in_channels: int) -> tuple[Graph, ...]:
        modules = {id(e.module): e.module for e in self.entries}
        flops = {
            key: round(gflops(m, in_channels, REFERENCE_SIZE), 3) for key, m in modules.items()
        }
        return tuple(_graph(directory, e, val_data, flops[id(e.module)]) for e in self.entries)

    def record(self, builder: _Builder, calibration_images: int) -> dict[str, Any]:
        """The manifest's `extra`: how the repository was made."""
        options = self.options
        return {
            "exporter": EXPORTER,
            "opset": options.opset,
            "ensemble": self.ensemble,
            "cascade": self.cascade_decision,
            "int8": {
                "enabled": options.int8,
                "margin_iou": options.int8_margin,
                "calibration_images": calibration_images,
                "rejected": [r for r in self.rejected if r["name"].endswith(".int8")],
            },
            "bf16": {
                "enabled": self.bf16,
                "margin_iou": options.int8_margin,
                "rejected": [r for r in self.rejected if r["name"].endswith(".bf16")],
            },
            "parity": builder.parity,
            "latency": "median of 10 runs after 2 warm-ups, batch 1, random input, "
            "default threads, onnxruntime on the CPU (CUDA for a validated fp16 graph, "
            "OpenVINO for a bf16 graph)",
        }


def _export_graphs(builder: _Builder, model: nn.Module, calibration: list[np.ndarray]) -> _Exported:
    """L1..L4 (and the ensemble when it is worth it), the cascade's stages, then the variants
    each option asks for, each measured on its file."""
    options = builder.options
    entries = [_Entry(f"L{k}", k, module, f"L{k}.onnx", "logits") for k, module in _levels(model)]
    for entry in entries[:-1]:
        builder.export(entry.file, entry.module, ("logits",))
        builder.measure(entry)
    ensemble, decision = _export_deepest(builder, model, entries)
    if ensemble:
        entries.append(ensemble)
    fp32 = list(entries)
    cascade, cascade_decision = _export_cascade(builder, model)
    bf16 = bf16_runs() if options.bf16 is None else options.bf16
    exported = _Exported(options, entries, decision, cascade, cascade_decision, bf16)
    if options.int8:
        entries += _int8_variants(builder, fp32, calibration, exported.rejected)
    if bf16:
        entries += _bf16_variants(builder, fp32, exported.rejected)
    if options.fp16:
        entries += _fp16_variants(builder, fp32)
    return exported


def _export_cascade(
    builder: _Builder, model: nn.Module
) -> tuple[CascadeRecord | None, dict[str, Any]]:
    """The adaptive cascade's stage graphs and calibration, when the model and data allow."""
    reason = cascade_supported(model, builder.task.channels)
    if not reason and not builder.samples:
        reason = "no validation data to calibrate it on"
    if not reason and not builder.options.cascade_targets:
        reason = "not requested"
    if reason:
        return None, {"offered": False, "reason": reason}
    assert isinstance(model, UNetPlusPlus)
    record, worst = export_cascade(
        model, builder.directory, in_channels=builder.in_channels, opset=builder.options.opset,
        threshold=builder.task.threshold, parity_inputs=builder.parity_inputs,
        samples=builder.samples, preprocessing=builder.preprocessing, data=builder.data,
        targets=builder.options.cascade_targets,
    )  # fmt: skip
    return record, {"offered": True, "parity_max_abs_diff": worst}


def _export_deepest(
    builder: _Builder, model: nn.Module, entries: list[_Entry]
) -> tuple[_Entry | None, dict[str, Any]]:
    """Export the deepest level, with the ensemble as a second output when the options say so
    or, with "auto", when it measures better than every single level on the validation set."""
    deepest = entries[-1]
    mode = builder.options.ensemble
    if not isinstance(model, UNetPlusPlus) or len(model.heads) < 2:
        reason = "the model has one head"
    elif mode == "never" or (mode == "auto" and not builder.samples):
        reason = "not requested" if mode == "never" else "no validation data to measure it on"
    else:
        reason = ""
    if reason:
        builder.export(deepest.file, deepest.module, ("logits",))
        builder.measure(deepest)
        return None, {"offered": False, "reason": reason}
    assert isinstance(model, UNetPlusPlus)
    with_heads = LevelWithEnsemble(model.prune(deepest.level, keep_heads=True))
    builder.export(deepest.file, with_heads, ("logits", "ensemble"))
    ensemble = _Entry("ensemble", deepest.level, with_heads, deepest.file, "ensemble")
    builder.measure(deepest)
    builder.measure(ensemble)
    best = max(entries, key=_iou)
    decision = {
        "offered": mode == "always" or _iou(ensemble) > _iou(best),
        "mode": mode,
        "ensemble_iou": round(_iou(ensemble), 6),
        "best_single": best.name,
        "best_single_iou": round(_iou(best), 6),
        "data": builder.data,
    }
    log.info(
        "ensemble %s (%s): IoU %.4f, best single level %s %.4f",
        "offered" if decision["offered"] else "not offered",
        mode, _iou(ensemble), best.name, _iou(best),
    )  # fmt: skip
    if decision["offered"]:
        return ensemble, decision
    builder.export(deepest.file, deepest.module, ("logits",))
    builder.measure(deepest)
    return None, decision


def _int8_variants(
    builder: _Builder,
    fp32: list[_Entry],
    calibration: list[np.ndarray],
    rejected: list[dict[str, Any]],
) -> list[_Entry]:
    kept = []
    quantized: dict[str, str] = {}
    for entry in fp32:
        if entry.file not in quantized:
            target = entry.file.replace(".onnx", ".int8.onnx")
            quantize_int8(builder.directory / entry.file, builder.directory / target, calibration)
            check_graph(builder.directory / target, _outputs(fp32, entry.file))
            quantized[entry.file] = target
        variant = _Entry(
            f"{entry.name}.int8", entry.level, entry.module, quantized[entry.file], entry.output,
            precision="int8",
        )  # fmt: skip
        builder.measure(variant)
        if _kept(builder, entry, variant, rejected):
            kept.append(variant)
    for target in set(quantized.values()) - {e.file for e in kept}:
        (builder.directory / target).unlink()
    return kept


def _kept(builder: _Builder, fp32: _Entry, variant: _Entry, rejected: list[dict[str, Any]]) -> bool:
    """Whether the measured variant keeps its fp32 graph's IoU within the margin (kept when
    unmeasured: no validation data); if not, it is logged and recorded in `rejected`."""
    if not _iou(fp32) - _iou(variant) > builder.options.int8_margin:  # NaN: unmeasured
        return True
    log.warning(
        "%s left out: IoU %.4f vs fp32 %.4f (margin %.4f)",
        variant.name, _iou(variant), _iou(fp32), builder.options.int8_margin,
    )  # fmt: skip
    rejected.append(
        {"name": variant.name, "iou": round(_iou(variant), 6), "fp32_iou": round(_iou(fp32), 6)}
    )
    return False


def _bf16_variants(
    builder: _Builder, fp32: list[_Entry], rejected: list[dict[str, Any]]
) -> list[_Entry]:
    """The fp32 files run by OpenVINO in bf16: no file of their own, measured like int8."""
    kept = []
    for entry in fp32:
        variant = _Entry(
            f"{entry.name}.bf16", entry.level, entry.module, entry.file, entry.output,
            precision="bf16", backend="openvino",
        )  # fmt: skip
        builder.measure(variant, OpenVINO())
        if _kept(builder, entry, variant, rejected):
            kept.append(variant)
    return kept


def _outputs(entries: list[_Entry], file: str) -> tuple[str, ...]:
    """The outputs of `file`, in graph order ("logits", then "ensemble" if it carries it)."""
    return tuple(e.output for e in entries if e.file == file)


def _fp16_variants(builder: _Builder, fp32: list[_Entry]) -> list[_Entry]:
    gpu = _cuda_runs(builder.directory / fp32[0].file)
    out = []
    for entry in fp32:
        target = entry.file.replace(".onnx", ".fp16.onnx")
        if not (builder.directory / target).exists():
            convert_fp16(builder.directory / entry.file, builder.directory / target)
            check_graph(builder.directory / target, _outputs(fp32, entry.file))
        variant = _Entry(
            f"{entry.name}.fp16", entry.level, entry.module, target, entry.output,
            precision="fp16", validated=gpu,
            note="" if gpu else "not validated: no GPU on the exporting machine",
        )  # fmt: skip
        if gpu:
            builder.measure(variant, OnnxRuntime(providers=("CUDAExecutionProvider",)))
        out.append(variant)
    return out


def _cuda_runs(path: Path) -> bool:
    """Whether onnxruntime really runs a graph on CUDA here (an onnxruntime-gpu build without a
    usable GPU silently falls back to the CPU)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    session = create_session(path, providers=["CUDAExecutionProvider"])
    return session.get_providers()[0] == "CUDAExecutionProvider"


def _graph(directory: Path, entry: _Entry, data: str, gflops_at_reference: float) -> Graph:
    ev = entry.evaluation
    return Graph(
        name=entry.name,
        file=entry.file,
        sha256=sha256_file(directory / entry.file),
        level=entry.level,
        output=entry.output,
        precision=entry.precision,
        parameters=count_parameters(entry.module),
        gflops=gflops_at_reference,
        accuracy=Accuracy(round(ev.iou, 6), round(ev.dice, 6), ev.images, data, ev.classes)
        if ev
        else None,
        latency_ms=entry.latency_ms,
        validated=entry.validated,
        note=entry.note,
        instances=ObjectScores(**ev.objects, data=data) if ev and ev.objects else None,
        backend=entry.backend,
    )


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__}"


def _replace_dir(staging: Path, target: Path) -> None:
    """Move the finished repository into place (an existing one is replaced)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


def main(args: argparse.Namespace) -> int:
    """`unetpp export`: see unetpp/cli.py for the arguments."""
    # By default the data the checkpoint was trained on, split the same way.
    ckpt = load_checkpoint(args.checkpoint)
    trained_on = {} if args.val_data else ckpt.data
    source = args.val_data or trained_on.get("source")
    if not source:
        raise InvalidInput(
            "the checkpoint does not say what it was trained on; pass --val-data "
            "synthetic|hela|PATH (validation images for accuracy, parity and int8 calibration)"
        )
    split = {
        "seed": trained_on.get("seed", 0),
        "val_dir": args.val_dir or trained_on.get("val_dir"),
        "task": ckpt.task,
    }
    val = load_split(source, args.val_split, **split)
    calibration = load_split(source, "train", **split)[: args.calib_images] if args.int8 else []
    options = options_from(args)
    manifest = export_repository(
        args.checkpoint,
        args.out,
        val_samples=val,
        val_data=f"{source}:{args.val_split}",
        calibration_samples=calibration,
        options=options,
    )
    print(f"{args.out}: {manifest.name} {manifest.version}, {len(manifest.graphs)} graphs")
    print(f"{'graph':<14} {'file':<18} {'parameters':>11} {'GFLOPs':>8} {'IoU':>7}  ms@size")
    for g in manifest.graphs:
        iou = f"{g.accuracy.iou:.4f}" if g.accuracy else "n/a"
        ms = ", ".join(f"{v:.1f}@{k}" for k, v in g.latency_ms.items()) or "n/a"
        note = f"  ({g.note})" if g.note else ""
        print(
            f"{g.name:<14} {g.file:<18} {g.parameters:>11,} {g.gflops:>8.2f} {iou:>7}  {ms}{note}"
        )
    for r in manifest.extra["int8"]["rejected"] + manifest.extra["bf16"]["rejected"]:
        print(f"left out {r['name']}: IoU {r['iou']:.4f} vs fp32 {r['fp32_iou']:.4f}")
    return 0

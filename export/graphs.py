"""PyTorch module -> one self-contained ONNX graph, checked for validity and parity.

Exporter: torch 2.13 offers the torch.export-based exporter (`dynamo=True`, the default) and
the TorchScript one. Both fold BN into the convolutions and give the same node list for these
networks; the TorchScript exporter names the dynamic axes N, H, W (the other writes "16*h"),
writes half the bytes (no per-node metadata) and takes about 0.3 s per graph instead of 5 s,
so it is used here. The graphs contain no control flow, so tracing loses nothing.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from unetpp.core.errors import ExportError
from unetpp.core.inference import INPUT_NAME, create_session, run_batch
from unetpp.core.task import Task
from unetpp.model.unetpp import UNetPlusPlus, average_heads

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
LOGITS_TOLERANCE = 1e-4  # max |ONNX - PyTorch| logit difference (fp32)
MASK_AGREEMENT = 0.9999  # min fraction of pixels whose thresholded masks agree
# Odd valid sizes for the random parity inputs: (batch, height, width), H and W multiples of 16.
PARITY_SHAPES = ((2, 48, 80), (3, 16, 112))


class LevelWithEnsemble(nn.Module):
    """L_k with every head up to k: outputs (logits of head k, the heads' average as logits)."""

    def __init__(self, pruned: UNetPlusPlus) -> None:
        super().__init__()
        self.net = pruned

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        heads = self.net.head_logits(x)
        return heads[-1], average_heads(heads, softmax=self.net.config.num_classes > 1)


def export_graph(
    module: nn.Module,
    path: str | Path,
    *,
    in_channels: int,
    outputs: Sequence[str] = ("logits",),
    opset: int = DEFAULT_OPSET,
    inputs: dict[str, Tensor] | None = None,
) -> Path:
    """Export `module` (eval mode) with input `image` [N, C, H, W] and the named outputs, each
    [N, K, H, W], N/H/W dynamic; BN folded; weights inside the file. `inputs` replaces the image
    by named example tensors (a cascade stage's node tensors, N/H/W dynamic too)."""
    if opset < DEFAULT_OPSET:
        raise ExportError(f"opset must be >= {DEFAULT_OPSET}, got {opset}")
    path = Path(path)
    inputs = inputs or {INPUT_NAME: torch.zeros(1, in_channels, 64, 64)}

    def axes(name: str) -> dict[int, str]:  # a node tensor's sides are its own
        own = name.startswith("x_")
        return {0: "N", 2: f"{name}_H" if own else "H", 3: f"{name}_W" if own else "W"}

    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo=True (see module docstring);
        # the size check in the model's forward is a Python-level guard, constant under tracing.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={name: axes(name) for name in (*inputs, *outputs)},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def initializer_parameters(model: onnx.ModelProto) -> int:
    """The network's parameters (BN folded) as stored in the graph's initializers: each
    initializer counted once per node that reads it, since the exporter stores identical
    tensors once (e.g. the zero biases of an untrained network's folded BNs)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes.get(name, 0) for node in model.graph.node for name in node.input)


def check_graph(path: str | Path, outputs: Sequence[str] = ("logits",)) -> onnx.ModelProto:
    """onnx.checker with full shape inference, self-contained, expected input/outputs and rank."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path.name}: invalid ONNX graph ({exc})") from exc
    model = onnx.load(str(path), load_external_data=False)
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ExportError(f"{path.name}: weights stored outside the file: {external[:3]}")
    inputs = [i.name for i in model.graph.input]
    names = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or names != list(outputs):
        raise ExportError(
            f"{path.name}: expected input [{INPUT_NAME}] and outputs {list(outputs)}, "
            f"got {inputs} and {names}"
        )
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        symbolic = [d.dim_param for d in dims]
        if len(dims) != 4 or not all(symbolic[i] for i in (0, 2, 3)):
            raise ExportError(f"{path.name}: {value.name} is not [N, C, H, W] with N, H, W dynamic")
    return model


def check_parity(
    path: str | Path,
    module: nn.Module,
    images: Sequence[np.ndarray],
    *,
    in_channels: int,
    task: Task,
    outputs: Sequence[str] = ("logits",),
    seed: int = 0,
) -> dict[str, Any]:
    """Compare the graph with `module` on `images` (CxHxW, padded) and on random batches of odd
    valid sizes, for every output and every foreground class: the class's logits within
    LOGITS_TOLERANCE and its decisions (the task's) agreeing on MASK_AGREEMENT of pixels.
    Raises ExportError otherwise; returns the worst figures seen, overall and per class."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    batches = [img[None] for img in images] + [
        rng.standard_normal((n, in_channels, h, w), dtype=np.float32) for n, h, w in PARITY_SHAPES
    ]
    session = create_session(path)
    worst = {name: (0.0, 1.0) for name in task.foreground}
    module = module.eval()
    for batch in batches:
        with torch.no_grad():
            expected = module(torch.from_numpy(np.ascontiguousarray(batch)))
        expected = expected if isinstance(expected, tuple) else (expected,)
        for name, ref in zip(outputs, expected, strict=True):
            ref = ref.numpy()
            got = run_batch(session, batch, name)
            if got.shape != ref.shape:
                raise ExportError(
                    f"{path.name}: output {name} has shape {got.shape}, PyTorch {ref.shape}"
                )
            for cls, (diff, agreement) in _class_parity(task, got, ref).items():
                worst[cls] = (max(worst[cls][0], diff), min(worst[cls][1], agreement))
                if diff > LOGITS_TOLERANCE or agreement < MASK_AGREEMENT:
                    raise ExportError(
                        f"{path.name}: output {name} differs from PyTorch on input {batch.shape}"
                        f"{f' for class {cls!r}' if task.multiclass else ''}: max |logit "
                        f"difference| {diff:.2e} (limit {LOGITS_TOLERANCE:.0e}), masks agree on "
                        f"{100 * agreement:.4f}% of pixels (limit {100 * MASK_AGREEMENT}%)"
                    )
    worst_diff = max(diff for diff, _ in worst.values())
    worst_agreement = min(agreement for _, agreement in worst.values())
    log.info(
        "%s: parity on %d inputs, max |diff| %.2e, masks agree %.4f%%",
        path.name,
        len(batches),
        worst_diff,
        100 * worst_agreement,
    )
    figures: dict[str, Any] = {
        "max_abs_diff": worst_diff,
        "mask_agreement": worst_agreement,
        "inputs": len(batches),
    }
    if task.multiclass:
        figures["classes"] = {
            cls: {"max_abs_diff": diff, "mask_agreement": agreement}
            for cls, (diff, agreement) in worst.items()
        }
    return figures


def _class_parity(task: Task, got: np.ndarray, ref: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per foreground class: max |logit difference| on its channel (a multi-class model's
    background channel counts with every class: it takes part in each argmax) and the
    fraction of pixels where both decide the same about the class."""
    got_labels, ref_labels = task.labels(got), task.labels(ref)
    diffs = np.abs(got - ref).max(axis=(0, 2, 3))
    figures = {}
    for index, cls in enumerate(task.foreground, start=1):
        diff = float(max(diffs[index], diffs[0]) if task.multiclass else diffs[0])
        agreement = float(np.mean((got_labels == index) == (ref_labels == index)))
        figures[cls] = (diff, agreement)
    return figures

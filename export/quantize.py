"""int8 static quantisation (QDQ) of an fp32 graph, calibrated on preprocessed training images,
and fp16 conversion for GPUs. Torch-free: onnx and onnxruntime only."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from unetpp.core.errors import ExportError
from unetpp.core.inference import INPUT_NAME

log = logging.getLogger(__name__)

# The IoU an int8 variant may lose against its fp32 graph (a fraction: 0.01 is one point);
# one that loses more is left out of the repository. `--int8-margin`, manifest `margin_iou`.
INT8_MARGIN = 0.01


class _Batches(CalibrationDataReader):
    """Feeds one [1, C, H, W] image at a time to the calibrator."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self._images: Iterator[np.ndarray] = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        return None if image is None else {INPUT_NAME: image[None].astype(np.float32)}


def quantize_int8(src: str | Path, dst: str | Path, calibration: Sequence[np.ndarray]) -> Path:
    """Static QDQ int8: per-channel symmetric int8 weights, uint8 activations with MinMax ranges
    from `calibration` (preprocessed, padded CxHxW images)."""
    if not calibration:
        raise ExportError("int8 quantisation needs calibration images (or use --no-int8)")
    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph clean-up first, as onnxruntime recommends for QDQ.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # MinMax keeps only per-image minima and maxima, not whole feature maps
            calibrate_method=CalibrationMethod.MinMax,
        )
    log.info("%s: int8 QDQ calibrated on %d images", dst.name, len(calibration))
    return dst


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs a line per tensor at INFO through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and compute, float32 input and outputs (same interface as the fp32 graph)."""
    model = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
    model.topological_sort()  # the converter appends the input casts after their readers
    onnx.save(model.model, str(dst))
    return Path(dst)

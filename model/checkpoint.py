"""Self-describing checkpoints: everything `export` needs to rebuild and describe a model.

A checkpoint is a dict saved with torch.save::

    format, format_version   "unetpp-checkpoint", 1
    model                    ModelConfig.to_dict(): rebuilds the network
    preprocessing            Preprocessing.to_dict(): how pixels became the input
    task                     Task.to_dict(): binary or multi-class, class names and colours
                             (absent in older checkpoints: binary)
    state_dict               the weights
    metrics                  per-level validation scores, e.g. {"L1": {"iou": .., "dice": ..}, ...}
    train_args, data         how and on what it was trained (free-form, JSON-able)
    training                 optimizer/scheduler/RNG state and progress for --resume (optional)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetpp.core.errors import InvalidInput
from unetpp.core.preprocess import Preprocessing
from unetpp.core.task import Task
from unetpp.model.unetpp import ModelConfig, build_model

FORMAT = "unetpp-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    config: ModelConfig
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    train_args: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    task: Task = field(default_factory=Task.binary)

    def __post_init__(self) -> None:
        if self.task.channels != self.config.num_classes:
            raise InvalidInput(
                f"the {self.task.kind} task ({len(self.task.classes)} classes) needs "
                f"{self.task.channels} output channels; the model has {self.config.num_classes}"
            )

    def build(self) -> nn.Module:
        """The network with these weights, in eval mode."""
        model = build_model(self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically (a partly written file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": ckpt.config.to_dict(),
        "preprocessing": ckpt.preprocessing.to_dict(),
        "task": ckpt.task.to_dict(),
        "state_dict": ckpt.state_dict,
        "metrics": ckpt.metrics,
        "train_args": ckpt.train_args,
        "data": ckpt.data,
        "training": ckpt.training,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InvalidInput(f"{path}: no such checkpoint") from exc
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise InvalidInput(f"{path}: not a readable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInput(f"{path}: not a unetpp checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise InvalidInput(
            f"{path}: checkpoint format {payload['format_version']} is newer than this unetpp"
        )
    return Checkpoint(
        config=ModelConfig.from_dict(payload["model"]),
        preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
        state_dict=payload["state_dict"],
        metrics=payload.get("metrics", {}),
        train_args=payload.get("train_args", {}),
        data=payload.get("data", {}),
        training=payload.get("training", {}),
        task=Task.from_dict(payload["task"]) if "task" in payload else Task.binary(),
    )

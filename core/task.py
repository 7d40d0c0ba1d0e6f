"""The task: what a pixel's logits mean, how they become a decision, how it is scored.

Two kinds, one interface:

- binary: one output channel, sigmoid, foreground where the probability exceeds `threshold`;
- multiclass: K output channels (K >= 3, background included), softmax, the argmax.

`classes` always starts with "background" (label 0), so the label map of either kind holds
0..K-1 and the foreground classes are `classes[1:]`. A binary task is the K = 2 case written
with one channel. Training, evaluation, export and the server read the task from the
checkpoint or the manifest; nothing else decides what a logit means. docs/tasks.md is the
user's page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unetpp.core.errors import InvalidInput
from unetpp.core.metrics import ScoreAccumulator

BINARY = "binary"
MULTICLASS = "multiclass"
BACKGROUND = "background"
MAX_CLASSES = 256  # label maps are 8-bit
OBJECT_FORMATS = ("instances", "geojson", "coco")  # binary only: separate objects
# the first is today's overlay red; then colours that stay apart from each other and from grey
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 40, 40),
    (40, 200, 40),
    (40, 120, 255),
    (255, 200, 0),
    (200, 60, 255),
    (0, 210, 210),
    (255, 120, 0),
    (255, 0, 160),
)
BACKGROUND_COLOUR = (0, 0, 0)

Colour = tuple[int, int, int]


def logit_threshold(threshold: float) -> float:
    """The logit above which sigmoid(logit) > threshold (a probability in (0, 1))."""
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
        raise InvalidInput(f"threshold must be a probability in (0, 1), got {threshold!r}")
    return math.log(threshold / (1.0 - threshold))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32, copy=False)


def softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return (shifted / shifted.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Task:
    kind: str
    classes: tuple[str, ...]  # label 0 first ("background")
    colours: tuple[Colour, ...]  # one per class, for overlays; the background's is not drawn
    threshold: float = 0.5  # binary only: the probability above which a pixel is foreground

    def __post_init__(self) -> None:
        if self.kind not in (BINARY, MULTICLASS):
            raise InvalidInput(f"task kind must be {BINARY!r} or {MULTICLASS!r}, got {self.kind!r}")
        names = self.classes
        if not all(isinstance(n, str) and n.strip() for n in names):
            raise InvalidInput(f"class names must be non-empty strings, got {list(names)!r}")
        if len(set(names)) != len(names):
            raise InvalidInput(f"class names must be unique, got {list(names)!r}")
        if not names or names[0] != BACKGROUND:
            raise InvalidInput(f"class 0 must be {BACKGROUND!r}, got {list(names)!r}")
        wanted = "exactly 2" if self.kind == BINARY else f"3..{MAX_CLASSES}"
        if (len(names) == 2) != (self.kind == BINARY) or len(names) > MAX_CLASSES:
            raise InvalidInput(f"a {self.kind} task has {wanted} classes, got {len(names)}")
        if len(self.colours) != len(names) or not all(_colour(c) for c in self.colours):
            raise InvalidInput(f"give one [r, g, b] colour (0..255) per class: {self.colours!r}")
        logit_threshold(self.threshold)

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        colours: Sequence[Colour | None] | None = None,
        threshold: float = 0.5,
    ) -> Task:
        """The task of the foreground classes `names` (labels 1..K-1; background implicit):
        one name is a binary task, several a multi-class one; colours default to PALETTE."""
        names = [str(n).strip() for n in names]
        given = list(colours) if colours is not None else [None] * len(names)
        if len(given) != len(names):
            raise InvalidInput(f"{len(names)} class names but {len(given)} colours")
        picked = tuple(
            tuple(int(v) for v in c) if c is not None else PALETTE[i % len(PALETTE)]
            for i, c in enumerate(given)
        )
        kind = BINARY if len(names) == 1 else MULTICLASS
        return cls(kind, (BACKGROUND, *names), (BACKGROUND_COLOUR, *picked), threshold)

    @classmethod
    def binary(cls, threshold: float = 0.5, name: str = "foreground") -> Task:
        return cls.from_names([name], threshold=threshold)

    @property
    def multiclass(self) -> bool:
        return self.kind == MULTICLASS

    @property
    def channels(self) -> int:
        """The network's output channels K."""
        return len(self.classes) if self.multiclass else 1

    @property
    def foreground(self) -> tuple[str, ...]:
        return self.classes[1:]

    @property
    def formats(self) -> tuple[str, ...]:
        """The /v1/segment formats this task answers (core/render.py renders them)."""
        common = ("png", "json", "overlay", "probabilities")
        return common if self.multiclass else (*common, *OBJECT_FORMATS)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Logits [..., K, H, W] -> probabilities of the same shape (sigmoid or softmax)."""
        logits = np.asarray(logits, dtype=np.float32)
        return softmax(logits, axis=-3) if self.multiclass else sigmoid(logits)

    def labels(self, logits: np.ndarray) -> np.ndarray:
        """Logits [..., K, H, W] -> uint8 label map [..., H, W] (0 background, 1..K-1)."""
        logits = np.asarray(logits)
        if self.multiclass:
            return logits.argmax(axis=-3).astype(np.uint8)
        return (logits[..., 0, :, :] > logit_threshold(self.threshold)).astype(np.uint8)

    def masks(self, logits: np.ndarray) -> np.ndarray:
        """Logits [..., K, H, W] -> uint8 0/1 decisions [..., K, H, W]: the foreground mask
        (K = 1) or one-hot labels (background channel included)."""
        labels = self.labels(logits)[..., None, :, :]
        if not self.multiclass:
            return labels
        return (labels == np.arange(self.channels, dtype=np.uint8)[:, None, None]).astype(np.uint8)

    def check_labels(self, target: np.ndarray, where: str) -> None:
        """Raise InvalidInput when a reference label map holds a value above K-1."""
        top = int(target.max()) if target.size else 0
        if top >= len(self.classes):
            raise InvalidInput(
                f"{where}: label {top} in the mask, but the task has {len(self.classes)} classes "
                f"({', '.join(self.classes)}): labels must be 0..{len(self.classes) - 1}"
            )

    def scores(self) -> TaskScores:
        return TaskScores(self)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "classes": list(self.classes),
            "colours": [list(c) for c in self.colours],
        }
        if not self.multiclass:
            data["threshold"] = self.threshold
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        if not isinstance(data, dict):
            raise InvalidInput(f"task must be an object, got {data!r}")
        try:
            return cls(
                data["kind"],
                tuple(data["classes"]),
                tuple(tuple(c) for c in data["colours"]),
                data.get("threshold", 0.5),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInput(f"malformed task {data!r}: {exc}") from exc


def _colour(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 3
        and all(isinstance(v, int) and 0 <= v <= 255 for v in value)
    )


@dataclass
class TaskScores:
    """IoU/Dice per foreground class, each micro-averaged over the images; the task's figure
    is their mean over the foreground classes (for a binary task, the one class's)."""

    task: Task
    per_class: list[ScoreAccumulator] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.per_class = self.per_class or [ScoreAccumulator() for _ in self.task.foreground]
        if len(self.per_class) != len(self.task.foreground):
            raise ValueError(
                f"{len(self.per_class)} scores for {len(self.task.foreground)} classes"
            )

    def update(self, labels: np.ndarray, target: np.ndarray) -> None:
        """`labels` and `target`: label maps (or a binary task's boolean masks) of one image."""
        target = np.asarray(target)
        for index, acc in enumerate(self.per_class, start=1):
            acc.update(labels == index, target == index)

    @property
    def images(self) -> int:
        return self.per_class[0].images

    @property
    def iou(self) -> float:
        return float(np.mean([acc.iou for acc in self.per_class]))

    @property
    def dice(self) -> float:
        return float(np.mean([acc.dice for acc in self.per_class]))

    def classes(self) -> dict[str, dict[str, float]]:
        return {
            name: {"iou": round(acc.iou, 6), "dice": round(acc.dice, 6)}
            for name, acc in zip(self.task.foreground, self.per_class, strict=True)
        }

    def as_dict(self) -> dict[str, Any]:
        """{"iou", "dice", "images"}, and "classes" (name -> iou, dice) for a multi-class task."""
        data: dict[str, Any] = {
            "iou": round(self.iou, 6),
            "dice": round(self.dice, 6),
            "images": self.images,
        }
        if self.task.multiclass:
            data["classes"] = self.classes()
        return data

"""Intersection over union and Dice for binary masks, per image and accumulated over a set.

Set-level scores are micro-averaged: intersections and unions are summed over all pixels of
all images before dividing, so large and small images weigh by their pixels. Two empty masks
agree perfectly (IoU = Dice = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    pred = np.asarray(pred).astype(bool)
    target = np.asarray(target).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    inter = int(np.count_nonzero(pred & target))
    return inter, int(np.count_nonzero(pred)), int(np.count_nonzero(target))


def _scores(inter: int, n_pred: int, n_true: int) -> tuple[float, float]:
    union = n_pred + n_true - inter
    if union == 0:
        return 1.0, 1.0
    return inter / union, 2 * inter / (n_pred + n_true)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    return _scores(*_counts(pred, target))[0]


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    return _scores(*_counts(pred, target))[1]


@dataclass
class ScoreAccumulator:
    """Sums pixel counts over many images; `iou`/`dice` are the set-level (micro) scores."""

    intersection: int = 0
    predicted: int = 0
    true: int = 0
    images: int = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        inter, n_pred, n_true = _counts(pred, target)
        self.intersection += inter
        self.predicted += n_pred
        self.true += n_true
        self.images += 1

    @property
    def iou(self) -> float:
        return _scores(self.intersection, self.predicted, self.true)[0]

    @property
    def dice(self) -> float:
        return _scores(self.intersection, self.predicted, self.true)[1]

    def as_dict(self) -> dict[str, float | int]:
        return {"iou": round(self.iou, 6), "dice": round(self.dice, 6), "images": self.images}

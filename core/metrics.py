"""Intersection over union and Dice for binary masks, per image and accumulated over a set;
object (instance) matching scores for label images.

Set-level scores are micro-averaged: intersections and unions are summed over all pixels of
all images before dividing, so large and small images weigh by their pixels. Two empty masks
agree perfectly (IoU = Dice = 1).

Objects: a predicted and a true object match when their IoU is at least 0.5, one to one
(greedily by IoU, which is the optimal matching for thresholds >= 0.5, where an object has at
most one partner above the threshold except for exact ties). Over a set, the true positives
TP, false positives FP (unmatched predictions) and false negatives FN (unmatched true objects)
are summed over the images; "average precision" is TP / (TP + FP + FN), the definition of
the 2018 Data Science Bowl, StarDist and Cellpose (not COCO's area under a precision-recall
curve), with precision TP / (TP + FP), recall TP / (TP + FN) and F1 their harmonic mean.
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


def match_objects(
    pred: np.ndarray, true: np.ndarray, threshold: float = 0.5
) -> tuple[int, int, int]:
    """(TP, FP, FN) of the objects of two label images (0 background, any positive ids)."""
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and target {true.shape} differ in shape")
    pred, n_pred = _dense(pred)
    true, n_true = _dense(true)
    both = (pred > 0) & (true > 0)
    pairs, inter = np.unique(pred[both] * (n_true + 1) + true[both], return_counts=True)
    p, t = pairs // (n_true + 1), pairs % (n_true + 1)
    area_p = np.bincount(pred.ravel(), minlength=n_pred + 1)
    area_t = np.bincount(true.ravel(), minlength=n_true + 1)
    iou = inter / (area_p[p] + area_t[t] - inter)
    taken_p, taken_t = set(), set()
    for i in np.argsort(-iou, kind="stable"):
        if iou[i] < threshold:
            break
        if p[i] not in taken_p and t[i] not in taken_t:
            taken_p.add(p[i])
            taken_t.add(t[i])
    tp = len(taken_p)
    return tp, n_pred - tp, n_true - tp


def _dense(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """The label image with its objects numbered 1..N (int64), and N."""
    ids, dense = np.unique(np.asarray(labels), return_inverse=True)
    dense = dense.reshape(np.shape(labels)).astype(np.int64)
    if ids[0] != 0:  # no background pixel
        dense += 1
    return dense, int(np.count_nonzero(ids))


@dataclass
class ObjectAccumulator:
    """Sums object matches over many images; see the module docstring for the definitions."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    images: int = 0

    def update(self, pred: np.ndarray, true: np.ndarray) -> None:
        tp, fp, fn = match_objects(pred, true)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.images += 1

    @property
    def ap50(self) -> float:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def as_dict(self) -> dict[str, float | int]:
        scores = {k: round(getattr(self, k), 6) for k in ("ap50", "precision", "recall", "f1")}
        counts = {"tp": self.tp, "fp": self.fp, "fn": self.fn, "images": self.images}
        return scores | counts


def _ratio(num: int, den: int) -> float:
    """num / den, and 1 when there is nothing to count (no objects either side)."""
    return num / den if den else 1.0

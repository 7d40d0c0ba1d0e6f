from __future__ import annotations

import numpy as np
import pytest

from unetpp.core.errors import InvalidInput
from unetpp.core.task import Task, logit_threshold


def test_binary_task_thresholds_the_sigmoid_on_the_logits() -> None:
    task = Task.binary(0.7)
    logits = np.array([[[-1.0, 0.5, 0.9, 3.0]]], np.float32)  # [K=1, H=1, W=4]
    probabilities = task.probabilities(logits)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-6)
    np.testing.assert_array_equal(task.labels(logits), (probabilities[0] > 0.7).astype(np.uint8))
    assert task.masks(logits).shape == (1, 1, 4)
    assert task.channels == 1 and task.foreground == ("foreground",)
    assert logit_threshold(0.5) == 0.0
    with pytest.raises(InvalidInput, match="threshold"):
        Task.binary(1.0)


def test_multiclass_task_takes_the_softmax_argmax() -> None:
    task = Task.from_names(["round", "long"])
    assert task.multiclass and task.channels == 3 and task.classes[0] == "background"
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)  # [N, K, H, W]
    probabilities = task.probabilities(logits)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    labels = task.labels(logits)
    assert labels.shape == (2, 5, 6) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))
    masks = task.masks(logits)
    assert masks.shape == logits.shape
    np.testing.assert_array_equal(masks.argmax(axis=1), labels)
    assert (masks.sum(axis=1) == 1).all()


def test_per_class_scores_and_their_mean() -> None:
    task = Task.from_names(["a", "b"])
    target = np.array([[0, 1, 1, 2]])
    scores = task.scores()
    scores.update(np.array([[0, 1, 2, 2]]), target)  # a: 1/2, b: 1/2 IoU
    scores.update(np.array([[0, 0, 0, 0]]), np.zeros((1, 4), int))
    half = {"iou": 0.5, "dice": round(2 / 3, 6)}
    assert scores.classes() == {"a": half, "b": half}
    assert scores.as_dict() == {**half, "images": 2, "classes": {"a": half, "b": half}}
    binary = Task.binary().scores()
    binary.update(np.array([[1, 1, 0]], np.uint8), np.array([[True, False, False]]))
    assert binary.as_dict() == {"iou": 0.5, "dice": round(2 / 3, 6), "images": 1}


def test_task_round_trips_and_refuses_bad_definitions() -> None:
    task = Task.from_names(["tumour", "organ"], colours=[(1, 2, 3), None])
    assert task.colours[1] == (1, 2, 3) and task.colours[2] != (1, 2, 3)
    assert Task.from_dict(task.to_dict()) == task
    assert Task.from_names(["nucleus"]).kind == "binary"
    for names in (["a", "a"], ["", "b"], ["background", "b"]):
        with pytest.raises(InvalidInput, match="class"):
            Task.from_names(names)
    with pytest.raises(InvalidInput, match="colour"):
        Task.from_names(["a", "b"], colours=[(0, 0, 300), None])
    with pytest.raises(InvalidInput, match="label 3"):
        task.check_labels(np.array([[0, 3]]), "mask x.png")
    task.check_labels(np.array([[0, 2]]), "mask x.png")

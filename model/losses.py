"""The paper's loss: 0.5 * binary cross-entropy + Dice, applied to every head under deep supervision.

Dice here is the soft Dice loss 1 - (2 * sum(p * y) + 1) / (sum(p) + sum(y) + 1) per image and
class, averaged over the batch; p = sigmoid(logits). A multi-class model (K > 1 channels) gets
its softmax analogue: 0.5 * cross-entropy + the soft Dice of p = softmax(logits) against the
one-hot labels, per image and foreground class. With several heads the loss is the weighted mean
of the per-head losses (equal weights by default, as in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTH = 1.0


def _soft_dice(probs: Tensor, target: Tensor) -> Tensor:
    """Mean soft Dice loss over images and channels of [N, K, H, W] probabilities and targets."""
    dims = (2, 3)
    inter = (probs * target).sum(dims)
    dice = (2 * inter + SMOOTH) / (probs.sum(dims) + target.sum(dims) + SMOOTH)
    return (1 - dice).mean()


def bce_dice(logits: Tensor, target: Tensor) -> Tensor:
    """0.5 * BCE + soft Dice for logits and a {0, 1} target of the same shape [N, K, H, W]."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return 0.5 * bce + _soft_dice(torch.sigmoid(logits), target)


def ce_dice(logits: Tensor, labels: Tensor) -> Tensor:
    """0.5 * cross-entropy + soft Dice of the foreground classes, for logits [N, K, H, W] and a
    label map [N, H, W] of class indices 0..K-1."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels)
    probs = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    return 0.5 * ce + _soft_dice(probs[:, 1:], one_hot[:, 1:])


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """`bce_dice` for one channel, `ce_dice` for K > 1; `target` [N, 1, H, W] holds the mask or
    the labels (as floats, as CropDataset gives them)."""
    if logits.shape[1] == 1:
        return bce_dice(logits, target)
    return ce_dice(logits, target[:, 0].long())


def deep_supervision_loss(
    head_logits: Sequence[Tensor], target: Tensor, weights: Sequence[float] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Weighted mean of `segmentation_loss` over the heads, and each head's loss (detached)."""
    if weights is None:
        weights = [1.0] * len(head_logits)
    if len(weights) != len(head_logits):
        raise ValueError(f"{len(weights)} head weights for {len(head_logits)} heads")
    losses = [segmentation_loss(logits, target) for logits in head_logits]
    total = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
    return total, [loss.detach() for loss in losses]

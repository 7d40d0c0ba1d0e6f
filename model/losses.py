"""The paper's loss: 0.5 * binary cross-entropy + Dice, applied to every head under deep supervision.

Dice here is the soft Dice loss 1 - (2 * sum(p * y) + 1) / (sum(p) + sum(y) + 1) per image and
class, averaged over the batch; p = sigmoid(logits). With several heads the loss is the
weighted mean of the per-head losses (equal weights by default, as in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTH = 1.0


def bce_dice(logits: Tensor, target: Tensor) -> Tensor:
    """0.5 * BCE + soft Dice for logits and a {0, 1} target of the same shape [N, K, H, W]."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    dims = (2, 3)
    inter = (probs * target).sum(dims)
    dice = (2 * inter + SMOOTH) / (probs.sum(dims) + target.sum(dims) + SMOOTH)
    return 0.5 * bce + (1 - dice).mean()


def deep_supervision_loss(
    head_logits: Sequence[Tensor], target: Tensor, weights: Sequence[float] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Weighted mean of `bce_dice` over the heads, and each head's loss (detached)."""
    if weights is None:
        weights = [1.0] * len(head_logits)
    if len(weights) != len(head_logits):
        raise ValueError(f"{len(weights)} head weights for {len(head_logits)} heads")
    losses = [bce_dice(logits, target) for logits in head_logits]
    total = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
    return total, [loss.detach() for loss in losses]

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetpp.core.datasets import Sample, synthetic_split
from unetpp.core.preprocess import Preprocessing
from unetpp.model.data import CropDataset
from unetpp.model.losses import bce_dice, deep_supervision_loss


def blob_sample(size: tuple[int, int] = (120, 150)) -> Sample:
    """An image that is its own mask: bright where the mask is set."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    mask = ((yy - 40) ** 2 + (xx - 60) ** 2 < 25**2) | ((yy // 20 + xx // 20) % 3 == 0)
    return Sample("blobs", (mask * 3000 + 1000).astype(np.uint16), mask)


def test_crops_are_a_function_of_seed_epoch_and_index():
    data = CropDataset(synthetic_split("val"), Preprocessing(), crop=48, length=10, seed=0)
    image, mask = data[3]
    assert image.shape == (1, 48, 48) and mask.shape == (1, 48, 48)
    assert image.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    again = data[3]
    assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
    assert not torch.equal(image, data[4][0])
    data.set_epoch(1)
    assert not torch.equal(image, data[3][0])
    other = CropDataset(synthetic_split("val"), Preprocessing(), crop=48, length=10, seed=1)
    assert not torch.equal(image, other[3][0])


@pytest.mark.parametrize("size", [(120, 150), (20, 30)])  # larger and smaller than the crop
def test_augmentation_keeps_image_and_mask_aligned(size):
    data = CropDataset([blob_sample(size)], Preprocessing(), crop=48, length=64, seed=0)
    for i in range(len(data)):
        image, mask = data[i]
        inside, outside = image[mask > 0], image[mask == 0]
        if len(inside) and len(outside):
            # intensity jitter is monotonic and the noise small: the mask still separates them
            assert inside.mean() > outside.mean() + 0.3


def test_augmentation_varies_zoom_orientation_and_intensity():
    data = CropDataset([blob_sample()], Preprocessing(), crop=48, length=200, seed=0)
    crops = [data[i] for i in range(len(data))]
    fractions = {round(float(m.mean()), 2) for _, m in crops}
    assert len(fractions) > 20
    spreads = [float(img.std()) for img, _ in crops]
    assert max(spreads) > 1.3 * min(s for s in spreads if s > 0)


def test_geometric_augmentation_only_crops_and_turns():
    sample = blob_sample()
    whole = torch.from_numpy(Preprocessing()(sample.image))[0]
    data = CropDataset([sample], Preprocessing(), crop=48, length=20, seed=0, augment="geometric")
    for i in range(len(data)):
        image, mask = data[i]
        # values untouched (no zoom, intensity or noise) and still the mask's two levels
        assert set(image.unique().tolist()) <= set(whole.unique().tolist())
        assert torch.equal(image[0] > whole.mean(), mask[0] > 0)
    with pytest.raises(ValueError, match="augment"):
        CropDataset([sample], Preprocessing(), crop=48, length=1, augment="strong")


def test_bce_dice_matches_the_formula():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    p = torch.sigmoid(logits)
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert bce_dice(logits, target).item() == pytest.approx((0.5 * bce + 1 - dice).item(), rel=1e-5)
    perfect = bce_dice(torch.where(target > 0, 20.0, -20.0), target)
    assert perfect.item() < 1e-3


def test_deep_supervision_loss_weights_the_heads():
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    heads = [torch.randn(2, 1, 8, 8) for _ in range(4)]
    each = [bce_dice(h, target).item() for h in heads]
    total, per_head = deep_supervision_loss(heads, target)
    assert total.item() == pytest.approx(sum(each) / 4, rel=1e-5)
    assert [h.item() for h in per_head] == pytest.approx(each, rel=1e-5)
    only_l4, _ = deep_supervision_loss(heads, target, (0, 0, 0, 1))
    assert only_l4.item() == pytest.approx(each[3], rel=1e-5)
    with pytest.raises(ValueError, match="2 head weights for 4 heads"):
        deep_supervision_loss(heads, target, (1, 1))

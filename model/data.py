"""Random augmented crops for training, drawn from whole preprocessed images.

Every image is preprocessed once, whole, with the shared `Preprocessing` recipe (so crops see
exactly the normalisation that inference applies to whole images). Crop `index` of `epoch` is
a pure function of (seed, epoch, index): workers, processes and resumed runs draw the same
crops. Each crop:

1. picks an image with probability proportional to its pixel count;
2. zoom jitter: takes a square region of crop * s pixels, s log-uniform in [1/1.35, 1.35], and
   resizes it to crop x crop (bilinear; a binary mask bilinear then thresholded at 0.5, a
   multi-class label map by its nearest pixel);
3. flips and rotates by a multiple of 90 degrees (the eight symmetries of the square);
4. jitters intensity: gamma in [0.7, 1.4] (on the clipped non-negative part), contrast in
   [0.75, 1.33] around the mean, a brightness shift in [-0.1, 0.1], then, with probability
   0.5, Gaussian noise of standard deviation up to 0.08 (in units of the normalised range).

`augment="geometric"` keeps steps 1 and 3 only (crops at scale 1, the eight symmetries): for
data whose test images come from the same microscope and settings as its training images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from unetpp.core.datasets import Sample
from unetpp.core.preprocess import Preprocessing

ZOOM = 1.35
GAMMA = (0.7, 1.4)
CONTRAST = (0.75, 1.33)
BRIGHTNESS = 0.1
NOISE = 0.08
AUGMENTS = ("full", "geometric")


class CropDataset(Dataset):
    """`length` augmented crops per epoch: item i is (image [C, crop, crop], mask [1, crop, crop]),
    the mask float 0/1 or, with `labels`, the label map's values (0..K-1) as floats."""

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocessing: Preprocessing,
        crop: int,
        length: int,
        seed: int = 0,
        augment: str = "full",
        labels: bool = False,
    ) -> None:
        if not samples:
            raise ValueError("no training samples")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.full = augment == "full"
        self.labels = labels
        self.images = [torch.from_numpy(preprocessing(s.image)) for s in samples]
        self.masks = [torch.from_numpy(s.mask[None].astype(np.float32)) for s in samples]
        areas = np.array([s.mask.size for s in samples], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.crop = crop
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = int(rng.choice(len(self.images), p=self.weights))
        image, mask = self._region(self.images[k], self.masks[k], rng)
        flip, turns = bool(rng.integers(2)), int(rng.integers(4))
        image, mask = _symmetry(image, flip, turns), _symmetry(mask, flip, turns)
        return (_intensity(image, rng) if self.full else image.contiguous()), mask

    def _region(
        self, image: Tensor, mask: Tensor, rng: np.random.Generator
    ) -> tuple[Tensor, Tensor]:
        zoom = float(np.exp(rng.uniform(-np.log(ZOOM), np.log(ZOOM)))) if self.full else 1.0
        side = max(2, round(self.crop * zoom))
        height, width = image.shape[-2:]
        if height < side or width < side:  # small image: mirror it out to the region's size
            pad = (0, max(0, side - width), 0, max(0, side - height))
            image = _mirror_pad(image, pad)
            mask = _mirror_pad(mask, pad)
            height, width = image.shape[-2:]
        y = int(rng.integers(0, height - side + 1))
        x = int(rng.integers(0, width - side + 1))
        image = image[:, y : y + side, x : x + side]
        mask = mask[:, y : y + side, x : x + side]
        if side != self.crop:
            size = (self.crop, self.crop)
            image = F.interpolate(image[None], size, mode="bilinear", antialias=True)[0]
            if self.labels:
                mask = F.interpolate(mask[None], size, mode="nearest-exact")[0]
            else:
                mask = F.interpolate(mask[None], size, mode="bilinear", antialias=True)[0]
                mask = (mask > 0.5).float()
        return image, mask


def _mirror_pad(t: Tensor, pad: tuple[int, int, int, int]) -> Tensor:
    """Symmetric padding of the last two axes, repeated while the tensor is smaller than the pad."""
    while pad[1] or pad[3]:
        step = (0, min(pad[1], t.shape[-1] - 1), 0, min(pad[3], t.shape[-2] - 1))
        t = F.pad(t[None], step, mode="reflect")[0]
        pad = (0, pad[1] - step[1], 0, pad[3] - step[3])
    return t


def _symmetry(t: Tensor, flip: bool, turns: int) -> Tensor:
    """One of the eight symmetries of the square: an optional mirror, then quarter turns."""
    if flip:
        t = t.flip(-1)
    return torch.rot90(t, turns, dims=(-2, -1))


def _intensity(image: Tensor, rng: np.random.Generator) -> Tensor:
    gamma = float(rng.uniform(*GAMMA))
    contrast = float(np.exp(rng.uniform(np.log(CONTRAST[0]), np.log(CONTRAST[1]))))
    shift = float(rng.uniform(-BRIGHTNESS, BRIGHTNESS))
    image = image.clamp(min=0) ** gamma
    mean = image.mean()
    image = (image - mean) * contrast + mean + shift
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0, NOISE))
        noise = rng.standard_normal(image.shape).astype(np.float32)
        image = image + sigma * torch.from_numpy(noise)
    return image.contiguous()

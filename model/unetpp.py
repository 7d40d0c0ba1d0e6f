"""UNet++ (Zhou et al., IEEE TMI 2019) with deep supervision and true pruning, and its baselines.

Nodes X(i,j) are `x_{i}_{j}`: i is the down-sampling depth (0..4), j the position along the
skip pathway. X(i,0) is the encoder; for j >= 1

    X(i,j) = Block(concat[X(i,0), ..., X(i,j-1), Up(X(i+1,j-1))])

where Block is two 3x3 conv + BN + ReLU and Up is a 2x2 transposed convolution to w[i]
channels (the official code), so X(i,j) takes j*w[i] + w[i] channels. A 1x1 head `head_{j}`
reads X(0,j). Level k (L1..L4) is the sub-network of the nodes with i + j <= k: it computes
only those and yields head k. `UNetPlusPlus.prune(k)` returns L_k as a standalone module.

The U-Net and wide U-Net baselines of the paper's Table 1 reuse the same blocks with plain
skips: X(i,4-i) = Block(concat[X(i,0), Up(X(i+1,3-i))]).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unetpp.core.manifest import LEVELS
from unetpp.core.preprocess import check_size

Arch = Literal["unetpp", "unet", "wide_unet"]
ARCHS: tuple[Arch, ...] = get_args(Arch)
Upsample = Literal["transpose", "bilinear"]

WIDTHS = (32, 64, 128, 256, 512)
# Wide U-Net (paper, Table 1): the U-Net widths scaled so that its parameter count is close
# to UNet++ L4's (9.04M with BN folded); 35/70/140/280/560 as in the paper gives 9.28M.
WIDE_WIDTHS = (35, 70, 140, 280, 560)
DEPTH = LEVELS[-1]  # 4 poolings, so len(WIDTHS) == DEPTH + 1; levels L1..L4


class Block(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """x2 up-sampling to `out_channels`: 2x2 transposed conv, or bilinear + 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, mode: Upsample = "transpose") -> None:
        super().__init__()
        if mode == "transpose":
            self.op: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        elif mode == "bilinear":
            self.op = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        else:
            raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {mode!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in checkpoints."""

    arch: Arch = "unetpp"
    in_channels: int = 1
    num_classes: int = 1
    widths: tuple[int, ...] = WIDTHS
    deep_supervision: bool = True
    upsample: Upsample = "transpose"
    depth: int = DEPTH  # UNet++ only: the deepest level built (a pruned model has depth < 4)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**{**data, "widths": tuple(data["widths"])})


class _Encoder(nn.Module):
    """Shared pieces: the X(i,0) column, up-samplers `up_{i}_{j}` and max pooling."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], depth: int) -> None:
        super().__init__()
        if len(widths) != DEPTH + 1:
            raise ValueError(
                f"widths must give {DEPTH + 1} channel counts (i = 0..4), got {widths}"
            )
        if not 1 <= depth <= DEPTH:
            raise ValueError(f"depth must be 1..{DEPTH}, got {depth}")
        self.widths = tuple(widths)
        self.depth = depth
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i in range(depth + 1):
            self.nodes[f"x_{i}_0"] = Block(in_channels if i == 0 else widths[i - 1], widths[i])

    def encode(self, x: Tensor, depth: int) -> dict[tuple[int, int], Tensor]:
        """X(0,0)..X(depth,0)."""
        if x.ndim != 4:
            raise ValueError(f"expected input of shape [N, C, H, W], got {tuple(x.shape)}")
        check_size(x.shape[-2], x.shape[-1])
        feats = {(0, 0): self.nodes["x_0_0"](x)}
        for i in range(1, depth + 1):
            feats[(i, 0)] = self.nodes[f"x_{i}_0"](F.max_pool2d(feats[(i - 1, 0)], 2))
        return feats

    def node(self, feats: dict[tuple[int, int], Tensor], i: int, j: int, skips: range) -> Tensor:
        """X(i,j) from X(i, skips) and the up-sampled X(i+1, j-1)."""
        inputs = [feats[(i, s)] for s in skips] + [self.ups[f"up_{i}_{j}"](feats[(i + 1, j - 1)])]
        return self.nodes[f"x_{i}_{j}"](torch.cat(inputs, dim=1))


class UNetPlusPlus(_Encoder):
    """UNet++ with nested dense skips, deep supervision and pruning to any level 1..depth.

    forward(x) returns, in training with deep supervision, the list of head logits
    [head_1, ..., head_depth]; otherwise the logits of head `depth` alone (a pruned model's
    only head). forward(x, level=k) computes only the nodes of L_k.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        widths: tuple[int, ...] = WIDTHS,
        deep_supervision: bool = True,
        upsample: Upsample = "transpose",
        depth: int = DEPTH,
        heads: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(in_channels, widths, depth)
        self.config = ModelConfig(
            "unetpp", in_channels, num_classes, tuple(widths), deep_supervision, upsample, depth
        )
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.ups[f"up_{i}_{j}"] = Up(widths[i + 1], widths[i], upsample)
                self.nodes[f"x_{i}_{j}"] = Block((j + 1) * widths[i], widths[i])
        # Without deep supervision only the deepest head is trained, so only it is built.
        if heads is None:
            heads = tuple(range(1, depth + 1)) if deep_supervision else (depth,)
        self.heads = nn.ModuleDict(
            {f"head_{j}": nn.Conv2d(widths[0], num_classes, 1) for j in heads}
        )

    def _features(self, x: Tensor, level: int) -> dict[tuple[int, int], Tensor]:
        feats = self.encode(x, 0)
        for k in range(1, level + 1):
            self.grow(feats, k)
        return feats

    def grow(self, feats: dict[tuple[int, int], Tensor], level: int) -> list[tuple[int, int]]:
        """Add to the nodes of L_(level-1) the ones L_level adds, X(i, level - i) for i = level
        down to 0, computing nothing twice; returns their keys in that order."""
        new = [(level, 0)]
        feats[(level, 0)] = self.nodes[f"x_{level}_0"](F.max_pool2d(feats[(level - 1, 0)], 2))
        for i in reversed(range(level)):
            feats[(i, level - i)] = self.node(feats, i, level - i, range(level - i))
            new.append((i, level - i))
        return new

    def _check_level(self, level: int | None) -> int:
        level = self.depth if level is None else level
        if not 1 <= level <= self.depth:
            raise ValueError(f"level must be 1..{self.depth}, got {level}")
        if f"head_{level}" not in self.heads:
            raise ValueError(
                f"this model has no head_{level} (heads: {sorted(self.heads)}); "
                "models trained without deep supervision only have their deepest head"
            )
        return level

    def head_logits(self, x: Tensor, level: int | None = None) -> list[Tensor]:
        """Logits of every built head up to `level`, computing only the nodes of L_level."""
        level = self._check_level(level)
        feats = self._features(x, level)
        return [
            self.heads[f"head_{j}"](feats[(0, j)])
            for j in range(1, level + 1)
            if f"head_{j}" in self.heads
        ]

    def forward(self, x: Tensor, level: int | None = None) -> Tensor | list[Tensor]:
        level = self._check_level(level)
        if self.training and self.config.deep_supervision:
            return self.head_logits(x, level)
        return self.heads[f"head_{level}"](self._features(x, level)[(0, level)])

    def ensemble(self, x: Tensor) -> Tensor:
        """The paper's average of the heads: mean of the heads' probabilities, as logits."""
        return average_heads(self.head_logits(x), softmax=self.config.num_classes > 1)

    def prune(self, level: int, keep_heads: bool = False) -> UNetPlusPlus:
        """A standalone L_level: only the nodes with i + j <= level and head_level (all heads up
        to it with `keep_heads`, for the ensemble), sharing nothing with this model."""
        level = self._check_level(level)
        heads = tuple(int(k.split("_")[1]) for k in self.heads) if keep_heads else (level,)
        heads = tuple(j for j in heads if j <= level)
        cfg = self.config
        pruned = UNetPlusPlus(
            cfg.in_channels,
            cfg.num_classes,
            cfg.widths,
            cfg.deep_supervision,
            cfg.upsample,
            level,
            heads,
        )
        own = self.state_dict()
        pruned.load_state_dict({k: own[k].clone() for k in pruned.state_dict()})
        return pruned.train(self.training)


def average_heads(logits: list[Tensor], *, softmax: bool = False) -> Tensor:
    """Mean of the heads' probabilities, returned as logits (the paper's ensemble).

    Sigmoid (a binary task's one channel): logit(mean_i sigmoid(x_i)) = log sum_i sigmoid(x_i)
    - log sum_i sigmoid(-x_i), computed in log space: logit(p) itself loses all precision as p
    nears 1 in float32 (two runtimes would disagree by 1e-3 on confident pixels), this form
    does not, and needs no clamping. `softmax` (a multi-class task's K channels, dim 1 of each
    head): log mean_i softmax(x_i), whose softmax is the mean probability itself."""
    x = torch.stack(logits)
    if softmax:
        return torch.logsumexp(F.log_softmax(x, dim=2), dim=0) - math.log(len(logits))
    return torch.logsumexp(-F.softplus(-x), dim=0) - torch.logsumexp(-F.softplus(x), dim=0)


class UNet(_Encoder):
    """U-Net (and wide U-Net with wider `widths`): plain skips X(i,4-i) <- X(i,0), one head."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        widths: tuple[int, ...] = WIDTHS,
        upsample: Upsample = "transpose",
        arch: Arch = "unet",
    ) -> None:
        super().__init__(in_channels, widths, DEPTH)
        self.config = ModelConfig(arch, in_channels, num_classes, tuple(widths), False, upsample)
        for i in reversed(range(DEPTH)):
            j = DEPTH - i
            self.ups[f"up_{i}_{j}"] = Up(widths[i + 1], widths[i], upsample)
            self.nodes[f"x_{i}_{j}"] = Block(2 * widths[i], widths[i])
        self.heads = nn.ModuleDict({f"head_{DEPTH}": nn.Conv2d(widths[0], num_classes, 1)})

    def forward(self, x: Tensor) -> Tensor:
        feats = self.encode(x, DEPTH)
        for i in reversed(range(DEPTH)):
            j = DEPTH - i
            feats[(i, j)] = self.node(feats, i, j, range(1))  # plain skip: X(i,0) only
        return self.heads[f"head_{DEPTH}"](feats[(0, DEPTH)])


def build_model(config: ModelConfig) -> UNetPlusPlus | UNet:
    """The model a config describes (untrained)."""
    if config.arch == "unetpp":
        return UNetPlusPlus(
            config.in_channels,
            config.num_classes,
            config.widths,
            config.deep_supervision,
            config.upsample,
            config.depth,
        )
    if config.arch in ("unet", "wide_unet"):
        return UNet(
            config.in_channels, config.num_classes, config.widths, config.upsample, config.arch
        )
    raise ValueError(f"unknown arch {config.arch!r}; choose one of {', '.join(ARCHS)}")


def default_config(arch: Arch = "unetpp", **overrides: Any) -> ModelConfig:
    """The paper's configuration of each architecture."""
    widths = WIDE_WIDTHS if arch == "wide_unet" else WIDTHS
    ds = arch == "unetpp"
    return ModelConfig(**{"arch": arch, "widths": widths, "deep_supervision": ds, **overrides})


def count_parameters(module: nn.Module, bn_folded: bool = True) -> int:
    """Parameter count; with `bn_folded`, as after folding each BN into its (bias-free) conv:
    the BN's scale and shift become the conv's bias, one value per channel instead of two."""
    total = sum(p.numel() for p in module.parameters())
    if bn_folded:
        total -= sum(m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d))
    return total

"""`unetpp summary`: parameters (BN folded) and GFLOPs of L1..L4 and the baselines."""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from unetpp.model.unetpp import DEPTH, UNetPlusPlus, build_model, count_parameters, default_config


def gflops(module: torch.nn.Module, in_channels: int, size: int) -> float:
    """Forward GFLOPs (multiply and add counted as two) for one size x size image."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module.eval()(torch.zeros(1, in_channels, size, size))
    return counter.get_total_flops() / 1e9


def rows(
    in_channels: int = 1, num_classes: int = 1, size: int = 256
) -> list[tuple[str, int, float]]:
    full = UNetPlusPlus(in_channels, num_classes)
    out = []
    for level in range(1, DEPTH + 1):
        pruned = full.prune(level)
        out.append(
            (f"UNet++ L{level}", count_parameters(pruned), gflops(pruned, in_channels, size))
        )
    for arch, label in (("unet", "U-Net"), ("wide_unet", "wide U-Net")):
        net = build_model(default_config(arch, in_channels=in_channels, num_classes=num_classes))
        out.append((label, count_parameters(net), gflops(net, in_channels, size)))
    return out


def main(args: argparse.Namespace) -> int:
    print(f"{'network':<14} {'parameters':>12} {'GFLOPs@' + str(args.size):>12}")
    for name, params, flops in rows(args.in_channels, args.classes, args.size):
        print(f"{name:<14} {params:>12,} {flops:>12.2f}")
    return 0

from __future__ import annotations

import pytest
import torch

from unetpp.core.errors import InvalidInput
from unetpp.model.unetpp import (
    UNet,
    UNetPlusPlus,
    build_model,
    count_parameters,
    default_config,
)

# The official architecture, 1 input channel, 1 class, BN folded (paper: 0.1M/0.5M/2.2M/9.0M).
LEVEL_PARAMETERS = {1: 100_961, 2: 511_105, 3: 2_204_961, 4: 9_041_601}
TINY = (4, 8, 16, 32, 64)


@pytest.fixture(scope="module")
def full() -> UNetPlusPlus:
    torch.manual_seed(0)
    return UNetPlusPlus().eval()


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_level_parameters_match_the_official_architecture(full: UNetPlusPlus, level: int) -> None:
    assert count_parameters(full.prune(level)) == LEVEL_PARAMETERS[level]


def test_bn_folded_count_equals_an_actual_fold() -> None:
    # Fold every BN into its conv by hand and count what remains.
    model = UNetPlusPlus(widths=TINY).prune(2)
    plain = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            plain += m.weight.numel() + m.out_channels  # folded bias
    assert count_parameters(model) == plain


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(48, 80), (64, 64)])
def test_level_alone_equals_head_of_the_full_network(full: UNetPlusPlus, batch: int, size) -> None:
    torch.manual_seed(1)
    x = torch.randn(batch, 1, *size)
    with torch.no_grad():
        heads = full.head_logits(x)
        assert len(heads) == 4
        for level in range(1, 5):
            alone = full(x, level=level)
            pruned = full.prune(level)(x)
            assert alone.shape == (batch, 1, *size)
            torch.testing.assert_close(alone, heads[level - 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(pruned, heads[level - 1], atol=1e-5, rtol=0)


def test_level_computes_only_its_nodes(full: UNetPlusPlus) -> None:
    called: list[str] = []
    hooks = [
        m.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, m in full.nodes.items()
    ]
    try:
        with torch.no_grad():
            full(torch.randn(1, 1, 32, 32), level=2)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(called) == sorted(["x_0_0", "x_1_0", "x_2_0", "x_0_1", "x_1_1", "x_0_2"])


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_pruned_module_holds_no_parameter_of_deeper_nodes(full: UNetPlusPlus, level: int) -> None:
    pruned = full.prune(level)
    names = {n for n, _ in pruned.named_parameters()}
    for name in names:
        kind, *idx = name.split(".")[1].split("_")
        if kind in ("x", "up"):
            i, j = int(idx[0]), int(idx[1])
            assert i + j <= level, name
        else:
            assert name.startswith(f"heads.head_{level}."), name
    # and nothing is shared with the full model
    full_ptrs = {p.data_ptr() for p in full.parameters()}
    assert not full_ptrs & {p.data_ptr() for p in pruned.parameters()}


def test_every_parameter_gets_a_gradient_under_deep_supervision() -> None:
    torch.manual_seed(0)
    model = UNetPlusPlus(widths=TINY).train()
    out = model(torch.randn(2, 1, 32, 32))
    assert isinstance(out, list) and len(out) == 4
    sum(o.mean() for o in out).backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not missing


def test_without_deep_supervision_only_the_deepest_head_exists() -> None:
    model = UNetPlusPlus(widths=TINY, deep_supervision=False).train()
    out = model(torch.randn(1, 1, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 32, 32)
    assert list(model.heads) == ["head_4"]
    with pytest.raises(ValueError, match="no head_2"):
        model.prune(2)


def test_ensemble_averages_head_probabilities(full: UNetPlusPlus) -> None:
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        probs = torch.stack([torch.sigmoid(h) for h in full.head_logits(x)]).mean(0)
        torch.testing.assert_close(torch.sigmoid(full.ensemble(x)), probs, atol=1e-5, rtol=0)


def test_bilinear_upsampling_option() -> None:
    model = UNetPlusPlus(widths=TINY, upsample="bilinear").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())


def test_multi_class_and_rgb() -> None:
    model = UNetPlusPlus(in_channels=3, num_classes=2, widths=TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 32), level=1).shape == (1, 2, 16, 32)


@pytest.mark.parametrize("shape", [(1, 1, 50, 80), (1, 1, 48, 8)])
def test_size_not_multiple_of_16_says_what_to_do(shape) -> None:
    with pytest.raises(InvalidInput, match=r"multiples of 16.*pad_to_multiple"):
        UNetPlusPlus(widths=TINY)(torch.randn(*shape))


def test_unknown_level_is_refused(full: UNetPlusPlus) -> None:
    with pytest.raises(ValueError, match=r"level must be 1\.\.4"):
        full(torch.randn(1, 1, 16, 16), level=5)


@pytest.mark.parametrize(("arch", "params"), [("unet", 7_759_521), ("wide_unet", 9_282_246)])
def test_baselines_build_run_and_have_their_parameter_counts(arch: str, params: int) -> None:
    model = build_model(default_config(arch))
    assert isinstance(model, UNet)
    assert count_parameters(model) == params
    # wide U-Net is sized to UNet++ L4, within 3%
    if arch == "wide_unet":
        assert abs(params - LEVEL_PARAMETERS[4]) / LEVEL_PARAMETERS[4] < 0.03
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 48, 80)).shape == (2, 1, 48, 80)
    # plain skips: each decoder node sees X(i,0) and the up-sampled node below only
    assert sorted(k for k in model.nodes if not k.endswith("_0")) == [
        "x_0_4",
        "x_1_3",
        "x_2_2",
        "x_3_1",
    ]

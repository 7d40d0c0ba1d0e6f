from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unetpp.core.errors import InvalidInput
from unetpp.core.preprocess import Preprocessing
from unetpp.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from unetpp.model.unetpp import ModelConfig, build_model


def test_checkpoint_rebuilds_the_same_network(tmp_path: Path) -> None:
    cfg = ModelConfig(widths=(4, 8, 16, 32, 64), in_channels=3)
    model = build_model(cfg).eval()
    prep = Preprocessing(channels=3, p_low=2.0)
    path = save_checkpoint(
        tmp_path / "a" / "best.pt",
        Checkpoint(cfg, prep, model.state_dict(), metrics={"L4": {"iou": 0.5}}),
    )
    loaded = load_checkpoint(path)
    assert loaded.config == cfg and loaded.preprocessing == prep
    assert loaded.metrics == {"L4": {"iou": 0.5}}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.build()(x), model(x))
    assert not list(tmp_path.glob("a/*.tmp"))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match="not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(InvalidInput, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")

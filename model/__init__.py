"""UNet++ and its baselines in PyTorch, losses, datasets and training."""

from unetpp.model.unetpp import (
    ModelConfig,
    UNet,
    UNetPlusPlus,
    build_model,
    count_parameters,
)

__all__ = ["ModelConfig", "UNet", "UNetPlusPlus", "build_model", "count_parameters"]

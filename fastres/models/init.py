"""torchvision's ResNet weight initialisation, shared by the models fastres defines itself."""
from __future__ import annotations

from torch import nn


def init_like_torchvision_(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_out) convolutions and unit/zero BatchNorm affine, as torchvision's ResNet."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return model
